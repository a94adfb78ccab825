"""The editor schema (docs/blockgraph.schema.json): current, a valid draft-07 schema, accepting every reference spec
as written (extends, variables, for/if, depth, ${...}) and rejecting unknown ops and keys."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
import yaml

import blockgraph as bg
from blockgraph.spec.plugins import registry
from blockgraph.spec.source_schema import json_schema, source_schema
from tests.conftest import ROOT, SPECS

CHECKED_IN = ROOT / "docs" / "blockgraph.schema.json"


def _as_editor_sees_it(data: Any) -> Any:
    """YAML as a YAML language server hands it to the schema: mapping keys are strings (``{3: 2}`` → ``{"3": 2}``)."""
    if isinstance(data, dict):
        return {str(k): _as_editor_sees_it(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_as_editor_sees_it(v) for v in data]
    return data


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    schema = json.loads(CHECKED_IN.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_checked_in_schema_is_current() -> None:
    current = json.dumps(source_schema(), indent=2, ensure_ascii=False) + "\n"
    assert CHECKED_IN.read_text() == current, (
        "docs/blockgraph.schema.json is stale: run `python cli.py schema --out docs/blockgraph.schema.json` "
        "(or `make docs`)"
    )


def test_cli_schema_prints_the_same(run_cli) -> None:
    code, out, _ = run_cli("schema")
    assert code == 0 and out == CHECKED_IN.read_text()


def test_readme_points_editors_at_it() -> None:
    assert "# yaml-language-server: $schema=../docs/blockgraph.schema.json" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_every_reference_spec_as_written_validates(path, validator) -> None:
    data = _as_editor_sees_it(yaml.safe_load(path.read_text()))
    errors = [f"{list(e.absolute_path)}: {e.message[:200]}" for e in validator.iter_errors(data)]
    assert errors == []


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_every_expanded_spec_validates_against_the_expanded_schema(path) -> None:
    data = json.loads(json.dumps(bg.analyze(path).expanded.data))  # JSON types: tuples → lists, int keys → str
    assert list(jsonschema.Draft202012Validator(json_schema()).iter_errors(data)) == []


BASE = """
name: x
variables: {dims: [8, 16]}
stages:
  - for: {i: [0, 1]}
    name: stage${i + 1}
    blocks:
      - {name: conv, op: conv_bn, dim_out: "${dims[i]}", kernel: 3, stride: 2}
"""


def test_an_op_the_schema_does_not_know_may_be_a_defined_block(validator) -> None:
    """A file's own `define:` names are not in the schema: an unknown op is left to blockgraph, which knows them."""
    typo = _as_editor_sees_it(yaml.safe_load(BASE.replace("op: conv_bn", "op: conv_bnn")))
    assert list(validator.iter_errors(typo)) == []
    with pytest.raises(bg.SpecError, match="unknown op 'conv_bnn'"):
        bg.validate(BASE.replace("op: conv_bn", "op: conv_bnn"))
    defined = BASE + "define:\n  conv_bnn: {params: {dim_out: null}, blocks: [{op: conv_bn, dim_out: '${dim_out}'}]}\n"
    assert list(validator.iter_errors(_as_editor_sees_it(yaml.safe_load(defined)))) == []


@pytest.mark.parametrize(
    ("edit", "path", "message"),
    [
        (("kernel: 3", "kernal: 3"), ["stages", 0, "blocks", 0], "is not valid under any of the given schemas"),
        (("kernel: 3", "kernel: three"), ["stages", 0, "blocks", 0], "is not valid under any of the given schemas"),
        (("variables:", "variabels:"), [], "'variabels' does not match any of the regexes"),  # nor is it a path
        (("    name: stage", "    nme: stage"), ["stages", 0], "Additional properties are not allowed ('nme' was"),
        (("- for: {i: [0, 1]}", "- for: [0, 1]"), ["stages", 0, "for"], "[0, 1] is not of type 'object'"),
    ],
)
def test_schema_rejects(edit: tuple[str, str], path: list, message: str, validator) -> None:
    good = _as_editor_sees_it(yaml.safe_load(BASE))
    assert list(validator.iter_errors(good)) == []
    assert bg.validate(BASE).name == "x"  # the base spec is valid for blockgraph too
    bad = _as_editor_sees_it(yaml.safe_load(BASE.replace(*edit)))
    errors = list(validator.iter_errors(bad))
    assert errors and all(list(e.absolute_path) == path for e in errors)  # reported at the value that is wrong
    assert any(message in e.message for e in errors)
    with pytest.raises(bg.BlockgraphError):  # and blockgraph rejects it too
        bg.validate(BASE.replace(*edit))


def test_a_registered_op_is_never_taken_for_a_defined_block(validator) -> None:
    """A misspelled key of a registered op is rejected by that op's schema, and by the member for uses of defined
    blocks too (which accepts only ops nobody registered)."""
    bad = _as_editor_sees_it(yaml.safe_load(BASE.replace("kernel: 3", "kernal: 3")))
    (error,) = validator.iter_errors(bad)
    ops_rejecting = {e.validator_value for e in error.context if e.validator == "const"}
    assert ops_rejecting == ({*registry(), "block"} - {"conv_bn"})  # "'<its op>' was expected"; block: inline
    assert any(e.validator == "not" for e in error.context)  # the use of a defined block: a registered op


def test_completion_data_is_there() -> None:
    schema = json.loads(CHECKED_IN.read_text())
    conv = schema["definitions"]["ConvBnSpec"]
    assert conv["properties"]["op"] == {"const": "conv_bn", "title": "Op", "type": "string"}
    assert conv["required"] == ["op", "dim_out"]
    stride = conv["properties"]["stride"]  # an integer > 0, an expression, or null (delete an inherited key)
    assert stride == {
        "title": "Stride",
        "description": "Stride of the convolution (the map shrinks by about this factor).",
        "default": 1,
        "exclusiveMinimum": 0,
        "type": ["integer", "string", "null"],
        "pattern": r"\$\{",
    }
    crpe = schema["definitions"]["ConvRelPosEncSpec"]["properties"]["windows"]
    assert crpe["description"].startswith("Kernel size → heads")
    assert {"extends", "variants", "variables", "stages"} <= set(schema["properties"])
    assert set(schema["definitions"]["StageSpec"]["properties"]) >= {"for", "if", "name", "blocks", "paths", "merge"}
