"""Benchmark bookkeeping shared by `qserve-lite bench` and benchmarks/*.py: the run's identity (date, GPU,
git sha), JSON lines appended to benchmarks/results/<date>-<gpu-slug>-<name>.jsonl, a printed table, and
an optional PNG plot (only when matplotlib is importable)."""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np


def today() -> str:
    return datetime.date.today().isoformat()


def git_sha(cwd: str | Path | None = None) -> str:
    """The short commit of the checkout at cwd (default: the current directory), "+dirty" when it has
    uncommitted changes; $QSERVE_GIT_SHA when set (a copy of the tree whose .git is stale or missing, such as
    the GPU machine's); "unknown" outside git."""
    if os.environ.get("QSERVE_GIT_SHA"):
        return os.environ["QSERVE_GIT_SHA"]

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], capture_output=True, text=True, cwd=cwd, timeout=10)
        return out.stdout.strip()

    try:
        sha = git("rev-parse", "--short", "HEAD")
        return (sha + ("+dirty" if git("status", "--porcelain") else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(xp) -> str:
    """The GPU's name (cupy), or 'cpu' (numpy)."""
    if xp is np:
        return "cpu"
    props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3' (file-name safe)."""
    s = name.lower().replace("nvidia", "").strip()
    return re.sub(r"[^a-z0-9.]+", "-", s).strip("-") or "unknown"


def results_file(name: str, gpu: str, date: str | None = None, results_dir: str | Path | None = None) -> Path:
    base = Path(results_dir) if results_dir is not None else Path.cwd() / "benchmarks" / "results"
    return base / f"{date or today()}-{slug(gpu)}-{name}.jsonl"


def append_jsonl(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """columns: (header, key) pairs; floats get 3 significant decimals at most, None prints '-'."""

    def cell(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)

    table = [[h for h, _ in columns]] + [[cell(r.get(k)) for _, k in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in table)


def plot_throughput(rows: list[dict], png: str | Path) -> Path | None:
    """Generated tok/s against batch, one line per (model, precision, group size, mode); None without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    series: dict[str, dict[int, float]] = {}
    for r in rows:
        if r.get("tok_s") is None or r.get("batch") is None:
            continue
        g = r.get("group_size")
        label = f"{r.get('model')} {r.get('precision')}" + (f" g{g}" if g else "") + f" {r.get('mode', '')}"
        series.setdefault(label.strip(), {})[int(r["batch"])] = float(r["tok_s"])  # the latest run wins
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in sorted(series.items()):
        batches = sorted(points)
        ax.plot(batches, [points[b] for b in batches], marker="o", label=label)
    ax.set_xlabel("batch (sequences)")
    ax.set_ylabel("generated tokens / s")
    ax.set_xscale("log", base=2)
    ticks = sorted({b for points in series.values() for b in points})
    ax.set_xticks(ticks, [str(b) for b in ticks])
    ax.minorticks_off()
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    title = rows[-1].get("gpu", "")
    ax.set_title(f"qserve-lite bench, {title}")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return Path(png)
