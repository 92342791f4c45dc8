"""The KubeRay manifests in k8s/: base and every overlay, rendered and checked offline.

No API server or kustomize binary is reachable from CI, so this file renders the kustomizations
itself (`render`: resources plus RFC 6902 JSON patches, the only kinds used here; any other
kustomization field fails the test rather than being ignored) and checks each RayCluster and
RayJob:
- against the openAPIV3Schema of the KubeRay v1.7.0 CRDs in ../shared/kuberay-crds (skipped,
  with the reason, when that folder is absent), with unknown fields rejected as
  `kubectl apply` (strict field validation) does;
- against the CRDs' CEL rules (`x-kubernetes-validations`), one explicit check per rule; a rule
  these checks do not know fails the test, so a CRD update cannot slip past;
- against the operator's own admission checks (ray-operator/controllers/ray/utils/validation.go:
  names, labels in rayStartParams, resources set twice, token auth needing Ray >= 2.52,
  autoscaler v2 restart policy, TTL without shutdown, ...);
- against what the code expects: worker groups labelled `role` = generator | judge | trainer as
  in cluster/placement.py, an entrypoint running `python -m sppo.driver --config <file in the
  repo>` whose overrides load, images built by docker/, and pods that hold the config's pools
  and trainer (cluster.placement.check_resources on the nodes the manifest starts).
"""

from __future__ import annotations

import copy
import functools
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.placement import HEAD_ROLE, ROLE_LABEL, ROLES, check_resources

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
CRDS = REPO.parent / "shared" / "kuberay-crds"
KUSTOMIZATIONS = {"base": K8S / "base", "cpu-demo": K8S / "overlays" / "cpu-demo",
                  "gpu-8x": K8S / "overlays" / "gpu-8x",
                  "gpu-8x-tp2": K8S / "overlays" / "gpu-8x-tp2"}


# --------------------------------------------------------------------------- rendering


def render(kdir: Path) -> list[dict]:
    """`kustomize build kdir` for the features used in k8s/: resources and JSON patches."""
    k = yaml.safe_load((kdir / "kustomization.yaml").read_text())
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
    unsupported = set(k) - {"apiVersion", "kind", "resources", "patches"}
    assert not unsupported, f"{kdir}: render() does not implement {sorted(unsupported)}"
    docs: list[dict] = []
    for entry in k.get("resources", []):
        path = (kdir / entry).resolve()
        if path.is_dir():
            docs += render(path)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for patch in k.get("patches", []):
        assert set(patch) <= {"path", "target"}, f"{kdir}: unsupported patch fields {patch}"
        ops = yaml.safe_load((kdir / patch["path"]).read_text())
        assert isinstance(ops, list), f"{patch['path']}: only JSON 6902 patches are rendered"
        hits = [i for i, d in enumerate(docs) if _targets(patch["target"], d)]
        assert len(hits) == 1, f"{patch['path']}: target {patch['target']} matches {len(hits)}"
        docs[hits[0]] = json_patch(docs[hits[0]], ops)
    return docs


def _targets(target: dict, doc: dict) -> bool:
    group, _, version = doc["apiVersion"].rpartition("/")
    have = {"group": group, "version": version, "kind": doc["kind"],
            "name": doc["metadata"]["name"]}
    unknown = set(target) - set(have)
    assert not unknown, f"unsupported patch target fields {sorted(unknown)}"
    return all(have[key] == value for key, value in target.items())


def json_patch(doc: dict, ops: list[dict]) -> dict:
    """RFC 6902 add / remove / replace / test, as kustomize applies them."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = [p.replace("~1", "/").replace("~0", "~")
                          for p in op["path"].split("/")[1:]]
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        kind = op["op"]
        if kind == "test":
            current = node[int(last)] if isinstance(node, list) else node[last]
            assert current == op["value"], f"patch test failed at {op['path']}: {current!r}"
        elif kind == "add":
            if isinstance(node, list):
                node.insert(len(node) if last == "-" else int(last), op["value"])
            else:
                node[last] = op["value"]
        elif kind in ("replace", "remove"):
            key = int(last) if isinstance(node, list) else last
            if not isinstance(node, list):
                assert key in node, f"{kind} of missing path {op['path']}"
            if kind == "replace":
                node[key] = op["value"]
            else:
                del node[key]
        else:
            raise AssertionError(f"unsupported patch op {kind!r}")
    return doc


def rendered(name: str) -> list[dict]:
    return render(KUSTOMIZATIONS[name])


def ray_objects() -> list[tuple[str, dict]]:
    """(where, object) for every RayCluster and RayJob: each rendering and raycluster.yaml."""
    out = [(f"{name}/{d['kind']}", d) for name in KUSTOMIZATIONS for d in rendered(name)
           if d["kind"] in ("RayCluster", "RayJob")]
    out.append(("base/raycluster.yaml", yaml.safe_load((K8S / "base" / "raycluster.yaml")
                                                       .read_text())))
    return out


def cluster_spec(obj: dict) -> dict:
    return obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]


def the_job(name: str) -> dict:
    jobs = [d for d in rendered(name) if d["kind"] == "RayJob"]
    assert len(jobs) == 1
    return jobs[0]


OBJECTS = ray_objects()
IDS = [where for where, _ in OBJECTS]


# --------------------------------------------------------------------------- CRD schemas


def _crd(kind: str) -> dict:
    if not CRDS.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRDS} (CI checks out shared/ beside the repo)")
    return _load_crd(kind)


@functools.cache
def _load_crd(kind: str) -> dict:
    name = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}[kind]
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 40k lines
    crd = yaml.load((CRDS / name).read_text(), Loader=loader)
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def _strict(schema: Any) -> Any:
    """The schema with unknown fields rejected: structural CRD schemas leave them out (the API
    server prunes them), but `kubectl apply`'s strict field validation refuses them."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _validator(kind: str):
    _crd(kind)  # skips when the CRDs are absent
    return _strict_validator(kind)


@functools.cache
def _strict_validator(kind: str):
    import jsonschema

    return jsonschema.Draft7Validator(_strict(_load_crd(kind)))


@pytest.mark.parametrize("where,obj", OBJECTS, ids=IDS)
def test_matches_crd_schema(where, obj):
    assert obj["apiVersion"] == "ray.io/v1"
    validator = _validator(obj["kind"])
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in validator.iter_errors(obj)]
    assert not errors, "\n".join(errors)


def test_schema_check_rejects_typos_and_wrong_types():
    job = copy.deepcopy(the_job("base"))
    group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    group["minReplica"] = 1  # typo: pruned by the API server, refused by strict validation
    group["maxReplicas"] = "6"
    errors = {e.message for e in _validator("RayJob").iter_errors(job)}
    assert any("minReplica" in m for m in errors) and any("'6' is not of type" in m
                                                           for m in errors), errors


def _cel_rules(schema: Any, path: str = "") -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    if isinstance(schema, dict):
        for rule in schema.get("x-kubernetes-validations", []):
            found.add((path, rule["rule"]))
        for key, sub in schema.get("properties", {}).items():
            found |= _cel_rules(sub, f"{path}.{key}")
        if "items" in schema:
            found |= _cel_rules(schema["items"], f"{path}[]")
    return found


MANAGED_BY = {"ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"}


def _managed_by(spec: dict) -> None:
    if "managedBy" in spec:
        assert spec["managedBy"] in MANAGED_BY


def _deletion_strategy(spec: dict) -> None:
    strategy = spec.get("deletionStrategy")
    if strategy is None:
        return
    legacy = "onSuccess" in strategy or "onFailure" in strategy
    assert not (legacy and "deletionRules" in strategy)
    assert ("onSuccess" in strategy and "onFailure" in strategy) or "deletionRules" in strategy
    for rule in strategy.get("deletionRules", []):
        condition = rule["condition"]
        assert not ("jobStatus" in condition and "jobDeploymentStatus" in condition)
        assert "jobStatus" in condition or "jobDeploymentStatus" in condition


# Each CEL rule of the CRDs -> the check applied on creation. `self == oldSelf` rules are
# transition rules: they only constrain updates of an existing object.
IMMUTABLE = "self == oldSelf"
CEL_CHECKS = {
    ("RayCluster", ".spec.gcsFaultToleranceOptions.backend", IMMUTABLE): None,
    ("RayCluster", ".spec.managedBy", IMMUTABLE): None,
    ("RayCluster", ".spec.managedBy",
     "self in ['ray.io/kuberay-operator', 'kueue.x-k8s.io/multikueue']"):
        lambda obj: _managed_by(obj["spec"]),
    ("RayJob", ".spec.managedBy", IMMUTABLE): None,
    ("RayJob", ".spec.managedBy",
     "self in ['ray.io/kuberay-operator', 'kueue.x-k8s.io/multikueue']"):
        lambda obj: _managed_by(obj["spec"]),
    ("RayJob", ".spec.rayClusterSpec.gcsFaultToleranceOptions.backend", IMMUTABLE): None,
    ("RayJob", ".spec.rayClusterSpec.managedBy", IMMUTABLE): None,
    ("RayJob", ".spec.rayClusterSpec.managedBy",
     "self in ['ray.io/kuberay-operator', 'kueue.x-k8s.io/multikueue']"):
        lambda obj: _managed_by(obj["spec"]["rayClusterSpec"]),
    ("RayJob", ".spec.deletionStrategy",
     "!((has(self.onSuccess) || has(self.onFailure)) && has(self.deletionRules))"):
        lambda obj: _deletion_strategy(obj["spec"]),
    ("RayJob", ".spec.deletionStrategy",
     "((has(self.onSuccess) && has(self.onFailure)) || has(self.deletionRules))"):
        lambda obj: _deletion_strategy(obj["spec"]),
    ("RayJob", ".spec.deletionStrategy.deletionRules[].condition",
     "!(has(self.jobStatus) && has(self.jobDeploymentStatus))"):
        lambda obj: _deletion_strategy(obj["spec"]),
    ("RayJob", ".spec.deletionStrategy.deletionRules[].condition",
     "has(self.jobStatus) || has(self.jobDeploymentStatus)"):
        lambda obj: _deletion_strategy(obj["spec"]),
}


def test_every_cel_rule_is_covered():
    in_crds = {(kind, path, rule) for kind in ("RayCluster", "RayJob")
               for path, rule in _cel_rules(_crd(kind))}
    assert in_crds == set(CEL_CHECKS), (
        f"new rules: {sorted(in_crds - set(CEL_CHECKS))}; "
        f"gone: {sorted(set(CEL_CHECKS) - in_crds)}")


@pytest.mark.parametrize("where,obj", OBJECTS, ids=IDS)
def test_cel_rules(where, obj):
    for (kind, _, _), check in CEL_CHECKS.items():
        if kind == obj["kind"] and check is not None:
            check(obj)


# --------------------------------------------------------------------------- operator checks

DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
MAX_CLUSTER_NAME = 53  # utils.MaxRayClusterNameLength
MAX_JOB_NAME = MAX_CLUSTER_NAME - 6  # the operator appends a 6-character suffix


def _groups(spec: dict) -> list[tuple[str, dict]]:
    return [("Head", spec["headGroupSpec"])] + [
        (g["groupName"], g) for g in spec["workerGroupSpecs"]]


@pytest.mark.parametrize("where,obj", OBJECTS, ids=IDS)
def test_operator_validation(where, obj):
    """The checks ValidateRayClusterSpec / ValidateRayJobSpec make before creating anything."""
    from ray._private.label_utils import validate_node_label_syntax, validate_node_labels

    name = obj["metadata"]["name"]
    assert DNS1035.fullmatch(name)
    assert len(name) <= (MAX_JOB_NAME if obj["kind"] == "RayJob" else MAX_CLUSTER_NAME)
    spec = cluster_spec(obj)
    names = [g["groupName"] for g in spec["workerGroupSpecs"]]
    assert len(names) == len(set(names)), "group names must be unique"
    for group, g in _groups(spec):
        params = g.get("rayStartParams", {})
        assert g["template"]["spec"]["containers"], f"{group}: no container"
        assert "labels" not in params, f"{group}: use the top-level labels field"
        assert not ({"num-cpus", "num-gpus", "memory", "resources"} & set(params)
                    and g.get("resources")), f"{group}: resources set twice"
        validate_node_label_syntax(g.get("labels", {}))  # Kubernetes label syntax
        validate_node_labels(g.get("labels", {}))  # no reserved ray.io/ prefix
        if group != "Head":
            assert 0 <= g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"], group
            assert not g.get("suspend"), f"{group}: cannot suspend with the autoscaler"
    if spec.get("authOptions", {}).get("mode") == "token":
        major, minor, *_ = (int(x) for x in spec["rayVersion"].split("."))
        assert (major, minor) >= (2, 52), "token auth needs Ray 2.52 or later"
    if spec.get("enableInTreeAutoscaling") and spec.get("autoscalerOptions", {}).get(
            "version") == "v2":
        for group, g in _groups(spec):
            assert g["template"]["spec"].get("restartPolicy", "Never") == "Never", group
            env = g["template"]["spec"]["containers"][0].get("env", [])
            assert "RAY_enable_autoscaler_v2" not in {e["name"] for e in env}
    if obj["kind"] == "RayJob":
        job = obj["spec"]
        assert job.get("ttlSecondsAfterFinished", 0) >= 0
        if job.get("ttlSecondsAfterFinished", 0) > 0:
            assert job.get("shutdownAfterJobFinishes"), "TTL needs shutdownAfterJobFinishes"
        assert job.get("activeDeadlineSeconds", 1) > 0
        assert job.get("backoffLimit", 0) >= 0
        assert job.get("submissionMode", "K8sJobMode") in (
            "K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
        assert isinstance(yaml.safe_load(job.get("runtimeEnvYAML", "") or "{}"), dict)


# --------------------------------------------------------------------------- what the code expects


@pytest.mark.parametrize("where,obj", OBJECTS, ids=IDS)
def test_groups_carry_the_placement_roles(where, obj):
    spec = cluster_spec(obj)
    assert spec["headGroupSpec"]["labels"] == {ROLE_LABEL: HEAD_ROLE}
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == set(ROLES)
    for role, g in groups.items():
        assert g["labels"] == {ROLE_LABEL: role}
    assert spec["enableInTreeAutoscaling"] is True


def test_rayjob_and_raycluster_share_one_spec():
    cluster = yaml.safe_load((K8S / "base" / "raycluster.yaml").read_text())
    assert the_job("base")["spec"]["rayClusterSpec"] == cluster["spec"]


def _entrypoint(job: dict) -> tuple[str, list[str]]:
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "sppo.driver"]
    assert argv[3] == "--config"
    return argv[4], argv[5:]


@pytest.mark.parametrize("name,config", [("base", "configs/mistral7b-ultrafeedback.yaml"),
                                         ("cpu-demo", "configs/demo.yaml"),
                                         ("gpu-8x", "configs/mistral7b-ultrafeedback.yaml"),
                                         ("gpu-8x-tp2", "configs/mistral7b-ultrafeedback.yaml")])
def test_entrypoint_runs_the_driver_with_a_repo_config(name, config):
    from sppo.config import load_config

    path, overrides = _entrypoint(the_job(name))
    assert path == config
    assert all(re.fullmatch(r"[a-z_]+(\.[a-z_]+)+=\S+", o) for o in overrides), overrides
    if not (REPO / path).is_file():
        pytest.skip(f"{path} is not in the repository yet")
    load_config(REPO / path, overrides)  # the overrides name real fields


def _docker_images() -> dict[str, str]:
    """{"gpu" | "cpu": image tag} from the build line in each docker/Dockerfile.*."""
    tags = {}
    for dockerfile in sorted((REPO / "docker").glob("Dockerfile.*")):
        match = re.search(r"docker build -f docker/\S+ -t (\S+) \.", dockerfile.read_text())
        assert match, f"{dockerfile.name}: no build line with its tag"
        tags[dockerfile.suffix.lstrip(".")] = match.group(1)
    return tags


def _workdir(variant: str) -> str:
    text = (REPO / "docker" / f"Dockerfile.{variant}").read_text()
    return re.findall(r"^WORKDIR (\S+)", text, re.M)[-1]


@pytest.mark.parametrize("name,variant", [("base", "gpu"), ("cpu-demo", "cpu"),
                                          ("gpu-8x", "gpu"), ("gpu-8x-tp2", "gpu")])
def test_one_image_from_docker_per_cluster(name, variant):
    job = the_job(name)
    spec = job["spec"]["rayClusterSpec"]
    images = {c["image"] for _, g in _groups(spec) for c in g["template"]["spec"]["containers"]}
    assert images == {_docker_images()[variant]}
    # The submitter uploads the image's copy of the repository as the working directory.
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["working_dir"] == _workdir(variant)


def _quantity(value: Any) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _pod_resources(g: dict) -> dict[str, float]:
    (container,) = g["template"]["spec"]["containers"]
    res = container["resources"]
    assert res.get("requests", res["limits"]) == res["limits"], "requests = limits"
    return {"CPU": _quantity(res["limits"].get("cpu", 0)),
            "GPU": _quantity(res["limits"].get("nvidia.com/gpu", 0))}


def _ray_nodes(spec: dict, replicas_key: str = "replicas") -> list[dict]:
    """The Ray nodes the cluster starts with: what `ray.nodes()` would list."""
    head = spec["headGroupSpec"]
    nodes = [{"Alive": True, "Labels": head["labels"],
              "Resources": {"CPU": float(head["rayStartParams"]["num-cpus"])}}]
    for g in spec["workerGroupSpecs"]:
        nodes += [{"Alive": True, "Labels": g["labels"], "Resources": _pod_resources(g)}
                  for _ in range(g[replicas_key])]
    return nodes


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_pods_hold_the_config(name):
    """The pods a run starts with hold the config's pools and trainer role by role, and each
    pool's worker group can grow to the pool's max_replicas."""
    from sppo.config import load_config

    job = the_job(name)
    path, overrides = _entrypoint(job)
    if not (REPO / path).is_file():
        pytest.skip(f"{path} is not in the repository yet")
    cfg = load_config(REPO / path, overrides)
    spec = job["spec"]["rayClusterSpec"]
    nodes = _ray_nodes(spec)
    totals = {key: sum(n["Resources"].get(key, 0.0) for n in nodes) for key in ("CPU", "GPU")}
    assert check_resources(cfg, totals, nodes) == []

    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    for role in ("generator", "judge"):
        pool = getattr(cfg.pools, role)
        pod = _pod_resources(groups[role])
        gpus_each = (pool.tensor_parallel_size if pool.tensor_parallel_size > 1
                     else pool.num_gpus)
        for key, each in (("CPU", pool.num_cpus), ("GPU", gpus_each)):
            assert groups[role]["maxReplicas"] * pod[key] >= pool.max_replicas * each, (
                f"{role} group cannot hold pools.{role}.max_replicas={pool.max_replicas}")


def test_gpu_overlay_fills_8_gpu_nodes():
    spec = the_job("gpu-8x")["spec"]["rayClusterSpec"]
    assert "nvidia.com/gpu" not in str(spec["headGroupSpec"]["template"]), "head has no GPU"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpus = {role: _pod_resources(g)["GPU"] for role, g in groups.items()}
    assert gpus == {"generator": 1, "judge": 1, "trainer": 4}
    assert sum(gpus[r] * groups[r]["replicas"] for r in groups) == 8, "one full node to start"
    for role, g in groups.items():
        pod = g["template"]["spec"]
        assert pod["nodeSelector"] == {"nvidia.com/gpu.count": "8"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists",
                "effect": "NoSchedule"} in pod["tolerations"]
        assert gpus[role] <= 8


@pytest.mark.parametrize("name,tp", [("gpu-8x", 1), ("gpu-8x-tp2", 2)])
def test_a_generator_pod_has_as_many_gpus_as_its_tensor_parallel_size(name, tp):
    """A tensor-parallel generator's ranks share one pod (one Ray node): TP=1 and TP=2."""
    from sppo.config import load_config

    job = the_job(name)
    path, overrides = _entrypoint(job)
    cfg = load_config(REPO / path, overrides)
    assert cfg.pools.generator.tensor_parallel_size == tp
    groups = {g["groupName"]: g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    assert _pod_resources(groups["generator"])["GPU"] == tp
    assert _pod_resources(groups["judge"])["GPU"] == cfg.pools.judge.tensor_parallel_size
    nodes = _ray_nodes(job["spec"]["rayClusterSpec"])
    assert sum(n["Resources"].get("GPU", 0) for n in nodes) <= 8


def test_cpu_overlay_has_no_gpus():
    job = the_job("cpu-demo")
    assert "nvidia.com/gpu" not in yaml.safe_dump(job)
    (pvc,) = [d for d in rendered("cpu-demo") if d["kind"] == "PersistentVolumeClaim"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_every_pod_mounts_the_shared_volume(name):
    docs = rendered(name)
    (pvc,) = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    entrypoint = the_job(name)["spec"]["entrypoint"]
    for _, g in _groups(the_job(name)["spec"]["rayClusterSpec"]):
        pod = g["template"]["spec"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in pod["volumes"] if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert claims[mounts["/mnt/shared"]] == pvc["metadata"]["name"]
    assert "run.output_dir=/mnt/shared/" in entrypoint


def test_render_json_patch():
    """The renderer's patch ops on a small document (add, test, replace, remove, escapes)."""
    doc = {"a": [{"n": "x"}], "b": {"c/d": 1}}
    out = json_patch(doc, [{"op": "test", "path": "/a/0/n", "value": "x"},
                           {"op": "add", "path": "/a/-", "value": {"n": "y"}},
                           {"op": "replace", "path": "/b/c~1d", "value": 2},
                           {"op": "remove", "path": "/a/0"}])
    assert out == {"a": [{"n": "y"}], "b": {"c/d": 2}} and doc["b"]["c/d"] == 1
    with pytest.raises(AssertionError, match="patch test failed"):
        json_patch(doc, [{"op": "test", "path": "/a/0/n", "value": "z"}])
