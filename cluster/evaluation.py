"""Evaluation of each round's policy against the round-0 policy, on held-out prompts.

`Evaluation(generators, judges, path)`: `baseline(prompts)` has pi_0 answer the held-out prompts
once (saved to `eval_baseline.jsonl`, so a resumed run reuses them), and after every round
`win_rate()` has the current generators answer them again and the judges compare each current
response with each baseline one (`sppo.evaluate`: the cross win rate, averaged over prompts
with a 95% interval).

Not here: the maths (`sppo.evaluate`), the pools (`actors/`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Optional

from sppo.evaluate import WinRate, cross_win_rate, merge_for_eval, summarize
from sppo.records import Annotated, Generation, Prompt

__all__ = ["Evaluation"]

log = logging.getLogger("sppo.driver")


class Evaluation:
    """Win rates against round 0 on held-out prompts; `path` is the run's
    `eval_baseline.jsonl`."""

    def __init__(self, generators: Any, judges: Any, path: Path):
        self.generators, self.judges, self.path = generators, judges, Path(path)
        self.responses: dict[str, Generation] = {}  # pi_0's, by prompt id

    def baseline(self, prompts: list[Prompt], *, resumed: bool = False) -> dict[str, Generation]:
        """pi_0's responses to `prompts`: read back from the run directory when saved there,
        else generated now (by the current generators: on a resumed run without saved ones,
        the resumed policy, said in a warning) and saved."""
        if self.path.is_file():
            self.responses = {g.prompt.id: g for g in map(_generation, map(
                json.loads, self.path.read_text().splitlines()))}
            return self.responses
        if resumed:
            log.warning("no saved round-0 responses: evaluation is against the resumed policy")
        self.responses = self._generate(prompts) if prompts else {}
        self.path.write_text("".join(json.dumps(dataclasses.asdict(g)) + "\n"
                                     for g in self.responses.values()))
        return self.responses

    def win_rate(self) -> Optional[WinRate]:
        """The current generators' policy against pi_0 on the held-out prompts; None without
        any."""
        if not self.responses:
            return None
        current = self._generate([g.prompt for g in self.responses.values()])
        merged = [merge_for_eval(current[pid], base) for pid, base in self.responses.items()
                  if pid in current]
        self.judges.submit(merged)
        per_prompt = [cross_win_rate(rec.probs, len(rec.probs) // 2)
                      for rec in self.judges.drain() if isinstance(rec, Annotated)]
        return summarize(per_prompt)

    def _generate(self, prompts: list[Prompt]) -> dict[str, Generation]:
        self.generators.submit(prompts)
        out = {}
        for rec in self.generators.drain():
            if isinstance(rec, Generation):
                out[rec.prompt.id] = rec
            else:
                log.warning("evaluation prompt %s failed: %s", rec.prompt_id, rec.reason)
        return out


def _generation(d: dict) -> Generation:
    p = d["prompt"]
    prompt = Prompt(id=p["id"], text=p["text"], token_ids=tuple(p["token_ids"]), raw=p["raw"],
                    reference=p.get("reference"))
    return Generation(prompt=prompt, response_ids=d["response_ids"], texts=d["texts"],
                      finish_reasons=d["finish_reasons"], logprobs=d.get("logprobs"),
                      weight_version=d.get("weight_version", 0))
