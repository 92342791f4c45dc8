"""The demo's judge slowed down, for end-to-end tests that need a window to stop something in
(`judge.function=judges:slow_prefers_more_e`); a module of its own so that the judge actors of
a test's Ray cluster import it without importing any test module."""

from __future__ import annotations

import time

from sppo.demo_judge import prefers_more_e


def slow_prefers_more_e(prompt: str, a: str, b: str) -> float:
    """The demo judge, slowed to ~0.2 s per batch of 4 prompts (12 ordered pairs each), so a
    judge call is still running when a test kills its actor."""
    time.sleep(0.004)
    return prefers_more_e(prompt, a, b)


def slower_prefers_more_e(prompt: str, a: str, b: str) -> float:
    """~4 s of judging per round of 16 prompts: a window to stop the driver in."""
    time.sleep(0.02)
    return prefers_more_e(prompt, a, b)
