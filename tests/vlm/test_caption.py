"""`qserve-lite caption` on the CPU with a tiny VILA1.5 checkpoint: the outputs, errors recorded per sample,
done shards skipped, and runs interrupted (in-process) or SIGKILLed (a subprocess) in the middle resuming
to the same final JSON, with no key captioned twice and none lost."""

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

from qserve_lite.caption import shards as shard_contract
from qserve_lite.cli import main

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
    marker = json.loads((out / "shard-000.done.json").read_text())["models"]["VILA1.5-tiny"]
    assert marker["keys"] == sizes["shard-000"] and marker["errors"] == 2 and marker["images"] == 10
    assert marker["expected"] == 12 and marker["samples_read"] == 12 and marker["shard_error"] is None
    assert marker["images_per_s"] > 0 and 10 <= marker["generated_tokens"] <= 60
    err = capsys.readouterr().err
    assert "2 shard(s), 0 already done" in err and "images/s" in err
    # a second run skips both shards and changes nothing
    stamps = [p.stat().st_mtime_ns for p in sorted(out.iterdir())]
    assert caption(vila, tmp_path / "in", out) == 0
    assert "2 already done" in capsys.readouterr().err
    assert stamps == [p.stat().st_mtime_ns for p in sorted(out.iterdir())]
    # another model name adds its captions beside the first one's
    assert caption(vila, tmp_path / "in", out, "--model-name", "other") == 0
    merged = results(out)["shard-000.json"]
    assert set(merged["000000"]) == {"VILA1.5-tiny", "other"}
    assert merged["000000"]["other"] == first["000000"]["VILA1.5-tiny"]


def test_index_mismatch_and_truncated_shard(vila, tmp_path):
    make_shards(tmp_path / "in", sizes=(5,), bad={})
    (tmp_path / "in" / "metadata_info.json").write_text(json.dumps(
        {"wids_version": 1, "shardlist": [{"url": "shard-000.tar", "nsamples": 6}]}))
    assert caption(vila, tmp_path / "in", tmp_path / "out") == 0
    marker = json.loads((tmp_path / "out" / "shard-000.done.json").read_text())["models"]["VILA1.5-tiny"]
    assert "the index says 6 samples, the shard holds 5" in marker["shard_error"]
    tar = tmp_path / "t" / "shard-009.tar"
    write_tar(tar, caption_shard_members(0, 6, {}))
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) * 2 // 3])
    assert caption(vila, tar, tmp_path / "out2") == 0
    got = results(tmp_path / "out2")["shard-009.json"]
    marker = json.loads((tmp_path / "out2" / "shard-009.done.json").read_text())["models"]["VILA1.5-tiny"]
    assert 0 < len(got) < 6 and "truncated or corrupt" in marker["shard_error"]


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

    def counting(self, key, record):
        append(self, key, record)
        seen.append(key)
        if len(seen) == 15:  # in the middle of the second shard
            raise KeyboardInterrupt

    monkeypatch.setattr(shard_contract.PartialLog, "append", counting)
    out = tmp_path / "out"
    assert caption(vila, tmp_path / "in", out) == 130
    assert (out / "shard-000.done.json").is_file() and not (out / "shard-001.done.json").exists()
    assert len((out / "shard-001.partial.jsonl").read_text().splitlines()) == 3
    assert caption(vila, tmp_path / "in", out) == 0
    assert results(out) == clean
    assert len(seen) == len(set(seen)) == 20  # every key once, none twice, none lost
    marker = json.loads((out / "shard-001.done.json").read_text())["models"]["VILA1.5-tiny"]
    assert marker["resumed_keys"] == 3 and marker["keys"] == 8


def test_sigkill_resumes_to_the_same_json(vila, tmp_path):
    make_shards(tmp_path / "in", sizes=(40,), bad={5: "corrupt"})
    args = ["--max-new-tokens", "48", "--max-num-seqs", "2"]
    cmd = [sys.executable, "-m", "qserve_lite.cli", "caption", "--model", str(vila), "--shards",
           str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--device", "cpu", "--no-progress", *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    partial = tmp_path / "out" / "shard-000.partial.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if partial.is_file() and len(partial.read_text().splitlines()) >= 6:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "out" / "shard-000.json").exists()
    done_before = len({json.loads(line)["key"] for line in partial.read_text().splitlines() if line.strip()})
    assert 6 <= done_before < 40
    main(["caption", "--model", str(vila), "--shards", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
          "--device", "cpu", "--no-progress", *args])
    main(["caption", "--model", str(vila), "--shards", str(tmp_path / "in"), "--out", str(tmp_path / "clean"),
          "--device", "cpu", "--no-progress", *args])
    assert results(tmp_path / "out") == results(tmp_path / "clean")
    assert len(results(tmp_path / "out")["shard-000.json"]) == 40
