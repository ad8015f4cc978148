"""Packaging: one source of the version (pyproject.toml, read through the installed metadata by
``sparsecl.__version__`` and ``sparsecl --version``), the licence file and the PEP 561 marker."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

from click.testing import CliRunner

import sparsecl
from sparsecl.cli import main

ROOT = Path(__file__).resolve().parents[1]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_one_version_everywhere():
    declared = pyproject()["project"]["version"]
    assert importlib.metadata.version("sparsecl") == declared
    assert sparsecl.__version__ == declared
    out = CliRunner().invoke(main, ["--version"])
    assert out.exit_code == 0
    assert out.output.strip().endswith(f"version {declared}")


def test_license_and_typing_marker_are_shipped():
    project = pyproject()
    assert project["project"]["license"] == "MIT"
    assert project["project"]["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text(encoding="utf-8").startswith("MIT License")
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["sparsecl"]
    assert (Path(sparsecl.__file__).parent / "py.typed").is_file()
    assert "Typing :: Typed" in project["project"]["classifiers"]


def test_package_names_load_on_first_use():
    """``import sparsecl`` imports neither torch nor any method; every public name still resolves,
    to the object its submodule defines."""
    import subprocess
    import sys

    code = ("import sys, sparsecl; print('torch' in sys.modules, 'sparsecl.trainer' in sys.modules); "
            "from sparsecl import Trainer; import sparsecl.trainer as t; print(Trainer is t.Trainer); "
            "print([n for n in sparsecl.__all__ if not hasattr(sparsecl, n)])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:3] == ["False False", "True", "[]"]
    assert "Trainer" in dir(sparsecl)
    try:
        sparsecl.no_such_name
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("an unknown name must raise AttributeError")
