"""The package's layer order (docs/ARCHITECTURE.md), enforced: every import of a qserve_lite module points
down.

    errors < core < kernels < model < (io, jobs) < engine < eval < quant < (llm, bench, caption)
        < (server, batch) < cli

A module may import modules of its own layer and of the layers below, never above; `qserve_lite/__init__.py`
(the public API) sits on top. Function-local imports of the package's own modules are refused too (they hide
edges from readers and from this test); lazy imports are for optional third-party packages only (cupy,
fastapi, gguf, ...).
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qserve_lite"

# layer rank of each top-level module or subpackage of qserve_lite
LAYERS = {
    "_version": 0, "errors": 0,
    "core": 1, "sampling_params": 1, "outputs": 1,
    "kernels": 2,
    "model": 3,
    "io": 4, "jobs": 4,
    "engine": 5,
    "eval": 6,
    "quant": 7,
    "llm": 8, "bench": 8, "caption": 8,
    "server": 9, "batch": 9,
    "cli": 10,
    "__init__": 11, "__main__": 11,
}


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> tuple[str, int]:
    """('core', 1) for 'qserve_lite.core.backend'; the package root is the top layer."""
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    if key not in LAYERS:
        raise KeyError(f"{module}: {key} has no layer; add it to LAYERS and docs/ARCHITECTURE.md")
    return key, LAYERS[key]


# modules that import an optional dependency at import time: the only package modules a function may import
# lazily (so that the CLI works without the extra)
LAZY_OK = {"qserve_lite.server.launch": "fastapi and uvicorn, the [server] extra"}


def _is_module(name: str, root: Path) -> bool:
    path = root.parent.joinpath(*name.split("."))
    return path.is_dir() or path.with_suffix(".py").is_file()


def imports_of(source: str, module: str, is_package: bool, root: Path = PACKAGE):
    """(target module, line, is_function_local) of every import of a qserve_lite module in `source`
    (`from package import submodule` counts as an import of the submodule)."""
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    local_nodes = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            local_nodes.update(id(n) for n in ast.walk(node) if n is not node)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = [f"{target}.{a.name}" for a in node.names if _is_module(f"{target}.{a.name}", root)]
            names = subs or [target]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name == "qserve_lite" or name.startswith("qserve_lite."):
                yield name, node.lineno, id(node) in local_nodes


def violations(root: Path = PACKAGE) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        _, rank = layer_of(module)
        for target, line, local in imports_of(path.read_text(), module, path.name == "__init__.py", root):
            where = f"{path.relative_to(root.parent)}:{line}"
            target_key, target_rank = layer_of(target)
            if target_rank > rank:
                found.append(f"{where}: {module} imports {target} ({target_key} is above)")
            if local and target not in LAZY_OK:
                found.append(f"{where}: function-local import of {target}")
    return found


def test_every_import_points_down():
    assert violations() == []


def test_every_package_and_module_has_a_layer():
    for path in PACKAGE.rglob("*.py"):
        layer_of(module_name(path))


def _write(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "qserve_lite"
    for rel, text in files.items():
        f = pkg / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(textwrap.dedent(text))
    return pkg


@pytest.mark.parametrize("source", [
    "from qserve_lite.engine.llm_engine import LLMEngine\n",  # absolute
    "from ..engine import llm_engine\n",  # relative
    "import qserve_lite.engine.llm_engine\n",
    "from qserve_lite import engine\n",  # a subpackage through the root
])
def test_an_upward_import_fails(tmp_path, source):
    pkg = _write(tmp_path, {"__init__.py": "", "core/__init__.py": "", "core/x.py": source,
                            "engine/__init__.py": "", "engine/llm_engine.py": "LLMEngine = 1\n"})
    found = violations(pkg)
    assert len(found) == 1
    assert "core.x imports qserve_lite.engine" in found[0] and "engine is above" in found[0]


def test_downward_and_same_layer_imports_pass_and_local_ones_fail(tmp_path):
    pkg = _write(tmp_path, {
        "__init__.py": "", "core/__init__.py": "", "core/a.py": "A = 1\n",
        "engine/__init__.py": "", "engine/b.py": "from qserve_lite.core.a import A\nfrom .c import C\n",
        "engine/c.py": "C = 2\n\ndef f():\n    from qserve_lite.core import a\n    import numpy\n"
                       "    return a, numpy\n",
    })
    found = violations(pkg)
    assert found == ["qserve_lite/engine/c.py:4: function-local import of qserve_lite.core.a"]
