"""The layout's floors, checked on the source (docs/DESIGN.md "Packages"): every ``import`` statement of the
project's own code, including the lazy ones inside functions, read with ``ast`` (nothing is imported).

Ground floor: ``salf/`` (the contract, the CLI conventions, the shared figures). Above it the stages:
``training/`` (torch), ``export/`` (training's model -> ONNX), ``serving/`` (the gateway, no torch). Top
floor: ``clients/``, where ``clients/salfctl.py`` assembles every stage's commands into one app.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("salf", "training", "export", "serving", "clients")
TORCH = ("torch", "torchvision", "timm", "open_clip")

# package -> what it must never import (project packages and heavy libraries)
FORBIDDEN = {
    "salf": ("training", "export", "serving", "clients", *TORCH),
    "training": ("export", "serving", "clients"),
    "export": ("serving", "clients"),
    "serving": ("training", "export", "clients", *TORCH),
}


def _modules(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py")
                  if not p.relative_to(ROOT).as_posix().startswith("salf/v1/"))


def imported(path: Path) -> set[str]:
    """Top-level names of every absolute import in ``path`` (relative imports stay inside the package)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_walk_sees_lazy_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import os\ndef f():\n    from clients.client import SalfClient\n    import torch.nn\n"
                   "from . import sibling\n")
    assert imported(src) == {"os", "clients", "torch"}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_climbs_or_crosses(package):
    bad = [f"{p.relative_to(ROOT)} imports {name}"
           for p in _modules(package) for name in sorted(imported(p) & set(FORBIDDEN[package]))]
    assert not bad, "\n".join(bad)


def test_the_client_library_needs_no_gateway():
    """clients/client.py is what production callers import: grpc and the generated API, nothing else of ours."""
    ours = imported(ROOT / "clients" / "client.py") & set(PACKAGES)
    assert ours <= {"salf"}, ours


def test_every_package_is_checked():
    assert set(FORBIDDEN) | {"clients"} == set(PACKAGES)
    assert all(_modules(p) for p in PACKAGES)


MAX_LINES = 400  # one job per file (issue 26); a file that needs more says why here
LONG_FILES_WHY: dict[str, str] = {}


def test_no_file_does_more_than_one_job():
    """The project's own source (Python, the explorer's JavaScript/CSS/HTML, tests included) stays under
    ``MAX_LINES`` lines a file: past that a file is holding several jobs and should be split."""
    suffixes = {".py", ".js", ".css", ".html"}
    roots = [ROOT / p for p in (*PACKAGES, "tests")]
    long = {p.relative_to(ROOT).as_posix(): n for root in roots for p in root.rglob("*")
            if p.suffix in suffixes and "salf/v1" not in p.as_posix() and "__pycache__" not in p.parts
            and (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert set(long) <= set(LONG_FILES_WHY), long
