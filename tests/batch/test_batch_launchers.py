"""`qserve-lite batch` over several workers on the CPU: the local launcher (two spawned processes, each with
its own CUDA_VISIBLE_DEVICES) and Ray Data in local mode with two logical GPUs; in both, a worker killed
mid-shard is replaced and its shard finished with no row lost or duplicated."""

from __future__ import annotations

import json

import batch_helpers
import pytest
from batch_helpers import read_results, spec_for, write_shards

from qserve_lite.jobs import local
from qserve_lite.jobs.job import run_job
from qserve_lite.jobs.shards import list_shards


def _check_complete(shards, rows: int) -> list[dict]:
    """Every shard's result has every row once, in order; returns the markers."""
    markers = []
    for s, shard in enumerate(shards):
        got = read_results(shard.output)
        assert [r["id"] for r in got] == [f"{s}-{i}" for i in range(rows)]
        assert all("error" not in r and r["completion_tokens"] == 4 for r in got)
        assert not shard.partial.exists() and not shard.lock.exists()
        markers.append(json.loads(shard.done.read_text()))
    return markers


def test_local_launcher_two_processes_one_killed(tiny_model_dir, tmp_path):
    paths = write_shards(tmp_path / "in", 4, 12)
    shards = list_shards(paths, tmp_path / "out", ".jsonl")
    flag = tmp_path / "died"
    spec = spec_for(tiny_model_dir, flag=str(flag), die_after=5)
    result = run_job(spec, shards, launcher="local", gpus=2, progress=False, max_restarts=2)
    assert flag.exists()  # a process did die mid-shard
    assert result.exit_code == 0, result.table
    assert [s["status"] for s in result.statuses] == ["done"] * 4
    markers = _check_complete(shards, 12)
    assert [m["resumed"] >= 5 for m in markers].count(True) == 1  # the killed shard resumed from its log
    dead_pid = flag.read_text()
    assert all(not m["worker"].endswith(f":{dead_pid}") for m in markers)
    manifest = json.loads(result.manifest.read_text())
    assert manifest["run"]["launcher"] == "local" and len(manifest["shards"]) == 4


def test_local_launcher_gives_each_process_its_gpu(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    shards = list_shards(write_shards(tmp_path / "in", 3, 4), tmp_path / "out", ".jsonl")
    seen = []
    statuses = local.run_local(spec_for(tiny_model_dir), shards, 2, lock_ttl=30, on_status=seen.append)
    assert statuses == seen
    assert {s["gpu"] for s in statuses} == {"0", "1"}  # both processes went through the list
    assert sorted(s["shard"] for s in statuses if s["status"] == "done") == ["part-00", "part-01", "part-02"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6,7")
    assert local.visible_gpus(2) == ["4", "6"]
    with pytest.raises(ValueError, match="lists 3"):
        local.visible_gpus(4)


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.cloudpickle.register_pickle_by_value(batch_helpers)  # the test's worker class travels by value
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_actor_killed_mid_shard_is_restarted_and_the_shard_finished(ray_local, tiny_model_dir, tmp_path):
    paths = write_shards(tmp_path / "in", 3, 12)
    shards = list_shards(paths, tmp_path / "out", ".jsonl")
    flag = tmp_path / "died"
    spec = spec_for(tiny_model_dir, flag=str(flag), die_after=5)
    result = run_job(spec, shards, launcher="ray", gpus=2, progress=False)
    assert flag.exists()
    assert result.exit_code == 0, result.table
    assert [s["status"] for s in result.statuses] == ["done"] * 3
    assert {s["gpu"] for s in result.statuses} <= {"0", "1"}  # Ray gave each actor one logical GPU
    markers = _check_complete(shards, 12)
    assert [m["resumed"] >= 5 for m in markers].count(True) == 1
    assert json.loads(result.manifest.read_text())["run"]["launcher"] == "ray"
