"""The package layers (README, Layout) hold, checked by import-linter with the contracts in pyproject.toml.

The second and third tests show the check has teeth: a copy of the tree with one deliberately wrong import
(a worker importing the trainer; the node importing torch) must fail it, naming the broken contract.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("medfinder", "config", "model_export", "workers", "dicom_node", "trainer")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on ``tree`` (its own pyproject.toml), with that tree first on the import path."""
    return subprocess.run([str(LINT_IMPORTS), "--config", str(tree / "pyproject.toml"), "--no-cache"],
                          cwd=tree, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300)


def test_the_layers_contract_holds() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


def copy_of_the_tree(target: Path) -> Path:
    shutil.copy(ROOT / "pyproject.toml", target / "pyproject.toml")
    for package in PACKAGES:
        shutil.copytree(ROOT / package, target / package, ignore=shutil.ignore_patterns("__pycache__", "*.yaml"))
    return target


@pytest.mark.parametrize(("module", "wrong_import", "contract"), [
    ("workers/dispatch.py", "from trainer.export import parity", "Packages in layers"),
    ("dicom_node/store/state.py", "import torch", "never imports torch"),
    ("config/loader.py", "from dicom_node import node", "Packages in layers"),
])
def test_a_wrong_import_breaks_the_contract(tmp_path: Path, module: str, wrong_import: str, contract: str) -> None:
    tree = copy_of_the_tree(tmp_path)
    path = tree / module
    path.write_text(path.read_text() + f"\n{wrong_import}  # deliberately wrong\n")
    result = lint_imports(tree)
    assert result.returncode != 0, result.stdout
    broken = [line for line in result.stdout.splitlines() if "BROKEN" in line or contract in line]
    assert any(contract in line for line in broken), result.stdout
    assert module.removesuffix(".py").replace("/", ".") in result.stdout, "the report names the offending module"
