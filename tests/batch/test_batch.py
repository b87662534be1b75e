"""`qserve-lite batch` in this process (the inline launcher) on the tiny CPU model: results and error rows,
done-markers that skip finished shards, stale results, resume after a failure and after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from batch_helpers import read_results, spec_for, write_shards

from qserve_lite.batch import worker as batch_worker
from qserve_lite.batch.worker import BatchSpec
from qserve_lite.cli import main
from qserve_lite.jobs.job import run_job
from qserve_lite.jobs.shards import list_shards

REPO = Path(__file__).resolve().parents[2]


def _cli(model_dir, inp, out, *extra) -> list[str]:
    return ["batch", "-m", str(model_dir), "--input", str(inp), "--out", str(out), "--device", "cpu",
            "--max-tokens", "4", "--max-num-seqs", "4", "--no-progress", *extra]


def test_results_in_input_order_with_bad_rows_as_errors(tiny_model_dir, tmp_path, capsys):
    rows = [
        {"id": "a", "prompt": "The capital of France is"},
        "not json",
        {"id": "b", "prompt": [5, 6, 7], "sampling_params": {"max_tokens": 2}},
        {"id": "a", "prompt": "a second a"},
        {"messages": [{"role": "user", "content": "Hi"}]},
        {"id": "c"},
        {"id": "d", "prompt": "x", "sampling_params": {"temprature": 1}},
        {"id": "e", "prompt": [99999]},
        {"id": 7, "prompt": "x", "sampling_params": {"top_p": 0}},
    ]
    inp = tmp_path / "in" / "s.jsonl"
    inp.parent.mkdir()
    inp.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n\n")
    assert main(_cli(tiny_model_dir, inp.parent, tmp_path / "out")) == 0
    got = read_results(tmp_path / "out" / "s.jsonl")
    assert [r["id"] for r in got] == ["a", "s:2", "b", "s:4", "s:5", "c", "d", "e", 7]
    ok = {r["id"]: r for r in got if "error" not in r}
    assert sorted(ok, key=str) == ["a", "b", "s:5"]
    assert ok["b"]["completion_tokens"] == 2 and ok["b"]["prompt_tokens"] == 3
    assert ok["a"]["completion_tokens"] == 4 and ok["a"]["finish_reason"] == "length"
    assert all(isinstance(r["text"], str) for r in ok.values())
    errors = {r["id"]: r for r in got if "error" in r}
    assert errors["s:2"]["line"] == 2 and "not JSON" in errors["s:2"]["error"]
    assert "duplicate id 'a' (first on line 1)" in errors["s:4"]["error"]
    assert "exactly one of 'prompt'" in errors["c"]["error"]
    assert "unknown sampling_params temprature" in errors["d"]["error"]
    assert "outside the vocabulary" in errors["e"]["error"]
    assert "top_p" in errors[7]["error"]
    marker = json.loads((tmp_path / "out" / "s.done.json").read_text())
    assert (marker["rows"], marker["ok"], marker["errors"]) == (9, 3, 6)
    assert marker["generated_tokens"] == sum(r["completion_tokens"] for r in ok.values())
    assert marker["rows_per_s"] > 0 and marker["gen_tok_s"] > 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [s["status"] for s in manifest["shards"]] == ["done"]
    err = capsys.readouterr().err
    assert "gen tok/s" in err and "run: 9 rows" in err
    assert sorted(os.listdir(tmp_path / "out")) == ["manifest.json", "s.done.json", "s.jsonl"]


def test_sampled_rows_do_not_depend_on_batching(tiny_model_dir, tmp_path):
    inp = write_shards(tmp_path / "in", 1, 6)[0]
    outs = []
    for seqs in ("1", "4"):
        out = tmp_path / f"out{seqs}"
        assert main(_cli(tiny_model_dir, inp, out, "--temperature", "1.0", "--max-num-seqs", seqs)) == 0
        outs.append(read_results(out / inp.name))
    assert outs[0] == outs[1]
    assert len({r["text"] for r in outs[0]}) > 1


def test_done_shards_are_skipped_and_other_settings_refused(tiny_model_dir, tmp_path, monkeypatch, capsys):
    write_shards(tmp_path / "in", 2, 3)
    out = tmp_path / "out"
    assert main(_cli(tiny_model_dir, tmp_path / "in", out)) == 0
    first = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.suffix == ".jsonl"}
    write_shards(tmp_path / "more", 3, 3)  # part-02 is new
    built = []
    real_build = BatchSpec.build
    monkeypatch.setattr(BatchSpec, "build", lambda self: built.append(1) or real_build(self))
    assert main(_cli(tiny_model_dir, tmp_path / "more", out)) == 0
    assert built == [1]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name in first} == first
    statuses = json.loads((out / "manifest.json").read_text())["shards"]
    assert [s["status"] for s in statuses] == ["skipped", "skipped", "done"]
    assert main(_cli(tiny_model_dir, tmp_path / "more", out)) == 0 and built == [1]  # nothing to run
    capsys.readouterr()
    assert main(_cli(tiny_model_dir, tmp_path / "more", out, "--max-tokens", "3")) == 2
    assert "another configuration" in capsys.readouterr().err
    assert main(_cli(tiny_model_dir, tmp_path / "more", out, "--max-tokens", "3", "--overwrite")) == 0
    assert all(r["completion_tokens"] == 3 for r in read_results(out / "part-00.jsonl"))


class _FailingWorker(batch_worker.BatchWorker):
    """Raises (an engine failure) once k rows of the shard are logged."""

    fail_after = 4

    def _generate(self, shard, log, progress):
        append = log.append

        def append_then_fail(record):
            append(record)
            if len(log) >= self.fail_after:
                raise RuntimeError("device lost")

        log.append = append_then_fail
        return super()._generate(shard, log, progress)


def test_a_failed_shard_resumes_from_its_log_without_redoing_rows(tiny_model_dir, tmp_path, monkeypatch):
    inp = write_shards(tmp_path / "in", 1, 10)[0]
    spec = spec_for(tiny_model_dir)
    shards = list_shards([inp], tmp_path / "out", ".jsonl")
    monkeypatch.setattr(BatchSpec, "build", lambda self: _FailingWorker(self.load(), self))
    result = run_job(spec, shards, progress=False)
    assert result.exit_code == 1 and result.statuses[0]["status"] == "error"
    assert "RuntimeError: device lost" in result.statuses[0]["message"]
    assert not shards[0].output.exists() and not shards[0].lock.exists()
    logged = read_results(shards[0].partial)[1:]
    assert len(logged) >= 4

    monkeypatch.undo()
    added = []
    real_add = batch_worker.BatchWorker._admit
    monkeypatch.setattr(batch_worker.BatchWorker, "_admit",
                        lambda self, row, *a: added.append(row.key) or real_add(self, row, *a))
    result = run_job(spec, shards, progress=False)
    assert result.exit_code == 0
    got = read_results(shards[0].output)
    assert [r["id"] for r in got] == [f"0-{i}" for i in range(10)]
    assert len(added) == 10 - len(logged) and not set(added) & {r["id"] for r in logged}
    assert all(got[int(r["id"][2:])] == r for r in logged)  # the logged rows are used as they were
    marker = json.loads(shards[0].done.read_text())
    assert marker["resumed"] == len(logged) and marker["done"] == 10 - len(logged)


def test_sigkill_mid_shard_leaves_no_torn_result_and_resumes(tiny_model_dir, tmp_path):
    inp = write_shards(tmp_path / "in", 1, 300)[0]
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "qserve_lite.cli", *_cli(tiny_model_dir, inp, out, "--max-tokens", "12",
                                                           "--max-num-seqs", "2")]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    partial = out / "part-00.partial.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if partial.exists() and partial.read_bytes().count(b"\n") > 21:  # header + 21 records
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "part-00.jsonl").exists() and not (out / "part-00.done.json").exists()
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    lines = partial.read_bytes().split(b"\n")
    before = {}
    for line in lines[1:-1]:  # every whole line is a record; only the last may be torn
        rec = json.loads(line)
        before[rec["id"]] = rec
    assert len(before) > 20
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    got = read_results(out / "part-00.jsonl")
    assert [r["id"] for r in got] == [f"0-{i}" for i in range(300)]
    assert all(got[int(k[2:])] == rec for k, rec in before.items())
    assert json.loads((out / "part-00.done.json").read_text())["resumed"] >= len(before)
    assert not partial.exists() and not (out / "part-00.lock").exists()


@pytest.mark.parametrize("extra,message", [
    (["--launcher", "local", "--gpus", "0"], "--gpus must be >= 1"),
    (["--tokenizer", "x"], "--tokenizer goes with --random-weights"),
])
def test_bad_flags_are_one_line_errors(tiny_model_dir, tmp_path, capsys, extra, message):
    write_shards(tmp_path / "in", 1, 1)
    assert main(_cli(tiny_model_dir, tmp_path / "in", tmp_path / "out", *extra)) == 2
    assert message in capsys.readouterr().err
