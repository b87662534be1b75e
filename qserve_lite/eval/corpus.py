"""Text corpora for perplexity and calibration: local files, or Debian's python3.11-doc sources."""

from __future__ import annotations

from pathlib import Path

from qserve_lite.errors import QServeLiteError

PYTHON_DOC_ROOT = Path("/usr/share/doc/python3.11/html/_sources")
PYTHON_DOC_HINT = "install it with: sudo apt-get install python3.11-doc (Debian/Ubuntu)"


def python_doc_files(root: str | Path = PYTHON_DOC_ROOT) -> list[Path]:
    """Every .rst.txt source of the Python 3.11 documentation, in a stable (sorted) order."""
    root = Path(root)
    files = sorted(root.rglob("*.rst.txt"))
    if not files:
        raise QServeLiteError(f"no python3.11-doc sources under {root}; {PYTHON_DOC_HINT}")
    return files


def read_texts(files: list[str | Path]) -> str:
    """Concatenate text files (UTF-8, undecodable bytes replaced) with blank lines between them."""
    parts = []
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise QServeLiteError(f"text file not found: {p}")
        parts.append(p.read_text(encoding="utf-8", errors="replace").strip())
    if not any(parts):
        raise QServeLiteError("the given text files are empty")
    return "\n\n".join(parts)
