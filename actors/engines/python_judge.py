"""A user's Python function as a pairwise judge (rule-based preferences, experiments, the demo).

The function is named by a dotted path, `package.module:function` or `package.module.function`,
and called as `f(prompt: str, a: str, b: str) -> float`: the probability that response `a` beats
`b` (`returns="probability"`, turned into a logit `log(p / (1 - p))` with p clipped to
[1e-6, 1 - 1e-6]) or that logit directly (`returns="logit"`). It is called once per ordered pair,
`a` shown first, so a position-biased function behaves like PairRM does. A NaN it returns is
passed on (the judge reports the prompt as failed); a probability outside [0, 1] is an error.

Not here: the preference maths (`sppo.preference`) and Ray (`actors.judge`).
"""

from __future__ import annotations

import importlib
import math
from typing import Callable, Literal

import numpy as np

__all__ = ["PythonJudgeEngine", "resolve_function"]

_EPS = 1e-6  # probability clip: logits stay within about +-13.8


def resolve_function(path: str) -> Callable[[str, str, str], float]:
    """The callable at `pkg.mod:func` (attribute path after the colon may be dotted) or
    `pkg.mod.func`. Errors name the path and what was missing."""
    if ":" in path:
        module_name, attr = path.split(":", 1)
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"judge function {path!r}: expected 'package.module:function' "
                         "or 'package.module.function'")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"judge function {path!r}: cannot import module {module_name!r}: "
                          f"{exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            owner = getattr(obj, "__name__", type(obj).__name__)
            raise ImportError(f"judge function {path!r}: {owner!r} has no attribute {part!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"judge function {path!r} is a {type(obj).__name__}, not a callable")
    return obj


class PythonJudgeEngine:
    def __init__(self, function: str, returns: Literal["probability", "logit"] = "probability"):
        if returns not in ("probability", "logit"):
            raise ValueError(f"returns must be 'probability' or 'logit', got {returns!r}")
        self.path = function
        self.returns = returns
        self.function = resolve_function(function)

    def _logit(self, prompt: str, a: str, b: str) -> float:
        value = float(self.function(prompt, a, b))
        if self.returns == "logit" or math.isnan(value):
            return value
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"judge function {self.path!r} returned {value!r}, "
                             "not a probability in [0, 1]")
        p = min(max(value, _EPS), 1.0 - _EPS)
        return math.log(p / (1.0 - p))

    def logits(self, prompts: list[str], candidates: list[list[str]]) -> list[np.ndarray]:
        """Per prompt a (K, K) float32 matrix of l_ij for every i != j; diagonal 0."""
        out = []
        for prompt, cands in zip(prompts, candidates, strict=True):
            m = np.zeros((len(cands), len(cands)), dtype=np.float32)
            for i, a in enumerate(cands):
                for j, b in enumerate(cands):
                    if i != j:
                        m[i, j] = self._logit(prompt, a, b)
            out.append(m)
        return out

    def pair_logits(self, prompts: list[str], a: list[str], b: list[str]) -> np.ndarray:
        """(N,) logits that a[n] beats b[n] for prompts[n], a shown first."""
        return np.array([self._logit(p, x, y) for p, x, y in zip(prompts, a, b, strict=True)],
                        dtype=np.float32)
