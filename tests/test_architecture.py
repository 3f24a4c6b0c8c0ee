"""The architecture stays visible: each folder imports only the layers below it (:data:`LAYERS`),
no import cycle among fastdpo's modules (imports inside functions included, ``TYPE_CHECKING``
blocks excluded), no module in fastdpo/ over 650 lines, and no file citing a document the
repository does not hold."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fastdpo"
MAX_LINES = 650


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    mods = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    mods.update({"fastdpo.kernels" + _module_name(p)[len("kernels"):]: p for p in (ROOT / "kernels").rglob("*.py")})
    return mods


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, child.end_lineno + 1))
    return lines


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The fastdpo modules ``name`` imports (a package's attribute counts as the package)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                full = f"{target}.{alias.name}"
                out.add(full if full in known else target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m in known and m != name}


# What each part of fastdpo may import besides itself, the data's way down: a module (users'
# objects) -> scoring (log-probs from a model's outputs) -> models (the adapters) -> batching
# (token ids to the batch) and losses (math on score vectors), with the argument checks and the
# Triton kernels at the bottom.  Each folder's __init__ docstring says the same.
LAYERS: dict[str, set[str]] = {
    "kernels": set(),
    "_checks": {"kernels"},
    "_options": set(),
    "losses": {"_checks"},
    "batching": {"_checks", "_options"},
    "data": {"_checks"},
    "models": {"batching", "_checks"},
    "scoring": {"models", "batching", "losses", "_checks", "_options", "kernels"},
    "modules": {"scoring", "models", "batching", "losses", "_checks", "_options"},
    "train": {"modules", "data", "models", "losses", "_checks"},
    "trl": {"modules", "models", "batching", "losses", "data", "_checks"},
    "bench": {"modules", "scoring", "models", "batching", "losses", "data", "_checks", "kernels", "__init__"},
    "kernel_report": {"kernels"},
    "cli": {"bench", "train", "kernel_report", "kernels", "__init__"},
    "__main__": {"cli"},
    "__init__": {"modules", "scoring", "losses", "data", "train"},
}


def _part(name: str) -> str:
    """The part of fastdpo a module belongs to: its first folder or top-level module."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_each_part_imports_only_the_layers_below_it():
    mods = _modules()
    known = set(mods)
    missing = {_part(m) for m in mods} - set(LAYERS)
    assert not missing, f"a new part of fastdpo needs its row in LAYERS: {sorted(missing)}"
    upward = sorted(
        f"{name} imports {target}"
        for name, path in mods.items()
        for target in _imports(name, path, known)
        if _part(target) != _part(name) and _part(target) not in LAYERS[_part(name)]
    )
    assert not upward, "imports against the layers (tests/test_architecture.py, LAYERS):\n" + "\n".join(upward)
    # Inside scoring, the backends are the bottom: they import no other scoring module.
    backends = "fastdpo.scoring.backends"
    up = sorted(f"{n} imports {t}" for n, p in mods.items() if n.startswith(backends)
                for t in _imports(n, p, known) if t.startswith("fastdpo.scoring") and not t.startswith(backends))
    assert not up, "a backend imports the scoring code above it:\n" + "\n".join(up)


def test_the_layer_check_finds_an_upward_import(tmp_path, monkeypatch):
    """The check above can fail: a loss module importing a model adapter."""
    pkg = tmp_path / "fastdpo"
    for folder in ("losses", "models"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "base.py").write_text("X = 1\n")
    (pkg / "losses" / "pairwise.py").write_text("def f():\n    from ..models.base import X\n")
    (tmp_path / "kernels").mkdir()
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    monkeypatch.setattr(sys.modules[__name__], "LAYERS", {**LAYERS, "__init__": set()})
    try:
        test_each_part_imports_only_the_layers_below_it()
    except AssertionError as e:
        assert "fastdpo.losses.pairwise imports fastdpo.models.base" in str(e), str(e)
    else:
        raise AssertionError("the upward import was not found")


def test_no_import_cycle():
    mods = _modules()
    known = set(mods)
    graph = {name: _imports(name, path, known) for name, path in mods.items()}
    # A submodule's import runs its package's __init__ first: that edge is implied, not a
    # cycle; what must not happen is a module importing one that (transitively) imports it.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_check_finds_a_cycle(tmp_path, monkeypatch):
    """The cycle check above can fail: two modules importing each other inside functions."""
    pkg = tmp_path / "fastdpo"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from . import b\n")
    (pkg / "b.py").write_text("from .a import f\n")
    (tmp_path / "kernels").mkdir()
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    try:
        test_no_import_cycle()
    except AssertionError as e:
        assert "fastdpo.a -> fastdpo.b -> fastdpo.a" in str(e) or "fastdpo.b -> fastdpo.a -> fastdpo.b" in str(e)
    else:
        raise AssertionError("the cycle was not found")


def test_no_module_over_the_line_budget():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these (over {MAX_LINES} lines): {long}"


def test_cited_documents_exist():
    """Every markdown file a tracked file names is in the repository (by path or by name)."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    names = {Path(f).name for f in files}
    paths = set(files)
    missing = {}
    for f in files:
        if not f.endswith((".py", ".md", ".sh", ".toml")):
            continue
        for ref in re.findall(r"[\w./-]*\b[A-Za-z_][\w-]*\.md\b", (ROOT / f).read_text(errors="replace")):
            ref = ref.lstrip("./")
            if ref.startswith(("http", "www.")) or "/" in ref and ref in paths:
                continue
            if Path(ref).name not in names:
                missing.setdefault(f, set()).add(ref)
    assert not missing, f"files cite documents the repository does not hold: {missing}"


def test_every_subpackage_is_installed():
    """pyproject lists its packages by hand: a subpackage missing there would be missing from a
    regular (non-editable) install."""
    import pytest

    tomllib = pytest.importorskip("tomllib")  # (Python 3.11+)
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {_module_name(p.parent / "__init__.py") for p in PACKAGE.rglob("__init__.py")} | {"fastdpo.kernels"}
    assert found <= listed, f"add to pyproject's packages: {sorted(found - listed)}"
