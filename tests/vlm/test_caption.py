"""`qserve-lite caption` on the CPU with a tiny VILA1.5 checkpoint, over the jobs/ shard contract: the
outputs, errors recorded per sample, done shards skipped, captions of several model names in one JSON,
results of other settings refused, runs interrupted (in-process) or SIGKILLed (a subprocess) in the middle
resuming to the same final JSON with no key captioned twice and none lost, and the local launcher (two
processes) giving the same JSON as one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from vila_fixtures import caption_shard_members, write_tar, write_vila

from qserve_lite.cli import main
from qserve_lite.jobs import shards as shard_contract

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def vila(tmp_path_factory) -> Path:
    return write_vila(tmp_path_factory.mktemp("m") / "VILA1.5-tiny")


def make_shards(d: Path, sizes=(12, 8), bad=None, index=True) -> dict[str, int]:
    """Shards shard-000, shard-001, ... of consecutive samples (+ metadata_info.json); -> {name: nsamples}."""
    bad = bad if bad is not None else {3: "corrupt", 7: "missing"}
    first, out = 0, {}
    for i, n in enumerate(sizes):
        write_tar(d / f"shard-{i:03d}.tar", caption_shard_members(first, n, bad))
        out[f"shard-{i:03d}"] = n
        first += n
    if index:
        (d / "metadata_info.json").write_text(json.dumps({
            "wids_version": 1, "shardlist": [{"url": f"{k}.tar", "nsamples": n} for k, n in out.items()]}))
    return out


def caption(model: Path, shards: Path, out: Path, *extra: str) -> int:
    return main(["caption", "--model", str(model), "--shards", str(shards), "--out", str(out),
                 "--device", "cpu", "--max-new-tokens", "6", "--max-num-seqs", "3", "--no-progress",
                 "--decode-threads", "2",
                 *extra])


def marker(out: Path, shard: str, model: str = "VILA1.5-tiny") -> dict:
    return json.loads((out / f"{shard}.{model}.done.json").read_text())


def logged_keys(partial: Path) -> list[str]:
    """The keys a partial log holds (after its header line)."""
    return [json.loads(line)["key"] for line in partial.read_text().splitlines()[1:] if line.strip()]


def results(out: Path) -> dict:
    return {p.name: json.loads(p.read_text()) for p in sorted(out.glob("shard-*.json"))
            if not p.name.endswith(".done.json")}


def test_caption_outputs(vila, tmp_path, capsys):
    sizes = make_shards(tmp_path / "in")
    out = tmp_path / "out"
    assert caption(vila, tmp_path / "in", out) == 0
    got = results(out)
    assert sorted(got) == ["shard-000.json", "shard-001.json"]
    first = got["shard-000.json"]
    assert sorted(first) == [f"{i:06d}" for i in range(12)]
    assert set(first["000000"]) == {"VILA1.5-tiny"} and isinstance(first["000000"]["VILA1.5-tiny"], str)
    assert "cannot decode 000003.png" in first["000003"]["error"]
    assert "no image member" in first["000007"]["error"] and "json, txt" in first["000007"]["error"]
    assert sum(1 for v in first.values() if "error" in v) == 2
    assert not list(out.glob("*.partial.jsonl"))
    m = marker(out, "shard-000")
    assert m["images"] == sizes["shard-000"] and m["errors"] == 2 and m["ok"] == 10 and m["done"] == 12
    assert m["expected"] == 12 and m["samples_read"] == 12 and m["warning"] is None
    assert m["images_per_s"] > 0 and 10 <= m["generated_tokens"] <= 60 and m["model_name"] == "VILA1.5-tiny"
    err = capsys.readouterr().err
    assert "done:2" in err and "images/s" in err
    # a second run skips both shards and changes nothing but its report (manifest.json)
    stamps = [p.stat().st_mtime_ns for p in sorted(out.iterdir()) if p.name != "manifest.json"]
    assert caption(vila, tmp_path / "in", out) == 0
    assert "skipped:2" in capsys.readouterr().err
    assert stamps == [p.stat().st_mtime_ns for p in sorted(out.iterdir()) if p.name != "manifest.json"]
    # another model name adds its captions beside the first one's
    assert caption(vila, tmp_path / "in", out, "--model-name", "other") == 0
    merged = results(out)["shard-000.json"]
    assert set(merged["000000"]) == {"VILA1.5-tiny", "other"}
    assert merged["000000"]["other"] == first["000000"]["VILA1.5-tiny"]


def test_index_mismatch_and_truncated_shard(vila, tmp_path, capsys):
    make_shards(tmp_path / "in", sizes=(5,), bad={})
    (tmp_path / "in" / "metadata_info.json").write_text(json.dumps(
        {"wids_version": 1, "shardlist": [{"url": "shard-000.tar", "nsamples": 6}]}))
    assert caption(vila, tmp_path / "in", tmp_path / "out") == 0
    assert "the index says 6 samples, the shard holds 5" in marker(tmp_path / "out", "shard-000")["warning"]
    tar = tmp_path / "t" / "shard-009.tar"
    write_tar(tar, caption_shard_members(0, 6, {}))
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) * 2 // 3])
    assert caption(vila, tar, tmp_path / "out2") == 0
    got = results(tmp_path / "out2")["shard-009.json"]
    assert 0 < len(got) < 6 and "truncated or corrupt" in marker(tmp_path / "out2", "shard-009")["warning"]
    assert "shard-009: shard " in capsys.readouterr().err  # the warning is in the summary too


def test_caption_errors(vila, tmp_path):
    make_shards(tmp_path / "in", sizes=(2,))
    with pytest.raises(SystemExit):
        main(["caption", "--model", str(vila), "--out", str(tmp_path / "o")])  # --shards is required
    assert caption(vila, tmp_path / "nowhere", tmp_path / "o") == 2
    assert caption(tmp_path / "in", tmp_path / "in", tmp_path / "o") == 2  # not a checkpoint
    assert caption(vila, tmp_path / "in", tmp_path / "o", "--template", "plain", "--prompt", "no image") == 0


def test_interrupted_run_resumes_to_the_same_json(vila, tmp_path, monkeypatch):
    make_shards(tmp_path / "in")
    assert caption(vila, tmp_path / "in", tmp_path / "clean") == 0
    clean = results(tmp_path / "clean")
    seen: list[str] = []
    append = shard_contract.PartialLog.append

    def counting(self, record):
        append(self, record)
        seen.append(record["key"])
        if len(seen) == 15:  # in the middle of the second shard
            raise KeyboardInterrupt

    monkeypatch.setattr(shard_contract.PartialLog, "append", counting)
    out = tmp_path / "out"
    assert caption(vila, tmp_path / "in", out) == 130
    assert marker(out, "shard-000") and not (out / "shard-001.VILA1.5-tiny.done.json").exists()
    assert len(logged_keys(out / "shard-001.VILA1.5-tiny.partial.jsonl")) == 3
    assert caption(vila, tmp_path / "in", out) == 0
    assert results(out) == clean
    assert len(seen) == len(set(seen)) == 20  # every key once, none twice, none lost
    m = marker(out, "shard-001")
    assert m["resumed"] == 3 and m["done"] == 5 and m["images"] == 8


def test_sigkill_resumes_to_the_same_json(vila, tmp_path):
    make_shards(tmp_path / "in", sizes=(40,), bad={5: "corrupt"})
    args = ["--max-new-tokens", "48", "--max-num-seqs", "2"]
    cmd = [sys.executable, "-m", "qserve_lite.cli", "caption", "--model", str(vila), "--shards",
           str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--device", "cpu", "--no-progress", *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    partial = tmp_path / "out" / "shard-000.VILA1.5-tiny.partial.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if partial.is_file() and len(partial.read_text().splitlines()) >= 7:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "out" / "shard-000.json").exists()
    done_before = len(set(logged_keys(partial)))
    assert 6 <= done_before < 40
    main(["caption", "--model", str(vila), "--shards", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
          "--device", "cpu", "--no-progress", *args])
    main(["caption", "--model", str(vila), "--shards", str(tmp_path / "in"), "--out", str(tmp_path / "clean"),
          "--device", "cpu", "--no-progress", *args])
    assert results(tmp_path / "out") == results(tmp_path / "clean")
    assert len(results(tmp_path / "out")["shard-000.json"]) == 40


def test_other_settings_are_refused_and_redone_beside_other_models(vila, tmp_path, capsys):
    make_shards(tmp_path / "in", sizes=(4,), bad={})
    out = tmp_path / "out"
    assert caption(vila, tmp_path / "in", out) == 0
    assert caption(vila, tmp_path / "in", out, "--model-name", "other") == 0
    before = results(out)["shard-000.json"]
    capsys.readouterr()
    assert caption(vila, tmp_path / "in", out, "--max-new-tokens", "2") == 2  # same name, other settings
    assert "another configuration" in capsys.readouterr().err
    assert results(out)["shard-000.json"] == before
    assert caption(vila, tmp_path / "in", out, "--max-new-tokens", "2", "--overwrite") == 0
    after = results(out)["shard-000.json"]
    assert [v["other"] for v in after.values()] == [v["other"] for v in before.values()]  # kept
    assert marker(out, "shard-000")["max_new_tokens"] == 2 and marker(out, "shard-000", "other")
    assert caption(vila, tmp_path / "in", out, "--model-name", "a b") == 2


def test_local_launcher_two_processes_give_the_same_json(vila, tmp_path):
    make_shards(tmp_path / "in", sizes=(6, 5, 4))
    assert caption(vila, tmp_path / "in", tmp_path / "clean") == 0
    out = tmp_path / "out"
    assert caption(vila, tmp_path / "in", out, "--launcher", "local", "--gpus", "2") == 0
    assert results(out) == results(tmp_path / "clean")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["run"]["launcher"] == "local"
    assert [s["status"] for s in manifest["shards"]] == ["done"] * 3
    assert not list(out.glob("*.lock")) and not list(out.glob("*.partial.jsonl"))
