"""actors/stream.py: the bounded stream and control line between producers, driver, trainer.

Most tests drive the plain asyncio class directly (it is the actor's whole logic); the last one
runs it as a Ray actor with a producer blocked across processes.
"""

from __future__ import annotations

import asyncio

import pytest

from actors.stream import RoundResult, TrainStream, create_stream
from actors.weights import HandOffResult
from sppo.records import TrainRow


def _rows(n: int, start: int = 0, pair: bool = True, ref: bool = False) -> list[TrainRow]:
    return [TrainRow(prompt_id=f"p{i}", prompt_ids=[1, 2], chosen_ids=[3] * (1 + i % 3),
                     chosen_p=0.6, rejected_ids=[4] if pair else [], rejected_p=0.4,
                     chosen_ref_logp=-1.0 if ref else None,
                     rejected_ref_logp=-2.0 if ref else None)
            for i in range(start, start + n)]


def _stream(**kw) -> TrainStream:
    args = dict(world_size=2, global_batch_size=4, buffer_rows=8, epochs=1, max_length=16,
                selection="pair", reference="frozen", seed=0)
    args.update(kw)
    return TrainStream(**args)


async def _drain(s: TrainStream, t: int, world: int = 2, generation: int = 1):
    """Fetch every step for every rank the way workers do; returns per-step per-rank ids."""
    steps, step = [], 0
    while True:
        slices = await asyncio.gather(*(s.next_step(t, r, step, generation)
                                        for r in range(world)))
        if all(x is None for x in slices):
            return steps
        assert not any(x is None for x in slices), "ranks disagree about the end of the round"
        assert len({len(x.rows) for x in slices}) == 1, "unequal slices"
        assert all(x.global_rows == world * len(x.rows) for x in slices)
        steps.append([[row.prompt_id for row in x.rows] for x in slices])
        step += 1


def test_round_with_uneven_tail_ends_cleanly_and_counts_add_up():
    async def main():
        s = _stream()
        gen, resume = await s.attach()
        assert (gen, resume) == (1, None)
        await s.begin_round(0, expected_rows=11)
        assert await s.wait_round(0) is not None
        await s.put(0, _rows(8))
        drain = asyncio.create_task(_drain(s, 0))
        await s.put(0, _rows(3, start=8))
        await s.end_round(0)
        steps = await drain
        assert [sum(len(r) for r in st) for st in steps] == [4, 4, 2]
        trained = [pid for st in steps for rank in st for pid in rank]
        assert len(trained) == len(set(trained)) == 10  # no row twice
        # arrival order: the tail step holds p8, p9; p10 is the remainder
        assert sorted(trained) == sorted(f"p{i}" for i in range(10))
        counts = await s.round_counts(0)
        assert counts == {"rows_put": 11, "rows_trained": 10, "carried_over": 0,
                          "dropped": {"remainder_after_even_split": 1}, "truncated": 0,
                          "steps": 3}
    asyncio.run(main())


def test_put_blocks_while_the_buffer_is_full_and_is_not_stalled():
    """A put waiting for room is a producer at work: the round is not reported as stalled
    until the put is done and nothing else comes (see `stalled` below)."""
    async def main():
        s = _stream(buffer_rows=4)
        await s.attach()
        await s.begin_round(0, 6)
        put = asyncio.create_task(s.put(0, _rows(6)))
        await asyncio.sleep(0.05)
        assert not put.done() and (await s.status())["buffered"] == 4
        assert await s.stalled(0, idle_s=0) is None  # the producer is at work, only blocked
        await asyncio.gather(s.next_step(0, 0, 0, 1), s.next_step(0, 1, 0, 1))  # frees 4
        await asyncio.wait_for(put, 1)
        assert (await s.status())["buffered"] == 2
        why = await s.stalled(0, idle_s=0)
        assert why.startswith("round 0 cannot finish: end_round(0) was never called (6 rows "
                              "put, 2 buffered; no trainer rank waiting for rows yet)"), why
    asyncio.run(main())


def test_buffer_smaller_than_a_global_batch_is_refused():
    with pytest.raises(ValueError, match="buffer_rows"):
        _stream(buffer_rows=3)
    with pytest.raises(ValueError, match="multiple"):
        _stream(global_batch_size=5)


def test_later_epochs_repeat_the_trained_rows_once_each():
    async def main():
        s = _stream(epochs=3)
        await s.attach()
        await s.begin_round(0, 6)
        await s.put(0, _rows(7))
        await s.end_round(0)
        steps = await _drain(s, 0)
        ids = [pid for st in steps for rank in st for pid in rank]
        assert len(ids) == 18 and all(ids.count(f"p{i}") == 3 for i in range(6))
        assert (await s.round_counts(0))["rows_trained"] == 6
    asyncio.run(main())


def test_rows_that_cannot_fit_are_dropped_with_reasons():
    async def main():
        s = _stream(max_length=4, reference="sampled")
        await s.attach()
        await s.begin_round(0, 3)
        long = _rows(3, ref=True)  # chosen lengths 1, 2, 3 after a 2-token prompt
        await s.put(0, long + _rows(1, pair=False, ref=True))
        counts = await s.round_counts(0)
        assert counts["dropped"] == {"too_long_for_sampled_reference": 1, "not_a_pair": 1}
        with pytest.raises(ValueError, match="reference"):
            await s.put(0, _rows(1))  # sampled reference needs the generator's log-probs
        await s.end_round(0)
        with pytest.raises(RuntimeError, match="end_round"):
            await s.put(0, _rows(1, ref=True))
    asyncio.run(main())


def test_restarted_workers_rewind_the_round_and_stale_calls_are_refused():
    async def main():
        s = _stream()
        await s.attach()
        await s.begin_round(0, 8)
        await s.put(0, _rows(8))
        await s.end_round(0)
        first = await asyncio.gather(s.next_step(0, 0, 0, 1), s.next_step(0, 1, 0, 1))
        await s.next_step(0, 0, 1, 1)  # rank 0 prefetched step 1, then the group died
        gen, resume = await s.attach()  # the new group resumes before round 0
        assert (gen, resume) == (2, None)
        with pytest.raises(RuntimeError, match="stale"):
            await s.next_step(0, 1, 1, 1)
        steps = await _drain(s, 0, generation=2)
        assert steps[0] == [[r.prompt_id for r in x.rows] for x in first]
        assert sorted(pid for st in steps for rank in st for pid in rank) == \
            sorted(f"p{i}" for i in range(8))
        assert (await s.round_counts(0))["rows_trained"] == 8
    asyncio.run(main())


def test_handed_over_wakes_the_driver_and_checkpoint_done_moves_the_resume_point():
    """The two steps of a round's end: handed over (the driver goes on, the next round may
    begin), then checkpointed (the resume point moves). A group that restarts in between
    resumes from the round before and trains the round again for its checkpoint only."""
    async def main():
        s = _stream()
        await s.attach()
        await s.begin_round(0, 8)
        waiter = asyncio.create_task(s.wait_round_done(0))
        await s.put(0, _rows(8))
        await s.end_round(0)
        assert len(await _drain(s, 0)) == 2
        with pytest.raises(RuntimeError, match="still running"):
            await s.begin_round(1, 0)
        with pytest.raises(RuntimeError, match="before the round was handed over"):
            await s.checkpoint_done(0, {"path": "/ckpt/round-0"})
        await s.log_step(0, {"loss": 1.0})
        await s.handed_over(RoundResult(0, {"loss_mean": 1.0}, HandOffResult(),
                                        "/ckpt/round-0"))
        assert (await asyncio.wait_for(waiter, 1)).checkpoint_path == "/ckpt/round-0"
        assert await s.step_metrics(0) == [{"loss": 1.0}]
        await s.begin_round(1, 4)  # round 1 samples while round 0's checkpoint is written
        assert await s.checkpoint_info(0) is None
        await s.put(1, _rows(4, start=100))
        # The group dies while writing: the next one starts from the base model, trains round
        # 0 again (all its rows, for its checkpoint only: no second hand-off), then round 1.
        assert await s.attach() == (2, None)
        spec = await s.wait_round(0)
        assert spec.round_index == 0 and not spec.hand_off
        assert sorted(pid for st in await _drain(s, 0, generation=2) for rank in st
                      for pid in rank) == sorted(f"p{i}" for i in range(8))
        assert await s.round_redone(0) == {"worker_restarts": 1, "steps_redone": 2,
                                           "rows_redone": 8}
        written = asyncio.create_task(s.wait_checkpoint(0))
        await s.checkpoint_done(0, {"path": "/ckpt/round-0", "hf_write_s": 1.0})
        assert (await asyncio.wait_for(written, 1))["worker_restarts"] == 1
        assert (await s.wait_round(1)).hand_off
        # Another restart now resumes from round 0's checkpoint and redoes round 1 only.
        assert await s.attach() == (3, (0, "/ckpt/round-0"))
        with pytest.raises(RuntimeError, match="already handed to every rank"):
            await s.next_step(0, 0, 0, 3)  # round 0's rows are gone with its checkpoint
        await s.end_round(1)
        assert len(await _drain(s, 1, generation=3)) == 1
        next_round = asyncio.create_task(s.wait_round(2))
        await asyncio.sleep(0.01)
        await s.finish()
        assert await asyncio.wait_for(next_round, 1) is None
    asyncio.run(main())


def test_a_trainer_expecting_another_round_than_the_driver_runs_fails_loudly():
    async def main():
        s = _stream()
        await s.mark_done(1, "/runs/x/train/round-1")  # resumed after round 1 of an earlier job
        assert (await s.attach())[1] == (1, "/runs/x/train/round-1")
        waiting = asyncio.create_task(s.wait_round(2))
        await s.begin_round(3, 4)  # but the driver skips a round
        with pytest.raises(RuntimeError, match="expects round 2"):
            await asyncio.wait_for(waiting, 1)
    asyncio.run(main())


def test_abort_unblocks_producers_and_the_driver():
    async def main():
        s = _stream(buffer_rows=4)
        await s.attach()
        await s.begin_round(0, 6)
        put = asyncio.create_task(s.put(0, _rows(6)))
        done = asyncio.create_task(s.wait_round_done(0))
        await asyncio.sleep(0.01)
        await s.abort("WorkerGroupError: boom")
        for task in (put, done):
            with pytest.raises(RuntimeError, match="boom"):
                await asyncio.wait_for(task, 1)
    asyncio.run(main())


def test_ray_actor_blocks_a_producer_until_workers_take_rows(ray_cluster):
    ray = ray_cluster
    s = create_stream(world_size=2, global_batch_size=2, buffer_rows=2, epochs=1,
                      max_length=16, selection="pair", reference="frozen")
    gen, _ = ray.get(s.attach.remote())
    ray.get(s.begin_round.remote(0, 4))
    put = s.put.remote(0, _rows(4))
    ready, _ = ray.wait([put], timeout=0.5)
    assert not ready  # 4 rows into a buffer of 2
    a = ray.get([s.next_step.remote(0, r, 0, gen) for r in range(2)])
    ray.get(put, timeout=10)
    ray.get(s.end_round.remote(0))
    b = ray.get([s.next_step.remote(0, r, 1, gen) for r in range(2)])
    end = ray.get([s.next_step.remote(0, r, 2, gen) for r in range(2)])
    assert [len(x.rows) for x in a + b] == [1, 1, 1, 1] and end == [None, None]
    ray.kill(s)


def test_restart_counts_what_was_redone_and_a_step_asked_twice_is_an_error():
    async def main():
        s = _stream()
        await s.attach()
        await s.begin_round(0, 8)
        await s.put(0, _rows(8))
        await s.end_round(0)
        await asyncio.gather(s.next_step(0, 0, 0, 1), s.next_step(0, 1, 0, 1))  # step 0 out
        with pytest.raises(RuntimeError, match="already handed"):
            await s.next_step(0, 0, 0, 1)  # would otherwise form steps forever
        assert await s.round_redone(0) == {"worker_restarts": 0, "steps_redone": 0,
                                           "rows_redone": 0}
        await s.attach()  # the group died after step 0: it is trained again
        assert await s.round_redone(0) == {"worker_restarts": 1, "steps_redone": 1,
                                           "rows_redone": 4}
        await _drain(s, 0, generation=2)
        assert (await s.round_counts(0))["rows_trained"] == 8
    asyncio.run(main())


def test_a_resumed_job_resumes_the_trainer_from_the_round_marked_done():
    """`--resume` after round 1: the driver marks round 1 done with its checkpoint; the
    trainer resumes from it and waits for round 2."""
    async def main():
        s = _stream()
        await s.mark_done(1, "/runs/x/train/round-1")
        assert await s.attach() == (1, (1, "/runs/x/train/round-1"))
        waiter = asyncio.create_task(s.wait_round(2))
        await s.begin_round(2, 0)
        assert (await asyncio.wait_for(waiter, 1)).round_index == 2
        with pytest.raises(RuntimeError, match="after round 2 began"):
            await s.mark_done(1, "/elsewhere")
    asyncio.run(main())


def test_a_round_nobody_ends_is_reported_as_stalled_and_can_still_finish():
    """The hang of a driver that waits for a round it never ended: the rows are in, the ranks
    wait for the tail step, only `end_round` can release them. `stalled` names that (after the
    producers' idle time); a waiter created before `end_round` is still served once it comes."""
    async def main():
        s = _stream()
        await s.attach()
        await s.begin_round(0, 5)
        waiter = asyncio.create_task(s.wait_round_done(0))
        await s.put(0, _rows(5))
        await asyncio.gather(s.next_step(0, 0, 0, 1), s.next_step(0, 1, 0, 1))  # 4 rows
        tail = [asyncio.create_task(s.next_step(0, r, 1, 1)) for r in range(2)]
        await asyncio.sleep(0.1)
        assert await s.stalled(0, idle_s=60) is None  # a producer may still come
        why = await s.stalled(0, idle_s=0.05)
        assert why.startswith("round 0 cannot finish: end_round(0) was never called (5 rows "
                              "put, 1 buffered; trainer ranks 0, 1 waiting for step 1) and no "
                              "producer has put rows for 0.1 s"), why
        assert not waiter.done() and not any(t.done() for t in tail)
        await s.end_round(0)
        assert await s.stalled(0, idle_s=0) is None
        assert await asyncio.wait_for(asyncio.gather(*tail), 1) == [None, None]  # 1 row dropped
        await s.handed_over(RoundResult(0, {}, HandOffResult(), "/ckpt/round-0"))
        assert (await asyncio.wait_for(waiter, 1)).checkpoint_path == "/ckpt/round-0"
        assert await s.stalled(0, idle_s=0) is None
    asyncio.run(main())


def test_waits_for_what_can_no_longer_come_raise():
    """Broadcast targets of a round that is over, and a round after `finish`, are never coming:
    rank 0 gets an error (or None, the end of rounds) instead of waiting forever."""
    async def main():
        s = _stream()
        await s.attach()
        await s.begin_round(0, 0)
        early = asyncio.create_task(s.sync_targets(0))  # before the driver names them: waits
        await asyncio.sleep(0.01)
        await s.set_sync_targets(0, ["g0", "g1"])
        assert await asyncio.wait_for(early, 1) == ["g0", "g1"]
        waiting = asyncio.create_task(s.sync_targets(1))  # round 1: never named, never begun
        await s.end_round(0)
        await _drain(s, 0)
        await s.handed_over(RoundResult(0, {}, HandOffResult(), "/ckpt/round-0"))
        with pytest.raises(RuntimeError, match="round 0 is already done"):
            await asyncio.wait_for(s.sync_targets(0), 1)
        await s.begin_round(2, 0)  # the driver skips round 1
        with pytest.raises(RuntimeError, match="round 1 was skipped: the driver began round 2"):
            await asyncio.wait_for(waiting, 1)
        late = asyncio.create_task(s.sync_targets(2))
        await s.end_round(2)
        await _drain(s, 2, generation=1)
        await s.handed_over(RoundResult(2, {}, HandOffResult(), "/ckpt/round-2"))
        with pytest.raises(RuntimeError, match="no broadcast targets will be named for round 2"):
            await asyncio.wait_for(late, 1)
        await s.finish()
        with pytest.raises(RuntimeError, match="finished and round 3 was never begun"):
            await asyncio.wait_for(s.sync_targets(3), 1)
        assert await asyncio.wait_for(s.wait_round(3), 1) is None  # no more rounds
    asyncio.run(main())
