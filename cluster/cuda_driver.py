"""The NVIDIA driver of each GPU node against the CUDA that torch was built for, before any actor.

torch's CUDA build runs only on a driver that supports its CUDA version (torch 2.14.0 from PyPI
is built for CUDA 13.0: driver >= 580). A node with an older driver fails late and obscurely
(the first CUDA call of a vLLM worker or a trainer rank), so the driver process checks first:
`driver_problem()` in this process (when it sees an NVIDIA driver) and `check_gpu_nodes()` on
every live node with GPUs, through a zero-CPU Ray task pinned to the node.

The driver's CUDA version is read from `libcuda.so.1` (`cuDriverGetVersion`, 1000 x major + 10 x
minor), else from `/proc/driver/nvidia/version` (the kernel module's version, mapped to the
newest CUDA it supports by NVIDIA's minimum-driver table). The message names both versions.
Not run on a GPU: the tests feed it driver versions.

Not here: which roles use GPUs (`sppo.plan.gpu_roles`).
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path
from typing import Callable, Optional

__all__ = ["driver_cuda_version", "driver_problem", "check_gpu_nodes"]

# Minimum Linux driver per CUDA major.minor (NVIDIA's CUDA toolkit release notes, table 3).
_MIN_DRIVER = [((13, 0), 580), ((12, 8), 570), ((12, 6), 560), ((12, 4), 550), ((12, 2), 535),
               ((12, 1), 530), ((12, 0), 525), ((11, 8), 520)]
_PROC_VERSION = Path("/proc/driver/nvidia/version")


def _from_libcuda() -> Optional[tuple[int, int]]:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    if lib.cuDriverGetVersion(ctypes.byref(version)) != 0 or version.value <= 0:
        return None
    return version.value // 1000, (version.value % 1000) // 10


def _from_proc(path: Path = _PROC_VERSION) -> Optional[tuple[int, int]]:
    try:
        text = path.read_text()
    except OSError:
        return None
    match = re.search(r"Kernel Module(?: for \w+)?\s+(\d+)\.\d+", text)
    if not match:
        return None
    driver = int(match.group(1))
    for cuda, minimum in _MIN_DRIVER:
        if driver >= minimum:
            return cuda
    return (11, 0)


def driver_cuda_version(readers: Optional[list[Callable[[], Optional[tuple[int, int]]]]] = None
                        ) -> Optional[tuple[int, int]]:
    """The newest CUDA (major, minor) this machine's NVIDIA driver supports; None when there
    is no NVIDIA driver."""
    for read in readers or (_from_libcuda, _from_proc):
        version = read()
        if version is not None:
            return version
    return None


def driver_problem(torch_cuda: Optional[str] = None,
                   have: Optional[tuple[int, int]] = None) -> Optional[str]:
    """Why torch's CUDA build cannot run on this machine's driver, or None (it can, or there is
    no driver or no CUDA build: nothing to check). `torch_cuda` defaults to
    `torch.version.cuda`, `have` to `driver_cuda_version()`."""
    if torch_cuda is None:
        import torch

        torch_cuda = torch.version.cuda
    if not torch_cuda:  # a CPU build of torch
        return None
    have = have if have is not None else driver_cuda_version()
    if have is None:
        return None
    need = tuple(int(x) for x in torch_cuda.split(".")[:2])
    if have >= need:
        return None
    minimum = next((m for cuda, m in _MIN_DRIVER if cuda <= need), None)
    return (f"torch is built for CUDA {torch_cuda} but this node's NVIDIA driver supports CUDA "
            f"{have[0]}.{have[1]} at most: upgrade the driver"
            + (f" to >= {minimum}" if minimum else "")
            + f" or use an image whose torch is built for CUDA {have[0]}.{have[1]}")


def check_gpu_nodes(nodes: list[dict]) -> list[str]:
    """`driver_problem()` on every live node of `nodes` (`ray.nodes()`) that has GPUs, each as
    a zero-CPU Ray task pinned to the node; problems are prefixed with the node's address."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def probe() -> Optional[str]:
        return driver_problem()

    gpu_nodes = [n for n in nodes if n.get("Alive", True)
                 and (n.get("Resources") or {}).get("GPU", 0) > 0]
    refs = {n.get("NodeManagerAddress", n["NodeID"]): probe.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
        for n in gpu_nodes}
    problems = []
    for where, ref in refs.items():
        problem = ray.get(ref, timeout=120)
        if problem:
            problems.append(f"GPU node {where}: {problem}")
    return problems
