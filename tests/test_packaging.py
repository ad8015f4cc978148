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
