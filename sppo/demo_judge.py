"""The embedded demo's judge: a readable preference for responses rich in the letter "e".

`prefers_more_e(prompt, a, b)` is the probability that response `a` beats `b`:
`sigmoid(SHARPNESS * (e_rate(a) - e_rate(b)))`, where `e_rate` is the fraction of a text's
letters that are "e" (case-insensitive). It ignores the prompt and word order, so a tiny random
policy can visibly learn it within a few SPPO rounds: it only has to shift probability towards
words like "tree", "evening" and "three" (see `sppo.tiny.WORDS`). Symmetric by construction,
`prefers_more_e(p, a, b) + prefers_more_e(p, b, a) == 1`, and two texts with equal rates (two
empty responses included) are a coin flip, 1/2.

Use it as `judge.backend=python judge.function=sppo.demo_judge:prefers_more_e`. Not here: any
claim that this measures quality; it is a stand-in a reader can check by eye.
"""

from __future__ import annotations

import math

__all__ = ["e_rate", "prefers_more_e", "SHARPNESS"]

# A 5-point difference in e-rate (e.g. 0.10 vs 0.15) gives P = sigmoid(1) = 0.73.
SHARPNESS = 20.0


def e_rate(text: str) -> float:
    """Fraction of the letters in `text` that are "e" or "E"; 0 for a text without letters."""
    letters = [c for c in text.lower() if c.isalpha()]
    return letters.count("e") / len(letters) if letters else 0.0


def prefers_more_e(prompt: str, a: str, b: str) -> float:
    """P(a beats b): higher for the response whose letters hold more "e"s."""
    return 1.0 / (1.0 + math.exp(-SHARPNESS * (e_rate(a) - e_rate(b))))
