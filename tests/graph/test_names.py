"""Module names: the compiler's reserved words are exactly the attributes of ``nn.Module`` and the model, and what
the graph refuses it refuses before the compiler could crash on it."""

from __future__ import annotations

import keyword

import pytest
from torch import nn

import blockgraph as bg
from blockgraph.compiler.model import BlockgraphModel
from blockgraph.errors import Pos
from blockgraph.graph.names import MODEL_ATTRIBUTES, MODULE_ATTRIBUTES, module_name_errors, name_problem


def _public(names: set[str]) -> set[str]:
    """Without the names that start with '__' (refused as a kind: torch itself adds some at run time)."""
    return {n for n in names if not n.startswith("__")}


def test_reserved_names_cover_nn_module_and_the_model() -> None:
    """The torch-free lists are complete: every attribute of a module, and of a built model, is refused."""
    module = _public(set(dir(nn.Module)) | set(nn.Module().__dict__))
    assert module <= MODULE_ATTRIBUTES, sorted(module - MODULE_ATTRIBUTES)
    model = bg.create_model("coat_lite_tiny")
    attributes = _public(set(dir(BlockgraphModel)) | set(model.__dict__)) - set(model._modules)
    assert attributes <= MODULE_ATTRIBUTES | MODEL_ATTRIBUTES, sorted(attributes - MODULE_ATTRIBUTES - MODEL_ATTRIBUTES)


@pytest.mark.parametrize("name", [*keyword.kwlist, "forward", "to", "_modules", "__init__", "training"])
def test_reserved_parts_are_refused_anywhere(name: str) -> None:
    assert name_problem(name, top=False) is not None
    assert name_problem(name, top=True) is not None


def test_model_attributes_are_free_below_the_top() -> None:
    """``spec`` is the model's attribute, not a namespace module's: ``s1.spec`` is fine, ``spec`` is not."""
    assert name_problem("spec", top=True) is not None
    assert name_problem("spec", top=False) is None
    assert name_problem("forward_", top=True) is None


def test_numbered_and_named_modules_side_by_side_are_refused() -> None:
    here = Pos("spec.yaml", 3, 5)
    errors = module_name_errors([("pe.0", here, "pe.0"), ("pe.proj", here, "pe.proj")], {})
    assert [e.message for e in errors] == ["'pe' holds numbered modules ('pe.0') and named ones ('pe.proj')"]
    assert module_name_errors([("pe.0", here, "pe.0"), ("pe.1", here, "pe.1")], {}) == []


def test_a_problem_of_a_stage_name_is_reported_once_at_the_stage() -> None:
    stage, block = Pos("spec.yaml", 2, 9), Pos("spec.yaml", 5, 12)
    modules = [("to.a", block, "to.a"), ("to.b", block, "to.b"), ("to.c", block, "to.c")]
    errors = module_name_errors(modules, {"to": (stage, "to")})
    assert len(errors) == 1
    assert errors[0].pos == stage and "'to' is an attribute of every torch module" in errors[0].message
