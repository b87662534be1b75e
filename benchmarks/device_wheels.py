"""Wheels for the GPU machine, which reaches no package index: download a package with its dependencies
for the machine's Python, strip the largest parts it does not need, and pack them into bundles that each fit
the device tool's 64 MiB carry limit (carry one bundle per call while the machine stays warm, then
`pip install --no-index --find-links build/wheels/b1 --find-links build/wheels/b2 ... "ray[data]"`).

    python benchmarks/device_wheels.py "ray[data]" --exclude numpy   # -> build/wheels/b1, b2, ...

Ray (issue 18): its wheel is 79 MB, 32 MB of which are the Java jars (`ray/jars/`) and 2.5 MB the dashboard's
web client, neither used by Ray Data on Python; without them it is ~44 MB. pyarrow (~55 MB) goes alone.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STRIP = {"ray": ("ray/jars/", "ray/dashboard/client/")}
MIB = 1024 * 1024


def strip_wheel(path: Path, prefixes: tuple[str, ...]) -> Path:
    """Rewrite the wheel without the members under `prefixes` (RECORD updated); returns its new path."""
    out = path.with_suffix(".stripped")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        kept = []
        for info in src.infolist():
            if info.filename == record_name or info.filename.startswith(prefixes):
                continue
            data = src.read(info.filename)
            dst.writestr(info, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            kept.append(f"{info.filename},sha256={digest},{len(data)}")
        dst.writestr(record_name, "\n".join(kept + [f"{record_name},,"]) + "\n")
    out.replace(path)
    return path


def bundles(wheels: list[Path], limit: int) -> list[list[Path]]:
    """First-fit decreasing into bundles of at most `limit` bytes."""
    out: list[list[Path]] = []
    sizes: list[int] = []
    for w in sorted(wheels, key=lambda p: -p.stat().st_size):
        size = w.stat().st_size
        for i, used in enumerate(sizes):
            if used + size <= limit:
                out[i].append(w)
                sizes[i] += size
                break
        else:
            out.append([w])
            sizes.append(size)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("requirement")
    ap.add_argument("--python-version", default="3.12")
    ap.add_argument("--exclude", nargs="*", default=[], help="distributions the machine already has")
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "wheels")
    ap.add_argument("--limit-mib", type=float, default=60.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        platforms = ["--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
                     "--platform", "manylinux_2_28_x86_64"]
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--only-binary", ":all:", "--python-version",
               args.python_version, *platforms, "-d", tmp, args.requirement]
        subprocess.run(cmd, check=True)
        wheels = []
        for w in sorted(Path(tmp).glob("*.whl")):
            name = w.name.split("-")[0].lower().replace("_", "-")
            if name in {e.lower() for e in args.exclude}:
                continue
            if name in STRIP:
                strip_wheel(w, STRIP[name])
            wheels.append(w)
        groups = bundles(wheels, int(args.limit_mib * MIB))
        if args.out.exists():
            shutil.rmtree(args.out)
        for i, group in enumerate(groups, 1):
            d = args.out / f"b{i}"
            d.mkdir(parents=True)
            for w in group:
                shutil.copy2(w, d / w.name)
            mb = sum(w.stat().st_size for w in group) / MIB
            names = ", ".join(w.name.split("-")[0] for w in group)
            print(f"{d}: {len(group)} wheels, {mb:.1f} MiB ({names})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
