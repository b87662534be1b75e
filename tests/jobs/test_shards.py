"""The shard contract (jobs/shards.py): naming, the partial log and its resume, atomic results, markers,
variants."""

from __future__ import annotations

import json
import os

import pytest

from qserve_lite.jobs.shards import (
    PartialLog,
    Shard,
    ShardError,
    config_hash,
    discard_results,
    finish_shard,
    list_shards,
    make_shards,
    read_done,
    shard_state,
    write_atomic,
)


def _touch(path, text="{}\n"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_list_shards_takes_files_and_directories_in_order(tmp_path):
    a = _touch(tmp_path / "in" / "b.jsonl")
    _touch(tmp_path / "in" / "a.jsonl")
    _touch(tmp_path / "in" / "notes.txt")
    extra = _touch(tmp_path / "more" / "c.part.jsonl")
    shards = list_shards([tmp_path / "in", extra], tmp_path / "out", ".jsonl")
    assert [s.name for s in shards] == ["a", "b", "c.part"]
    assert shards[1].input == a.resolve()
    assert shards[2].output == (tmp_path / "out" / "c.part.jsonl").resolve()


@pytest.mark.parametrize("case", ["clash", "over_input", "missing", "empty_dir"])
def test_list_shards_refuses_bad_layouts(tmp_path, case):
    inp = tmp_path / "in"
    inp.mkdir()
    if case == "clash":
        args = [_touch(inp / "x.jsonl"), _touch(tmp_path / "other" / "x.jsonl")]
        out, match = tmp_path / "out", "two input shards are named 'x'"
    elif case == "over_input":
        args, out, match = [_touch(inp / "x.jsonl")], inp, "would overwrite it"
    elif case == "missing":
        args, out, match = [inp / "nope.jsonl"], tmp_path / "out", "does not exist"
    else:
        args, out, match = [inp], tmp_path / "out", "has no"
    with pytest.raises(ShardError, match=match):
        list_shards(args, out, ".jsonl")


def test_config_hash_ignores_key_order_and_sees_values():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_partial_log_resumes_and_cuts_a_torn_last_line(tmp_path):
    path = tmp_path / "s.partial.jsonl"
    with PartialLog(path, "id", "h1") as log:
        for i in range(3):
            log.append({"id": f"r{i}", "text": f"t{i}"})
    with open(path, "a") as f:  # a writer killed mid-line
        f.write('{"id": "r3", "te')
    with PartialLog(path, "id", "h1") as log:
        assert sorted(log.records) == ["r0", "r1", "r2"] and "r3" not in log
        log.append({"id": "r3", "text": "t3"})
    lines = path.read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines[1:]] == ["r0", "r1", "r2", "r3"]  # every line whole again
    with pytest.raises(ShardError, match="another configuration"):
        PartialLog(path, "id", "h2")


def test_write_atomic_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "r.jsonl"
    write_atomic(path, "old\n")

    def boom(f):
        f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomic(path, boom)
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["r.jsonl"]  # no temporary file left behind


def test_finish_shard_puts_result_then_marker_and_drops_the_log(tmp_path):
    shard = list_shards([_touch(tmp_path / "in" / "s.jsonl")], tmp_path / "out", ".jsonl")[0]
    shard.out_dir.mkdir()
    assert shard_state(shard, "h") == "todo"
    with PartialLog(shard.partial, "id", "h") as log:
        log.append({"id": 1})
    _touch(shard.progress)
    assert shard_state(shard, "h") == "partial" and shard_state(shard, "other") == "stale"
    marker = finish_shard(shard, lambda f: f.write('{"id": 1}\n'), {"rows": 1}, "h")
    assert shard.output.read_text() == '{"id": 1}\n'
    assert read_done(shard) == marker and marker["rows"] == 1 and marker["config_hash"] == "h"
    assert not shard.partial.exists() and not shard.progress.exists()
    assert shard_state(shard, "h") == "done" and shard_state(shard, "other") == "stale"
    shard.output.unlink()  # a marker without its result does not count
    assert read_done(shard) is None and shard_state(shard, "h") == "todo"


def test_variants_have_their_own_markers_and_share_the_result(tmp_path):
    inp = _touch(tmp_path / "in" / "s.tar")
    a, b = (make_shards([("s", inp)], tmp_path / "out", ".json", v)[0] for v in ("model-a", "model-b"))
    assert a.output == b.output and a.lock == b.lock
    assert a.done.name == "s.model-a.done.json" and a.partial.name == "s.model-a.partial.jsonl"
    a.out_dir.mkdir()
    finish_shard(a, lambda f: f.write('{"k": {"model-a": "x"}}'), {"images": 1}, "h")
    assert shard_state(a, "h") == "done" and shard_state(b, "h") == "todo"
    assert read_done(a)["variant"] == "model-a" and Shard.from_dict(a.to_dict()) == a
    discard_results(a)  # the result file holds the other variants' results: it stays
    assert a.output.exists() and shard_state(a, "h") == "todo"
    with pytest.raises(ShardError, match="cannot name result files"):
        make_shards([("s", inp)], tmp_path / "out", ".json", "a/b")
    with pytest.raises(ShardError, match="would both write s.v.done.json"):
        make_shards([("s", inp), ("s.v.done", _touch(tmp_path / "in" / "s.v.done.tar"))], tmp_path / "out",
                    ".json", "v")
