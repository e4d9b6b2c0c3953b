"""The dependency direction of DESIGN.md: shards and mesh import nothing of ours; server and client
never import each other; heavy optional packages are imported only inside the code that needs them."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("shards", "mesh", "server", "client")
ALLOWED = {
    "shards": {"shards"},
    "mesh": {"mesh"},  # mesh/cli.py is the exception: it imports roles lazily, inside functions
    "server": {"server", "shards", "mesh"},
    "client": {"client", "shards", "mesh"},
}
OPTIONAL = {"bitsandbytes", "fastapi", "uvicorn", "prometheus_client"}


def imports(path: Path, top_level_only: bool):
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0]


def package_files(package: str):
    return sorted((ROOT / package).rglob("*.py")) if (ROOT / package).is_dir() else []


def test_imports_flow_one_way():
    for package in PACKAGES:
        for path in package_files(package):
            top_level_only = path == ROOT / "mesh" / "cli.py"
            ours = {name for name in imports(path, top_level_only) if name in PACKAGES}
            assert ours <= ALLOWED[package], f"{path.relative_to(ROOT)} imports {ours - ALLOWED[package]}"


def test_the_gateway_imports_only_client():
    for path in package_files("client/gateway"):
        ours = {name for name in imports(path, top_level_only=False) if name in PACKAGES}
        assert ours <= {"client"}, f"{path.relative_to(ROOT)} imports {ours - {'client'}}"


def test_optional_packages_are_imported_lazily():
    # The gateway package is itself imported only by `mesh gateway`; inside it FastAPI may load eagerly.
    for package in PACKAGES:
        for path in package_files(package):
            if (ROOT / "client" / "gateway") in path.parents:
                continue
            eager = set(imports(path, top_level_only=True)) & OPTIONAL
            assert not eager, f"{path.relative_to(ROOT)} imports {eager} at module level"


def test_importing_the_client_library_loads_no_web_framework():
    import subprocess
    import sys

    script = "import sys, client; print(sorted(m for m in ('fastapi', 'uvicorn', 'prometheus_client') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
