"""cluster/cuda_driver.py: torch's CUDA against the NVIDIA driver, before any actor starts.

No GPU here: the driver's version is fed in (as `cuDriverGetVersion` or the kernel module's
`/proc/driver/nvidia/version` would give it) and the Ray check runs on the session's cluster,
whose one node has no GPU.
"""

from __future__ import annotations

from cluster.cuda_driver import _from_proc, check_gpu_nodes, driver_cuda_version, driver_problem


def test_an_old_driver_is_named_with_both_versions():
    problem = driver_problem("13.0", (12, 8))
    assert problem == ("torch is built for CUDA 13.0 but this node's NVIDIA driver supports "
                       "CUDA 12.8 at most: upgrade the driver to >= 580 or use an image whose "
                       "torch is built for CUDA 12.8")
    assert driver_problem("13.0", (13, 0)) is None and driver_problem("12.8", (13, 0)) is None
    assert driver_problem("", (12, 0)) is None  # a CPU build of torch: nothing to check


def test_no_driver_means_nothing_to_check():
    assert driver_cuda_version([lambda: None, lambda: None]) is None
    if driver_cuda_version() is None:  # this machine: no NVIDIA driver
        assert driver_problem("13.0") is None


def test_the_kernel_module_version_maps_to_the_newest_cuda_it_supports(tmp_path):
    f = tmp_path / "version"
    f.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  575.57.08  Sat May 24 2025\n"
                 "GCC version:  gcc version 12.3.0\n")
    assert _from_proc(f) == (12, 8)
    f.write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release\n")
    assert _from_proc(f) == (13, 0)
    assert _from_proc(tmp_path / "missing") is None
    assert driver_cuda_version([lambda: None, lambda: _from_proc(f)]) == (13, 0)


def test_the_cluster_check_runs_on_gpu_nodes_only(ray_cluster):
    nodes = ray_cluster.nodes()
    assert check_gpu_nodes(nodes) == []  # no node here has a GPU: nothing is probed
    fake = [{**n, "Resources": {**n["Resources"], "GPU": 1.0}} for n in nodes]
    assert check_gpu_nodes(fake) == []  # probed (a task pinned to it): no driver, no problem
