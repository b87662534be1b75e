"""examples/: the shipped prompts file and the end-to-end generation example, on the tiny CPU model."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prompts_file_is_large_and_unique():
    lines = (ROOT / "examples" / "prompts.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) >= 300
    assert all(line.strip() == line and line for line in lines)
    assert len(set(lines)) == len(lines)


def test_e2e_generation_runs_and_reports_throughput(tiny_model_dir, tmp_path, capsys):
    e2e = load_example("e2e_generation")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France\n\nQuantization maps weights\nA key-value cache\n")
    out = tmp_path / "out.jsonl"
    rc = e2e.main(["--model", str(tiny_model_dir), "--device", "cpu", "--prompts", str(prompts),
                   "--num-prompts", "7", "--max-tokens", "5", "--max-num-seqs", "3", "--show", "2",
                   "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "requests 7, prompt tokens" in printed and "generated tokens" in printed
    assert "tok/s" in printed and printed.count(">>> ") == 2
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 7 and [r["index"] for r in rows] == list(range(7))
    assert [r["prompt"] for r in rows[:4]] == ["The capital of France", "Quantization maps weights",
                                                "A key-value cache", "The capital of France"]
    assert all(1 <= r["generated_tokens"] <= 5 and r["finish_reason"] in ("stop", "length") for r in rows)
    assert rows[0]["output"] == rows[3]["output"]  # greedy: the same prompt, the same answer


def _fake_pyarrow(monkeypatch):
    parquet = types.ModuleType("pyarrow.parquet")
    pyarrow = types.ModuleType("pyarrow")
    pyarrow.parquet = parquet
    monkeypatch.setitem(sys.modules, "pyarrow", pyarrow)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", parquet)


def test_e2e_wildchat_offline_is_one_clear_line(monkeypatch):
    import huggingface_hub

    e2e = load_example("e2e_generation")
    _fake_pyarrow(monkeypatch)

    def offline(self, *args, **kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co'\n(more detail on a second line)")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", offline)
    with pytest.raises(SystemExit) as exc:
        e2e.main(["--dataset", "wildchat", "--num-prompts", "4"])
    msg = str(exc.value.code)
    assert msg.startswith("error: cannot fetch allenai/WildChat-1M") and "ConnectionError" in msg
    assert "\n" not in msg


def test_e2e_wildchat_without_pyarrow(monkeypatch):
    e2e = load_example("e2e_generation")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import fails
    with pytest.raises(SystemExit) as exc:
        e2e.main(["--dataset", "wildchat"])
    assert "needs pyarrow" in str(exc.value.code)
