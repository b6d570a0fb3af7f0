"""The layering rules docs/ARCHITECTURE.md states, checked on the imports of the code itself
(every `import` / `from ... import`, at any depth of a module, read with ast)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
from conftest import REPO

from converter.families import FAMILIES, REMOTE_CODE

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


def _modules(path: Path) -> set[str]:
    """Every absolute module name `path` imports (dotted, as written)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            found.add(node.module)
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


@pytest.mark.parametrize("path", _files("modeling", exclude="megatron"), ids=lambda p: p.name)
def test_the_hf_side_knows_no_checkpoint_format(path):
    assert "converter" not in _imports(path)


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


def _generic_converter_files() -> list[Path]:
    """converter/ less the families (which name models) and the parity suite (parity/ and
    parity_cli.py: it runs the Megatron side and the NVLM-D model class by design)."""
    return [
        p
        for p in _files("converter", exclude="families")
        if not any(part.startswith("parity") for part in p.relative_to(REPO).parts)
    ]


def test_the_converter_takes_args_knowledge_from_mappings():
    """The args <-> config tables and padding rules live in mappings/ (megatron_args.py and each
    family's table): converter/ outside the parity suite imports nothing of modeling/megatron/."""
    offenders = [
        p.relative_to(REPO).as_posix()
        for p in _generic_converter_files() + _files("converter/families")
        if any(m == "modeling.megatron" or m.startswith("modeling.megatron.") for m in _modules(p))
    ]
    assert not offenders


def _family_markers() -> set[str]:
    """What names a family in code: its name, its config.json model types, its image token."""
    markers = set()
    for family in FAMILIES:
        markers |= {family.name, *family.hf_model_types}
        if family.image_token:
            markers.add(family.image_token)
    return markers


def _string_constants(path: Path):
    """(line, text) of every string literal in `path` that is not a docstring."""
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def test_the_marker_scan_sees_the_families():
    """The scan below finds what it looks for where the families are named (else it proves nothing)."""
    named_in = _files("converter/families") + _files("mappings")
    found = {text for p in named_in for _, text in _string_constants(p)}
    assert _family_markers() <= found


@pytest.mark.parametrize("path", _generic_converter_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_no_family_is_named_in_generic_code(path):
    """Generic converter code (the engine, formats, CLI, API, verify, manifest, card) asks the
    family's contract (converter/families/base.py) instead of naming a family."""
    markers = _family_markers()
    hits = [
        (line, text)
        for line, text in _string_constants(path)
        if text in markers or any(m.startswith("<") and m in text for m in markers)
    ]
    assert not hits, hits
