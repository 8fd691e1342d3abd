"""The folders are the architecture: common <- client, common <- server; simulations composes."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "common": {"client", "server", "simulations"},
    "client": {"server", "simulations"},
    "server": {"client", "simulations"},
}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layering(package):
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) & FORBIDDEN[package])
        for path in (ROOT / package).rglob("*.py")
        if imported_packages(path) & FORBIDDEN[package]
    }
    assert not offenders, f"{package} must not import {sorted(FORBIDDEN[package])}: {offenders}"


def test_detector_sees_imports(tmp_path):
    sample = tmp_path / "x.py"
    sample.write_text("import client.app\nfrom server import federation\n")
    assert imported_packages(sample) == {"client", "server"}


# What only a merchant may touch: its DP secret and its customers' event files.
MERCHANT_ONLY = {
    "read_events",
    "read_parquet",
    "read_csv",
    "read_table",
    "load_merchant_secret",
    "ensure_merchant_secret",
    "MerchantSecret",
    "dp_randomness",
    "SECRET_FILE",
    "dp-secret",
    "events.parquet",
}


def merchant_only_uses(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    used: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            used.add(node.id)
        elif isinstance(node, ast.Attribute):
            used.add(node.attr)
        elif isinstance(node, ast.ImportFrom):
            used.update(alias.name for alias in node.names)
            used.update((node.module or "").split("."))
        elif isinstance(node, ast.Import):
            used.update(part for alias in node.names for part in alias.name.split("."))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            used.update(word for word in MERCHANT_ONLY if word in node.value)
    return used & MERCHANT_ONLY


def test_platform_code_never_reads_merchant_secrets_or_event_files():
    offenders = {
        str(path.relative_to(ROOT)): sorted(merchant_only_uses(path))
        for path in (ROOT / "server").rglob("*.py")
        if merchant_only_uses(path)
    }
    assert not offenders, f"server/ must not read merchants' secrets or events: {offenders}"


def test_merchant_only_detector_sees_reads(tmp_path):
    sample = tmp_path / "x.py"
    sample.write_text(
        "import pandas as pd\nfrom client.dp_randomness import load_merchant_secret\n"
        "pd.read_parquet('m/events.parquet')\n"
    )
    assert merchant_only_uses(sample) == {
        "dp_randomness",
        "load_merchant_secret",
        "read_parquet",
        "events.parquet",
    }


PROJECT = ("common", "client", "server", "simulations")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path, modules: set[str], *, root: Path = ROOT) -> set[str]:
    """Every project module ``path`` imports, at any depth in the file (an import inside a
    function is still an import), relative imports resolved."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = [p for package in PROJECT for p in (ROOT / package).rglob("*.py")]
    modules = {module_name(p) for p in files}
    graph = {module_name(p): project_imports(p, modules) for p in files}
    # importing a submodule runs its package's __init__ first, but that is not a dependency edge
    return {
        m: {d for d in deps if d != m and not m.startswith(d + ".")} for m, deps in graph.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circle_anywhere():
    assert cycles(import_graph()) == []


def test_cycle_detector_sees_function_level_and_relative_imports(tmp_path):
    assert cycles({"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}, "b": {"a.x"}}) == [
        ["a.x", "a.y", "a.z"]
    ]
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "one.py").write_text("def f():\n    from pkg.two import g\n")
    (package / "two.py").write_text("from . import one\n")
    modules = {"pkg", "pkg.one", "pkg.two"}
    assert project_imports(package / "one.py", modules, root=tmp_path) == {"pkg.two"}
    assert project_imports(package / "two.py", modules, root=tmp_path) == {"pkg", "pkg.one"}
