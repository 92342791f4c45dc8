"""What the control service sees of a running job: a `JobView` the self-play loop publishes.

The loop (`cluster.selfplay.SelfPlay`) replaces its view, never mutates it, whenever what it
shows changes (a stage starts, the round's progress moves, a round is recorded); the service's
threads read the latest one (`SelfPlay.view()`) without touching the loop's own state. The parts
set once at start-up (the pools, the trainer stream, the tokenizer) are in the view too: the
pools are thread-safe (`actors.pool.Pool`), the stream is a Ray actor handle.

Not here: HTTP (`cluster.service`), what the service does with the view (`cluster.control`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["JobView"]


@dataclass(frozen=True)
class JobView:
    """The job as of its last change. `completed_rounds`: rounds whose weights reached the
    generators; `checkpointed_rounds`: those whose checkpoint is also complete (where
    `--resume` continues); `progress`: the round in progress's counts
    (`cluster.pipeline.RoundPipeline`'s progress dict), None before the first round;
    `last_report`: the latest round report this session wrote, None before."""

    stage: str = "starting"
    round: Optional[int] = None
    completed_rounds: int = 0
    checkpointed_rounds: int = 0
    progress: Optional[dict] = None
    last_report: Optional[dict] = None
    generators: Any = None  # actors.generator.GeneratorPool, once started
    judges: Any = None  # actors.judge.JudgePool, once started
    stream: Any = None  # the trainer stream's actor handle, once started
    tokenizer: Any = None  # the policy's tokenizer, once loaded
