"""The round journal (`sppo.journal`), its export (`sppo.export`) and the metric sinks
(`sppo.tracking`); then, end to end against a cluster of their own, the driver SIGKILLed mid-round
and `--resume`d from the journal, and a run trained from a journal (`data.from_journal`).

Unit tests write records built here (no Ray). The end-to-end test runs the demo's loop (tiny
Llama, a slowed demo judge, two FSDP2 workers) as `python -m sppo.driver` subprocesses, with a
global batch that holds the whole round: the round is one optimizer step, and a mean over rows
does not depend on their order, so a resumed round (journaled rows first) must end within
float rounding of an uninterrupted one, and a run trained from the journal exactly like it.
It is also the test of `--resume` after a driver stopped between rounds, or after the trainer
checkpointed a round the driver did not record (one set of driver runs checks all three: each
costs a trainer start).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sppo.config import load_config
from sppo.export import main as export_main
from sppo.journal import (JournalError, JournalWriter, annotated_of, check_fingerprint,
                          failed_of, fingerprint, read_round, rows_of)
from sppo.records import Annotated, Failed, Generation, Prompt
from sppo.rows import rows_from_annotated
from sppo.tiny import resolve_model_path
from sppo.tracking import TrackerError, Trackers

REPO = Path(__file__).resolve().parents[2]


def annotated(pid: str, win_rates: list[float], logprobs=None) -> Annotated:
    k = len(win_rates)
    prompt = Prompt(id=pid, text=f"<user>{pid}</user>", token_ids=(1, 2, len(pid)), raw=pid)
    gen = Generation(prompt=prompt, response_ids=[[10 + i, 20 + i][: 1 + i % 2] for i in range(k)],
                     texts=[f"response {i} of {pid}" for i in range(k)],
                     finish_reasons=["stop", "length"][:1] * k, logprobs=logprobs,
                     weight_version=3)
    probs = [[0.5 if i == j else 0.5 + (win_rates[i] - win_rates[j]) / 2 for j in range(k)]
             for i in range(k)]
    return Annotated(generation=gen, logits=[[0.1 * (i - j) for j in range(k)] for i in range(k)],
                     probs=probs, win_rates=list(win_rates))


def records():
    a = annotated("p0", [0.2, 0.7, 0.5], logprobs=[-1.0, -2.5, -3.0])
    b = annotated("p1", [0.6, 0.4])
    c = annotated("p2", [0.5, 0.5])  # no preference
    f = Failed("p3", "generate", "empty responses: 1 of 2 responses have no tokens")
    return [(a, rows_from_annotated(a, "pair")), (b, rows_from_annotated(b, "all")),
            (c, rows_from_annotated(c, "pair")), (f, [])]


def write(directory: Path, recs, chunk: int = 2) -> JournalWriter:
    w = JournalWriter(directory, round=0, judge="python:j", meta={"x": 1},
                      prompts={"p3": Prompt(id="p3", text="<user>p3</user>", token_ids=(1,),
                                            raw="p3")}, chunk_prompts=chunk)
    for rec, rows in recs:
        w.record(rec, rows)
    return w


def test_records_read_back_exactly_in_chunks(tmp_path):
    recs = records()
    w = write(tmp_path, recs)
    w.flush()
    assert [p.name for p in sorted(tmp_path.glob("part-*.parquet"))] == \
        ["part-00000.parquet", "part-00001.parquet"]
    assert not list(tmp_path.glob(".*.tmp"))
    journal = read_round(tmp_path)
    assert [r["prompt_id"] for r in journal.rows] == ["p0", "p1", "p2", "p3"]
    for (rec, rows), row in zip(recs, journal.rows):
        if isinstance(rec, Failed):
            assert failed_of(row) == rec and row["prompt_text"] == "<user>p3</user>"
        else:
            assert annotated_of(row) == rec
            assert rows_of(row) == rows  # ids, targets and sampled log-probs
    assert journal.counts() == {"prompts": 4, "annotated": 3, "failed": 1, "rows": 1 + 2 + 1}

    import datasets
    import pandas

    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "*.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf-cache"))
    assert ds.num_rows == 4 and ds[0]["probs"] == recs[0][0].probs
    assert list(pandas.read_parquet(tmp_path / "part-00000.parquet").prompt_id) == ["p0", "p1"]


def test_a_crash_loses_only_the_chunk_in_memory(tmp_path):
    w = write(tmp_path, records()[:3], chunk=2)  # p2 is buffered, never flushed
    (tmp_path / ".part-00001.parquet.tmp").write_bytes(b"PAR1 half a file")  # died mid-write
    del w
    assert read_round(tmp_path).ids() == {"p0", "p1"}
    # A new writer (the resumed round) continues after the finished part.
    w2 = write(tmp_path, records()[2:], chunk=10)
    w2.flush()
    assert w2.files[0].name == "part-00001.parquet"
    assert read_round(tmp_path).ids() == {"p0", "p1", "p2", "p3"}


def test_a_corrupt_chunk_is_named_and_refused_or_skipped(tmp_path):
    write(tmp_path, records(), chunk=2)
    bad = tmp_path / "part-00000.parquet"
    bad.write_bytes(bad.read_bytes()[:-30])  # truncated: no footer
    with pytest.raises(JournalError, match="part-00000.parquet"):
        read_round(tmp_path)
    journal = read_round(tmp_path, on_corrupt="skip")
    assert journal.ids() == {"p2", "p3"}
    assert journal.skipped and journal.skipped[0][0] == str(bad)
    assert not bad.exists() and (tmp_path / "part-00000.parquet.corrupt").exists()
    assert read_round(tmp_path).ids() == {"p2", "p3"}  # never read again


def test_a_chunk_without_the_schema_is_corrupt(tmp_path):
    import pyarrow as pa

    pq.write_table(pa.table({"prompt_id": ["x"]}), tmp_path / "part-00000.parquet")
    with pytest.raises(JournalError, match="missing columns"):
        read_round(tmp_path)


def test_a_prompt_in_two_chunks_is_refused(tmp_path):
    recs = records()
    write(tmp_path, [recs[0], recs[1]], chunk=2)
    write(tmp_path, [recs[0], recs[2]], chunk=2)
    with pytest.raises(JournalError, match="'p0' is journaled twice"):
        read_round(tmp_path)


def test_a_journal_of_another_config_is_refused_naming_what_differs(tmp_path):
    cfg = load_config(None, [])
    write(tmp_path, records())  # meta {"x": 1}
    (tmp_path / "meta.json").write_text(json.dumps(
        {"fingerprint": fingerprint(cfg, ["a", "b"])}))
    check_fingerprint(tmp_path, fingerprint(cfg, ["b", "a"]))  # same values: accepted
    other = load_config(None, ["sampling.k=3", "judge.function=sppo.demo_judge:other"])
    with pytest.raises(JournalError) as exc:
        check_fingerprint(tmp_path, fingerprint(other, ["a", "c"]))
    msg = str(exc.value)
    assert f"sampling.k: journal {cfg.sampling.k}, now 3" in msg and "judge.function" in msg
    assert "round prompts" in msg and "temperature" not in msg


def test_export_writes_dpo_pairs(tmp_path, capsys):
    write(tmp_path / "run" / "rounds" / "round-0", records()).flush()
    assert export_main([str(tmp_path / "run")]) == 0
    assert "2 pairs of 4 prompts (1 failed, 1 without a preference)" in capsys.readouterr().out
    import datasets

    ds = datasets.load_dataset("parquet", split="train", cache_dir=str(tmp_path / "c"),
                               data_files=str(tmp_path / "run" / "export" / "round-0.parquet"))
    assert ds.num_rows == 2
    first = ds[0]
    assert first["prompt"] == "<user>p0</user>" and first["chosen"] == "response 1 of p0"
    assert first["rejected"] == "response 0 of p0"
    assert (first["chosen_win_rate"], first["rejected_win_rate"]) == (0.7, 0.2)
    assert ds[1]["chosen"] == "response 0 of p1"  # from "all" rows: argmax / argmin
    assert export_main([str(tmp_path / "run"), "--round", "5"]) == 2


def _events(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of TensorBoard event files (TFRecord framing: length, CRC, Event, CRC)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in glob.glob(str(directory / "events.out.tfevents.*")):
        data = Path(path).read_bytes()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append((event.step, v.simple_value))
                elif v.tag.startswith("samples"):
                    out.setdefault(v.tag, []).append((event.step, 0.0))
    return out


def test_tensorboard_gets_steps_rounds_and_samples(tmp_path):
    tr = Trackers(["tensorboard"], tmp_path, run_name="r", config={"a": 1})
    tr.log_steps(0, [{"step": 1, "loss": 0.5, "lr": 1e-3}, {"step": 2, "loss": 0.25}])
    tr.log_round(0, {"mean_loss": 0.4, "timings_s": {"generate+judge": 2.0}},
                 [{"prompt": "p", "best": "b", "best_win_rate": 0.9, "worst": "w",
                   "worst_win_rate": 0.1}])
    tr.close()
    ev = _events(tmp_path / "tensorboard")
    assert ev["train/loss"] == [(1, 0.5), (2, 0.25)] and ev["train/lr"] == [(1, pytest.approx(1e-3))]
    assert ev["round/mean_loss"] == [(0, pytest.approx(0.4))]
    assert "round/timings_s/generate_judge" in ev and "samples" in "".join(ev)


SAMPLE = {"prompt": "p?", "best": "good", "best_win_rate": 0.9, "worst": "bad",
          "worst_win_rate": 0.1}


def test_wandb_offline_and_mlflow_file_store_get_the_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="needs wandb (the wandb extra)")
    pytest.importorskip("mlflow", reason="needs mlflow (the mlflow extra)")
    monkeypatch.setenv("WANDB_MODE", "offline")  # what a user without a W&B login gets
    monkeypatch.setenv("WANDB_SILENT", "true")
    tr = Trackers(["wandb", "mlflow"], tmp_path, run_name="r", config={"trainer": {"lr": 0.1}})
    tr.log_steps(0, [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}])
    tr.log_round(0, {"mean_loss": 0.4}, [SAMPLE])
    tr.close()
    (table,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "files" / "media" / "table"
                             / "samples_*.table.json"))
    assert json.loads(Path(table).read_text())["data"] == [list(SAMPLE.values())]
    (run_file,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert Path(run_file).stat().st_size > 0

    from mlflow.tracking import MlflowClient

    client = MlflowClient((tmp_path / "mlruns").absolute().as_uri())
    (exp,) = [e for e in client.search_experiments() if e.name == "r"]
    (run,) = client.search_runs([exp.experiment_id])
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id,
                                                                 "train.loss")] == \
        [(1, 0.5), (2, 0.25)]
    assert run.data.params["trainer.lr"] == "0.1"
    assert (Path(run.info.artifact_uri.removeprefix("file://")) / "samples" /
            "round-0.json").is_file()


def test_a_named_logger_that_is_not_installed_stops_the_run(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(TrackerError, match=r"sppo-ray\[wandb\]"):
        Trackers(["wandb"], tmp_path, run_name="r", config={})


# --------------------------------------------------------------------------- end to end


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    (path,) = glob.glob(str(run / "train" / "round-0" / "hf" / "*.safetensors"))
    return load_file(path)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _wait(proc: subprocess.Popen, log: Path, timeout: float = 420) -> str:
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert rc == 0, text[-4000:]
    return text


def test_driver_killed_mid_round_resumes_from_its_journal(own_cluster, tmp_path):
    """The driver as users run it, `python -m sppo.driver`, against a `ray start --head`
    cluster of its own that outlives the driver processes:

    A, uninterrupted: two rounds; round 0's journal has one row per prompt and the report's
    counts. B, the same config SIGKILLed once round 0 has journaled some prompts: the stopped
    run cannot be resumed under another config; `--resume` generates and judges only the
    missing prompts, and round 0 ends with A's data and A's weights (up to rounding), then
    round 1 runs. B again, left as kills leave a run (round 0 checkpointed but not recorded,
    round 1's checkpoint cut mid-write while round 2 sampled), resumed for a third round: round
    0 is adopted, round 1 trained again from its journal, round 2's early journal set aside.
    C: trained from A's journal, nothing sampled or judged: A's weights.
    Then A's round 0 exported for a DPO-style trainer."""
    args = ["run.rounds=2", f"run.output_dir={tmp_path}", f"run.ray_address={own_cluster.address}",
            "data.max_prompts=32", "data.eval_prompts=0", "sampling.max_new_tokens=8",
            "pools.generator.replicas=1", "pools.generator.batch_size=2",
            "pools.judge.batch_size=2", "judge.function=judges:slower_prefers_more_e",
            "run.journal_chunk_prompts=2", "trainer.global_batch_size=16",
            "service.enabled=false", f"model.cache_dir={tmp_path / 'cache'}"]
    # A: uninterrupted. Its journal: one row per prompt, the report's counts.
    a = tmp_path / "a"
    _wait(own_cluster.driver([*args, "run.name=a"], tmp_path / "a.log"), tmp_path / "a.log")
    report_a = json.loads((a / "rounds" / "round-0.json").read_text())
    import datasets

    ds = datasets.load_dataset("parquet", split="train", cache_dir=str(tmp_path / "hf-cache"),
                               data_files=str(a / "rounds" / "round-0" / "*.parquet"))
    journal_a = read_round(a / "rounds" / "round-0")
    p = report_a["prompts"]
    assert ds.num_rows == p["prompts"] == 16 and len(set(ds["prompt_id"])) == 16
    assert journal_a.counts() == {k: p[k] for k in ("prompts", "annotated", "failed", "rows")}
    assert (p["from_journal"], p["redone"], p["generated"]) == (0, 0, 16)

    # B: SIGKILLed once some prompts of round 0 were journaled, then resumed.
    b = tmp_path / "b"
    log_b = tmp_path / "b1.log"
    driver = own_cluster.driver([*args, "run.name=b"], log_b)
    try:
        deadline = time.monotonic() + 300
        while len(list((b / "rounds" / "round-0").glob("part-*.parquet"))) < 2:
            assert driver.poll() is None, f"driver exited early:\n{log_b.read_text()[-4000:]}"
            assert time.monotonic() < deadline, log_b.read_text()[-4000:]
            time.sleep(0.05)
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert not (b / "rounds" / "round-0.json").exists(), "the round finished before the kill"
    journaled = read_round(b / "rounds" / "round-0").ids()
    assert 4 <= len(journaled) < 16, len(journaled)
    # Another config is refused before anything starts, naming the field.
    refused = subprocess.run([sys.executable, "-m", "sppo.driver", "--resume", str(b),
                              "sampling.k=3"], cwd=REPO, env=own_cluster.env,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "sampling.k: journal 4, now 3" in refused.stderr, \
        refused.stderr[-3000:]
    text = _wait(own_cluster.driver(["--resume", str(b)], tmp_path / "b2.log"),
                 tmp_path / "b2.log")
    assert f"{len(journaled)} from the stopped round's journal" in text
    p = json.loads((b / "rounds" / "round-0.json").read_text())["prompts"]
    # Only the missing prompts were generated and judged; every prompt is accounted for once.
    assert p["from_journal"] == len(journaled) and p["redone"] == 16 - len(journaled)
    assert p["generated"] == 16 - len(journaled)
    assert p["annotated"] + p["failed"] == p["prompts"] == 16
    journal_b = read_round(b / "rounds" / "round-0")
    assert len(journal_b.rows) == 16
    # The same data as the uninterrupted run (sampling is seeded per prompt): same responses,
    # same P, same training rows, prompt by prompt.
    cols = ("response_token_ids", "probs", "rows", "status")
    by_id = {r["prompt_id"]: [r[c] for c in cols] for r in journal_a.rows}
    differ = [r["prompt_id"] for r in journal_b.rows
              if [r[c] for c in cols] != by_id.get(r["prompt_id"])]
    assert not differ and len(by_id) == 16, differ  # (ids only: the records are long)
    # One optimizer step on the same rows in another order: the same weights up to rounding,
    # while the step itself moved them far more than that.
    wa, wb = _weights(a), _weights(b)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(
        resolve_model_path("builtin:tiny-llama", str(tmp_path / "cache"))).state_dict()
    moved = _max_diff(wa, {k: base[k] for k in wa})
    assert moved > 1e-4
    assert _max_diff(wa, wb) < 1e-3 * moved, (_max_diff(wa, wb), moved)
    state = json.loads((b / "state.json").read_text())
    assert state["completed_rounds"] == 2
    second = json.loads((b / "rounds" / "round-1.json").read_text())
    assert second["prompts"]["annotated"] + second["prompts"]["failed"] == 16
    assert second["sync"]["generator_versions"] == [2]
    # Starting it again under the same name is refused before anything starts (state.json
    # names a run there): nothing is overwritten.
    from sppo.driver import main

    assert main([*args, "run.name=b"]) == 2

    # B's driver stopped twice over, as a kill can leave a run: round 0's checkpoint complete
    # but not recorded (state.json still says 0), round 1's checkpoint cut short mid-write (no
    # round.json), and a later round's journal begun (rounds/round-2/: a copy of round 1's, as
    # a run of more rounds leaves one). The resumed run adopts round 0 (not redone), trains
    # round 1 again from its complete journal (nothing sampled or judged) for its checkpoint,
    # and sets the later round's journal aside (it was sampled from weights trained again).
    first = (b / "rounds" / "round-0.json").read_text()
    (b / "state.json").write_text(json.dumps({"completed_rounds": 0, "checkpoint": None}))
    (b / "train" / "round-1" / "round.json").unlink()
    shutil.copytree(b / "rounds" / "round-1", b / "rounds" / "round-2")
    text = _wait(own_cluster.driver(["--resume", str(b)], tmp_path / "b3.log"),
                 tmp_path / "b3.log")
    assert "round 0 was trained and checkpointed" in text and "round 1/2" not in text
    assert "round 2/2: 16 prompts (16 from the stopped round's journal, 0 to generate" in text
    state = json.loads((b / "state.json").read_text())
    assert state["completed_rounds"] == 2 and state["checkpoint"].endswith("round-1/hf")
    redone = json.loads((b / "rounds" / "round-1.json").read_text())
    assert (redone["prompts"]["from_journal"], redone["prompts"]["generated"]) == (16, 0)
    assert redone["checkpoint_complete"] and (b / "train" / "round-1" / "round.json").is_file()
    assert (b / "rounds" / "round-2.set-aside-0").is_dir()
    assert not (b / "rounds" / "round-2").exists()
    assert (b / "rounds" / "round-0.json").read_text() == first  # not redone

    # C: trained from A's journal, nothing sampled or judged: A's weights.
    c = tmp_path / "c-run"
    text = _wait(own_cluster.driver([*args, "run.name=c-run", "run.rounds=1",
                                     f"data.from_journal={a / 'rounds' / 'round-0'}"],
                                    tmp_path / "c.log"), tmp_path / "c.log")
    assert "no sampling or judging" in text and "Generator" not in text
    pc = json.loads((c / "rounds" / "round-0.json").read_text())["prompts"]
    assert (pc["from_journal"], pc["generated"], pc["annotated"]) == (16, 0, report_a[
        "prompts"]["annotated"])
    assert _max_diff(wa, _weights(c)) < 1e-3 * moved

    # Export of A's round for a DPO-style trainer.
    out = subprocess.run([sys.executable, "-m", "sppo.export", str(a)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    pairs = datasets.load_dataset("parquet", split="train", cache_dir=str(tmp_path / "hf-cache"),
                                  data_files=str(a / "export" / "round-0.parquet"))
    assert {"prompt", "chosen", "rejected", "chosen_win_rate"} <= set(pairs.column_names)
    assert 0 < pairs.num_rows <= report_a["prompts"]["annotated"]
