"""cluster/placement.py and the `ray up` launcher config cluster/ray-cluster.yaml.

Node lists here are plain dicts shaped like `ray.nodes()` entries (data, not a fake Ray). Two
tests use the real local Ray cluster of the session, which carries no labels: an actor started
by a factory given `role_selector` runs (the single-node fallback), and `check_resources` on its
`ray.cluster_resources()` flags a pool asking for GPUs it does not have.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cluster.placement import (
    HEAD_ROLE,
    ROLE_LABEL,
    ROLES,
    check_resources,
    is_role_labelled,
    role_selector,
)
from sppo.config import PoolConfig, from_dict

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "cluster" / "ray-cluster.yaml"


def node(labels: dict | None = None, alive: bool = True, **resources: float) -> dict:
    return {"NodeID": "n", "Alive": alive, "Labels": dict(labels or {}),
            "Resources": {k: float(v) for k, v in resources.items()}}


def labelled_cluster(gen_gpus: float = 1, judge_gpus: float = 1, trainer_gpus: float = 4,
                     ) -> list[dict]:
    return [node({"ray.io/node-id": "h", ROLE_LABEL: HEAD_ROLE}),
            node({ROLE_LABEL: "generator"}, CPU=4, GPU=gen_gpus),
            node({ROLE_LABEL: "generator"}, CPU=4, GPU=gen_gpus),
            node({ROLE_LABEL: "judge"}, CPU=4, GPU=judge_gpus),
            node({ROLE_LABEL: "trainer"}, CPU=48, GPU=trainer_gpus)]


def cfg(**sections):
    """A Config built from nested dicts (values checked by type, not by `validate()`)."""
    return from_dict(sections, validate=False)


# --------------------------------------------------------------------------- selectors


def test_unlabelled_cluster_gets_no_selector():
    # A laptop or CI: one node with only Ray's own labels.
    nodes = [node({"ray.io/node-id": "abc"}, CPU=2)]
    assert not is_role_labelled(nodes)
    for role in ROLES:
        assert role_selector(role, nodes) is None


def test_labelled_cluster_selects_each_role():
    nodes = labelled_cluster()
    for role in ROLES:
        assert role_selector(role, nodes) == {ROLE_LABEL: role}


def test_role_without_a_node_yet_is_still_selected():
    """Only the head has joined (worker pods still starting, or a group at zero replicas): the
    selector stays strict so the autoscaler brings up the right group instead of the actor
    landing on whatever node has room."""
    nodes = [node({ROLE_LABEL: HEAD_ROLE})]
    assert role_selector("generator", nodes) == {ROLE_LABEL: "generator"}


def test_dead_nodes_do_not_count():
    nodes = [node({"ray.io/node-id": "a"}, CPU=2), node({ROLE_LABEL: "judge"}, alive=False)]
    assert role_selector("judge", nodes) is None


def test_unknown_role_is_an_error():
    with pytest.raises(ValueError, match="role must be one of"):
        role_selector("critic", [])


def test_selectors_are_accepted_by_ray(monkeypatch):
    """The options a factory builds with a role's selector pass Ray 2.60's own option
    validation (label syntax included), and the trainer's selector Train V2's ScalingConfig
    (as `actors.trainer.TrainerRun` passes it); nothing is scheduled."""
    from ray._common.ray_option_utils import validate_actor_options
    from ray.train import ScalingConfig

    import actors.factory as factory_mod
    from actors.factory import ActorFactory

    nodes = labelled_cluster()
    seen = {}

    class Recorder:
        def options(self, **kw):
            seen.update(kw)
            return self

        def remote(self, *args):
            return "handle"

    monkeypatch.setattr(factory_mod.ray, "remote", lambda cls: Recorder())
    ActorFactory(object, PoolConfig(num_cpus=4, num_gpus=1), (),
                 label_selector=lambda: role_selector("generator", nodes))()
    assert seen["label_selector"] == {ROLE_LABEL: "generator"}
    validate_actor_options(seen, in_options=True)
    scaling = ScalingConfig(num_workers=4, use_gpu=True,
                            label_selector=role_selector("trainer", nodes))
    assert scaling._label_selector_per_worker(4) == [{ROLE_LABEL: "trainer"}] * 4


# --------------------------------------------------------------------------- check_resources


def test_fits_on_cpu():
    c = cfg(trainer={"num_workers": 2})
    assert check_resources(c, {"CPU": 4.0}) == []


def test_pool_asking_for_gpus_on_cpu_cluster():
    c = cfg(pools={"generator": {"replicas": 4, "max_replicas": 4, "num_gpus": 1}})
    problems = check_resources(c, {"CPU": 16.0})
    assert problems == ["pools.generator asks for 4 x 1 GPU = 4 GPUs but the cluster has 0"]


def test_each_section_is_named():
    c = cfg(pools={"generator": {"replicas": 2, "num_cpus": 2},
                   "judge": {"replicas": 3, "num_cpus": 1, "num_gpus": 0.5}},
            trainer={"num_workers": 4, "use_gpu": True})
    problems = check_resources(c, {"CPU": 3.0, "GPU": 1.0})
    assert problems == [
        "pools.judge asks for 3 x 0.5 GPU = 1.5 GPUs but the cluster has 1",
        "trainer.num_workers asks for 4 x 1 GPU (trainer.use_gpu is true) = 4 GPUs "
        "but the cluster has 1",
        "pools.generator asks for 2 x 2 CPUs = 4 CPUs but the cluster has 3",
    ]


def test_sum_over_roles_is_checked():
    # Each part fits 8 GPUs; together they need 9.
    c = cfg(pools={"generator": {"replicas": 3, "num_gpus": 1},
                   "judge": {"replicas": 2, "num_gpus": 1}},
            trainer={"num_workers": 4, "use_gpu": True})
    problems = check_resources(c, {"CPU": 64.0, "GPU": 8.0})
    assert problems == ["pools.generator + pools.judge + trainer.num_workers ask for 9 GPUs "
                        "together (3 + 2 + 4) but the cluster has 8"]


def test_tensor_parallel_generators_count_one_gpu_per_rank():
    c = cfg(generator={"backend": "vllm"},
            pools={"generator": {"replicas": 2, "tensor_parallel_size": 4, "num_gpus": 1}})
    problems = check_resources(c, {"CPU": 64.0, "GPU": 4.0})
    assert problems == ["pools.generator asks for 2 x 4 GPUs (tensor_parallel_size 4) = 8 GPUs "
                        "but the cluster has 4"]


def test_tensor_parallel_generators_on_cpu_count_num_cpus_per_rank():
    """vLLM on CPU (num_gpus 0): one placement-group bundle of num_cpus per rank."""
    c = cfg(generator={"backend": "vllm", "kv_cache_gb": 0.1},
            pools={"generator": {"replicas": 2, "tensor_parallel_size": 2, "num_cpus": 2}},
            trainer={"num_workers": 1})
    assert check_resources(c, {"CPU": 10.0}) == []  # 2 x 4 + judge 1 + trainer 1
    problems = check_resources(c, {"CPU": 6.0})
    assert problems[0] == ("pools.generator asks for 2 x 4 CPUs (num_cpus 2 x "
                           "tensor_parallel_size 2) = 8 CPUs but the cluster has 6")


def test_tensor_parallel_llm_judges_count_one_gpu_per_rank():
    """An LLM judge with tensor parallelism takes one GPU per rank, as a vLLM generator does:
    alone, in the sum over roles and on the judges' own nodes."""
    from sppo.config import load_config

    c = cfg(judge={"backend": "llm"},
            pools={"judge": {"replicas": 2, "tensor_parallel_size": 2, "num_gpus": 1}})
    assert check_resources(c, {"CPU": 64.0, "GPU": 4.0}) == []
    assert check_resources(c, {"CPU": 64.0, "GPU": 3.0}) == [
        "pools.judge asks for 2 x 2 GPUs (tensor_parallel_size 2) = 4 GPUs but the cluster has 3"]
    # The shipped LLM-judge config fills 8 GPUs (4 trainer + 2 generators + 2 judges); its
    # judges at TP 2 take 4.
    llm = load_config(REPO / "configs" / "llama3-8b-llm-judge.yaml")
    assert check_resources(llm, {"CPU": 64.0, "GPU": 8.0}) == []
    tp2 = load_config(REPO / "configs" / "llama3-8b-llm-judge.yaml",
                      ["pools.judge.tensor_parallel_size=2"])
    assert check_resources(tp2, {"CPU": 64.0, "GPU": 8.0}) == [
        "pools.generator + pools.judge + trainer.num_workers ask for 10 GPUs together "
        "(2 + 4 + 4) but the cluster has 8"]
    one = cfg(judge={"backend": "llm"},
              pools={"judge": {"replicas": 1, "tensor_parallel_size": 2, "num_gpus": 1}})
    assert check_resources(one, {"CPU": 60.0, "GPU": 2.0}, labelled_cluster(gen_gpus=0)) == [
        "pools.judge.tensor_parallel_size 2 needs 2 GPUs on one node (its ranks are placed "
        "together) but the largest of the nodes labelled role=judge has 1: lower "
        "pools.judge.tensor_parallel_size to <= 1, or add nodes with more GPUs",
        "pools.judge asks for 1 x 2 GPUs (tensor_parallel_size 2) = 2 GPUs but the nodes "
        "labelled role=judge have 1"]
    # On CPU: num_cpus per rank.
    cpu = cfg(judge={"backend": "llm", "kv_cache_gb": 0.1},
              pools={"judge": {"replicas": 1, "tensor_parallel_size": 2, "num_cpus": 3}})
    assert check_resources(cpu, {"CPU": 5.0}) == [
        "pools.judge asks for 1 x 6 CPUs (num_cpus 3 x tensor_parallel_size 2) = 6 CPUs but "
        "the cluster has 5"]


def test_a_tensor_parallel_group_must_fit_one_node():
    """A TP group's ranks go on one node (STRICT_PACK): on nodes of 1 GPU each a TP=2 pool is
    refused however many such nodes there are; a node of 2 GPUs takes it."""
    c = cfg(pools={"generator": {"replicas": 1, "tensor_parallel_size": 2, "num_gpus": 1}})

    def nodes(*gpus):
        return [{"Alive": True, "Labels": {}, "Resources": {"CPU": 8.0, "GPU": float(g)}}
                for g in gpus]

    assert check_resources(c, {"CPU": 32.0, "GPU": 4.0}, nodes(1, 1, 1, 1)) == [
        "pools.generator.tensor_parallel_size 2 needs 2 GPUs on one node (its ranks are placed "
        "together) but the largest of the nodes has 1: lower "
        "pools.generator.tensor_parallel_size to <= 1, or add nodes with more GPUs"]
    assert check_resources(c, {"CPU": 16.0, "GPU": 3.0}, nodes(1, 2)) == []


def test_plan_refuses_a_tensor_parallel_size_above_the_gpus_per_node(capsys):
    from sppo.driver import main

    args = ["--plan", "--config", str(REPO / "configs" / "llama3-8b-llm-judge.yaml"),
            "pools.generator.tensor_parallel_size=2"]
    assert main(args + ["--gpus", "16", "--gpus-per-node", "1"]) == 2
    assert "pools.generator.tensor_parallel_size 2 needs 2 GPUs on one node" in \
        capsys.readouterr().err
    assert main(args + ["--gpus", "16", "--gpus-per-node", "8"]) == 0


def test_labelled_cluster_is_checked_role_by_role():
    c = cfg(pools={"generator": {"replicas": 2, "num_cpus": 4, "num_gpus": 1},
                   "judge": {"replicas": 1, "num_cpus": 4, "num_gpus": 1}},
            trainer={"num_workers": 4, "use_gpu": True})
    nodes = labelled_cluster()
    assert check_resources(c, {"CPU": 60.0, "GPU": 7.0}, nodes) == []
    # The cluster as a whole has GPUs to spare, but the judges' nodes have none.
    nodes = labelled_cluster(judge_gpus=0)
    assert check_resources(c, {"CPU": 60.0, "GPU": 6.0}, nodes) == [
        "pools.judge asks for 1 x 1 GPU = 1 GPU but the nodes labelled role=judge have 0"]
    # No trainer node at all.
    nodes = [n for n in labelled_cluster() if n["Labels"].get(ROLE_LABEL) != "trainer"]
    assert check_resources(c, {"CPU": 12.0, "GPU": 3.0}, nodes) == [
        "trainer.num_workers asks for 4 x 1 GPU (trainer.use_gpu is true) = 4 GPUs "
        "but the nodes labelled role=trainer have 0 (no such node)"]


# --------------------------------------------------------------------------- real local Ray


class Probe:
    def where(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


def test_actor_runs_without_labels_on_local_cluster(ray_cluster):
    from actors.factory import ActorFactory

    ray = ray_cluster
    assert role_selector("generator") is None  # the session cluster carries no role labels
    factory = ActorFactory(Probe, PoolConfig(num_cpus=0.1), (),
                           label_selector=lambda: role_selector("generator"))
    actor = factory()
    try:
        assert ray.get(actor.where.remote(), timeout=120) in {n["NodeID"] for n in ray.nodes()}
    finally:
        ray.kill(actor)


def test_check_resources_flags_gpus_on_local_cpu_cluster(ray_cluster):
    ray = ray_cluster
    resources = ray.cluster_resources()
    assert resources.get("GPU", 0) == 0
    c = cfg(pools={"judge": {"replicas": 2, "num_gpus": 1}})
    problems = check_resources(c, resources, ray.nodes())
    assert problems == ["pools.judge asks for 2 x 1 GPU = 2 GPUs but the cluster has 0"]
    assert check_resources(cfg(), resources, ray.nodes()) == []


# --------------------------------------------------------------------------- ray up config


def test_launcher_node_types_carry_the_roles():
    config = yaml.safe_load(LAUNCHER.read_text())
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["labels"] == {ROLE_LABEL: HEAD_ROLE}
    assert head["resources"].get("CPU") == 0, "the head runs the driver only"
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert {t["labels"][ROLE_LABEL] for t in workers.values()} == set(ROLES)
    for name, t in workers.items():
        assert t["labels"] == {ROLE_LABEL: name}
        assert 0 < t["min_workers"] <= t["max_workers"]
    assert config["max_workers"] >= sum(t["max_workers"] for t in workers.values())


def test_launcher_config_passes_ray_validation():
    """What `ray up` does before touching a cloud: fill in the provider defaults and validate
    against Ray 2.60's cluster schema (ray/autoscaler/ray-schema.json)."""
    from ray._private.label_utils import validate_node_label_syntax, validate_node_labels
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(LAUNCHER.read_text())
    validate_config(prepare_config(config))
    for t in config["available_node_types"].values():
        validate_node_label_syntax(t["labels"])
        validate_node_labels(t["labels"])  # no reserved ray.io/ prefix


def test_launcher_fits_the_reproduction_config():
    """At min_workers the node types hold configs/mistral7b-ultrafeedback.yaml role by role."""
    from sppo.config import load_config

    config = yaml.safe_load(LAUNCHER.read_text())
    nodes, totals = [], {"CPU": 0.0, "GPU": 0.0}
    for name, t in config["available_node_types"].items():
        count = 1 if name == config["head_node_type"] else t["min_workers"]
        for _ in range(count):
            nodes.append(node(t["labels"], **t["resources"]))
            for key in totals:
                totals[key] += t["resources"].get(key, 0)
    c = load_config(REPO / "configs" / "mistral7b-ultrafeedback.yaml")
    assert check_resources(c, totals, nodes) == []


def test_one_more_actor_takes_its_tensor_parallel_ranks():
    """What the autoscaler must find room for (`cluster.selfplay` passes it on): the ranks'
    GPUs on GPUs, num_cpus per rank on CPU, the pool's own figures without parallelism."""
    from cluster.placement import actor_resources

    assert actor_resources("judge", PoolConfig(num_cpus=2, num_gpus=1,
                                               tensor_parallel_size=4)) == (2, 4.0)
    assert actor_resources("generator", PoolConfig(num_cpus=2, tensor_parallel_size=2)) == (4, 0.0)
    assert actor_resources("judge", PoolConfig(num_cpus=1, num_gpus=0.5)) == (1, 0.5)
