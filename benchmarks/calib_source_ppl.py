"""Perplexity cost of data-free (self-generated) calibration against text calibration (issue 20, item 1).

Quantizes --model twice with the same QoQ defaults on the numpy path: once calibrated on text the model
generates itself (calib_source "self"), once on --calib-text files; evaluates the float model and both
checkpoints on held-out --eval-text (GPTQ/QServe protocol, seq_len 512), prints the numbers and appends one
JSON line to benchmarks/results/<date>-<machine>-calib_source_ppl.jsonl.

Default text (no python3.11-doc needed): calibration on the Python standard library's own .py sources,
evaluation on /usr/share/common-licenses (prose of another domain) plus tests/data/python_doc_sample.rst.txt.

    PYTHONPATH=$PWD python benchmarks/calib_source_ppl.py [--group-size 128] [--max-tokens 16384]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from qserve_lite.eval.corpus import read_texts
from qserve_lite.eval.perplexity import perplexity
from qserve_lite.io.loader import load_model
from qserve_lite.quant import qoq

ROOT = Path(__file__).resolve().parents[1]


def default_calib_text() -> list[Path]:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    return [f for i, f in enumerate(files) if i % 10 != 0]


def default_eval_text() -> list[Path]:
    lic = sorted(p for p in Path("/usr/share/common-licenses").glob("*") if p.is_file())
    return lic + [ROOT / "tests" / "data" / "python_doc_sample.rst.txt"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--group-size", type=int, default=128, choices=(128, -1))
    ap.add_argument("--calib-text", nargs="+", type=Path, default=None)
    ap.add_argument("--eval-text", nargs="+", type=Path, default=None)
    ap.add_argument("--max-tokens", type=int, default=16384, help="evaluation tokens")
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args()
    calib_text = args.calib_text or default_calib_text()
    eval_text = args.eval_text or default_eval_text()
    fp = load_model(args.model)
    ids = fp.tokenizer.encode(read_texts(eval_text), add_special_tokens=False)
    result = {"date": datetime.date.today().isoformat(), "machine": f"cpu ({platform.machine()}, "
              f"{__import__('os').cpu_count()} cores)", "model": args.model, "group_size": args.group_size,
              "eval_tokens": min(len(ids), args.max_tokens), "seq_len": args.seq_len,
              "calib_text_files": len(calib_text), "eval_text_files": len(eval_text)}
    result["ppl_float"] = perplexity(fp.model, ids, args.seq_len, args.max_tokens).ppl
    with tempfile.TemporaryDirectory() as tmp:
        for name, kw in (("self", {"calib_source": "self"}), ("text", {})):
            config = qoq.config_for_precision("w4a8kv4", args.group_size, **kw)
            t0 = time.perf_counter()
            report = qoq.quantize_model(args.model, Path(tmp) / name, config,
                                        calib_files=calib_text if name == "text" else None)
            result[f"quantize_s_{name}"] = round(time.perf_counter() - t0, 1)
            lm = load_model(report.out_dir)
            result[f"ppl_{name}_calib"] = perplexity(lm.model, ids, args.seq_len, args.max_tokens).ppl
    result["self_vs_text_ppl_ratio"] = result["ppl_self_calib"] / result["ppl_text_calib"]
    print(json.dumps(result, indent=2))
    out = ROOT / "benchmarks" / "results" / f"{result['date']}-cpu-calib_source_ppl.jsonl"
    with out.open("a") as f:
        f.write(json.dumps(result) + "\n")
    print(f"appended to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
