"""The installable package: the wheel holds `tnllm` alone (kernels, quant, webui and the bundled model inside it),
and every module is imported under its one package name (docs/architecture.md#checkout-and-installed-package)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

LINKED = ("kernels", "quant", "webui", "assets")  # repository folders the package reaches through symlinks
SOURCES = ("pyproject.toml", "requirements.txt", "tnllm", *LINKED)  # what building the wheel reads


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The wheel `pip wheel .` builds, from a copy of the sources (the build writes build/ and *.egg-info)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp / "dist")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (built,) = (tmp / "dist").glob("tnllm-*.whl")
    with zipfile.ZipFile(built) as zf:
        yield zf


def test_package_folders_are_relative_symlinks_into_the_repository():
    for name in LINKED:
        link = ROOT / "tnllm" / name
        assert link.is_symlink() and str(link.readlink()) == f"../{name}", f"tnllm/{name} must link to ../{name}"


def test_wheel_installs_only_the_tnllm_package(wheel):
    names = wheel.namelist()
    top = {name.split("/")[0] for name in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"tnllm"}, sorted(top)
    for folder in ("kernels", "quant", "webui"):
        modules = {p.name for p in (ROOT / folder).glob("*.py")}
        assert modules <= {Path(n).name for n in names if n.startswith(f"tnllm/{folder}/")}, folder
    shipped = {p.relative_to(ROOT / "assets").as_posix() for p in (ROOT / "assets").rglob("*") if p.is_file()}
    assert {f"tnllm/assets/{name}" for name in shipped} <= set(names), "the bundled model is package data"


def test_wheel_declares_the_pinned_requirements_and_both_commands(wheel):
    info = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    requires = {line.split(": ", 1)[1] for line in wheel.read(info).decode().splitlines()
                if line.startswith("Requires-Dist: ")}
    pinned = {line for line in (ROOT / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    assert requires == pinned
    scripts = wheel.read(info.replace("METADATA", "entry_points.txt")).decode()
    assert "tnllm-chat = tnllm.webui.launch:main" in scripts and "tnllm-check = tnllm.__main__:main" in scripts


def _python_files() -> list[Path]:
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    return [ROOT / name for name in tracked.stdout.split()]


def _top_level_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_no_module_is_imported_under_a_second_name():
    """`kernels` holds global state (the forced implementation): imported both as `kernels` and `tnllm.kernels`
    it would exist twice. Every import names the package path, in the checkout as in an installed package."""
    offenders = {str(p.relative_to(ROOT)): sorted(_top_level_imports(p) & {"kernels", "quant", "webui"})
                 for p in _python_files()}
    assert not {k: v for k, v in offenders.items() if v}, "import these as tnllm.<name>"
