"""The layering rules docs/ARCHITECTURE.md states, checked on the imports of the code itself
(every `import` / `from ... import`, at any depth of a module, read with ast)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
from conftest import REPO

from converter.families import REMOTE_CODE

REMOTE_CODE_MAY_IMPORT = {"torch", "transformers", "numpy", "PIL"}  # + the standard library, relatively


def _imports(path: Path) -> set[str]:
    """Top-level package of every absolute import in `path`; relative imports as '.'."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add("." if node.level else node.module.split(".")[0])
    return found


def _files(folder: str, *, exclude: str | None = None) -> list[Path]:
    files = sorted((REPO / folder).rglob("*.py"))
    return [f for f in files if exclude is None or exclude not in f.relative_to(REPO).parts]


@pytest.mark.parametrize("path", _files("mappings"), ids=lambda p: p.name)
def test_mappings_import_neither_modeling_nor_converter(path):
    assert not _imports(path) & {"modeling", "converter"}


@pytest.mark.parametrize("path", _files("converter/formats"), ids=lambda p: p.name)
def test_formats_know_no_family(path):
    """Readers and writers take names and transforms from the engine; they import no table, no
    family and no model code."""
    assert not _imports(path) & {"modeling", "mappings", "converter", "megatron"}


@pytest.mark.parametrize("path", _files("modeling", exclude="megatron"), ids=lambda p: p.name)
def test_the_hf_class_never_imports_megatron(path):
    assert "megatron" not in _imports(path)


@pytest.mark.parametrize("name", REMOTE_CODE)
def test_remote_code_files_are_self_contained(name):
    """Copied verbatim beside the weights: loadable where nvlm-port is not installed."""
    others = _imports(REPO / "modeling" / name) - {"."} - REMOTE_CODE_MAY_IMPORT - {"__future__"}
    assert others <= set(sys.stdlib_module_names), others


def test_the_converter_needs_no_megatron_core():
    """converter/ (the parity suite apart, which runs the Megatron side) imports no megatron."""
    offenders = [
        p.relative_to(REPO).as_posix()
        for p in _files("converter")
        if "megatron" in _imports(p) and "parity" not in p.relative_to(REPO).as_posix()
    ]
    assert not offenders
