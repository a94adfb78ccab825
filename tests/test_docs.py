"""Generated docs are current (CI fails with the command that refreshes them) and complete: every op, every
field, with its type, default and description as the models define them."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from blockgraph.docs import REFRESH, VOCABULARY, pages, spec_language, type_text, undocumented
from blockgraph.spec.plugins import registry
from tests.conftest import ROOT
from tests.graph.test_render import _mermaid_structure


@pytest.fixture(scope="module")
def generated() -> dict[str, str]:
    return pages()


@pytest.mark.parametrize("name", ["spec-language.md", "blockgraph.schema.json", "coat_lite_small.md"])
def test_checked_in_docs_are_current(name: str, generated: dict[str, str]) -> None:
    path = ROOT / "docs" / name
    assert path.is_file(), f"docs/{name} is missing: run `{REFRESH}` (or `make docs`)"
    assert path.read_text() == generated[name], f"docs/{name} is stale: run `{REFRESH}` (or `make docs`)"


def _op_sections(text: str) -> dict[str, str]:
    ops = text.split("\n## Ops\n", 1)[1].split("\n## ", 1)[0]  # up to the next section
    parts = re.split(r"^### `(\w+)`$", ops, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_every_op_and_field_is_documented(generated: dict[str, str]) -> None:
    sections = _op_sections(generated["spec-language.md"])
    ops = registry()
    assert list(sections) == list(ops)
    for op, cls in ops.items():
        rows = {
            m.group(1): m.groups()[1:]
            for m in re.finditer(r"^\| `(\w+)` \| (.*?) \| (.*?) \| (.*?) \|$", sections[op], flags=re.M)
        }
        expected = {info.alias or n for n, info in cls.model_fields.items()} - {"op", "name", "from"}
        assert set(rows) == expected, op
        for name, info in cls.model_fields.items():
            if name in ("op", "name", "from_"):
                continue
            kind, default, description = rows[info.alias or name]
            assert kind == type_text(info.annotation, info.metadata).replace("|", "\\|")
            assert (default == "required") == info.is_required()
            assert default == "required" or (default.startswith("`") and default.endswith("`"))
            if info.description:  # its own description, on one line
                assert description.startswith(" ".join(info.description.replace("``", "`").split())[:40])
            elif name in VOCABULARY:
                assert description == VOCABULARY[name] + " ‡"
            else:
                assert description == "—"


def test_types_and_defaults_read_well(generated: dict[str, str]) -> None:
    conv_bn = _op_sections(generated["spec-language.md"])["conv_bn"]
    assert "| `dim_out` | int > 0 | required | Output channels. |" in conv_bn
    assert "| `padding` | int ≥ 0 or null | `null` | Default: `(kernel - 1) // 2`. |" in conv_bn
    assert '| `act` | `identity`, `hardswish`, `relu`, `silu` or `gelu` | `"identity"` |' in conv_bn
    serial = _op_sections(generated["spec-language.md"])["serial_block"]
    assert "Shared modules: `cpe` (`conv_pos_enc`), `crpe` (`conv_rel_pos_enc`)." in serial
    assert "| `cpe` | name of a shared `conv_pos_enc` module | required |" in serial
    crpe = _op_sections(generated["spec-language.md"])["conv_rel_pos_enc"]
    assert "| `windows` | mapping int > 0 → int > 0 |" in crpe


def test_grammar_sections(generated: dict[str, str]) -> None:
    text = generated["spec-language.md"]
    for construct in ("`extends: parent.yaml`", "`variants: {small: {...}}`", "`- for: {i: [0, 1, 2, 3]}`",
                      "`- if: ${cond}`", "`depth: N`", "`${...}`"):  # fmt: skip
        assert f"| {construct}" in text
    for heading in ("## The model", "## Stages", "## Paths", "## Fields of every block", "## Ops", "### InputSpec"):
        assert f"\n{heading}\n" in text
    for key in ("extends", "variants", "variables", "stages", "shared", "features", "twin"):
        assert f"| `{key}` |" in text.split("## Stages")[0]
    assert "`merge` | block (any [op](#ops)) or null" in text


def test_cli_docs_prints_and_writes(tmp_path, run_cli) -> None:
    code, out, _ = run_cli("docs")
    assert code == 0 and out == spec_language()
    code, out, _ = run_cli("docs", "--all", tmp_path)
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "blockgraph.schema.json",
        "coat_lite_small.md",
        "spec-language.md",
    ]
    code, _, err = run_cli("docs", "--all", tmp_path / "nope")
    assert code == 2 and "no such directory" in err


def test_picture_page(generated: dict[str, str]) -> None:
    page = generated["coat_lite_small.md"]
    block = page.split("```mermaid\n", 1)[1].split("```", 1)[0]
    nodes, edges, subgraphs = _mermaid_structure(block)
    assert subgraphs == ["stage1", "stage2", "stage3", "stage4"]
    assert len(nodes) == 43 and sum(a == "-.->" for _, a, _ in edges) == 32
    assert "[coat_lite_small](docs/coat_lite_small.md)" in (ROOT / "README.md").read_text()


def test_every_op_field_has_its_own_description() -> None:
    assert undocumented() == {}


def test_readme_shows_the_current_picture(generated: dict[str, str]) -> None:
    page = generated["coat_lite_small.md"]
    block = "```mermaid\n" + page.split("```mermaid\n", 1)[1].split("```", 1)[0] + "```\n"
    assert block in (ROOT / "README.md").read_text(), (
        "README's coat_lite_small picture is stale: copy the mermaid block of docs/coat_lite_small.md "
        "(python cli.py docs --all docs) into README.md"
    )


def test_field_descriptions_are_read_only_when_something_shows_them() -> None:
    """Parsing every block class's source for its field docstrings is ~100 ms: a validate process (in a fresh
    interpreter) never does it; docs, the JSON Schema and error hints do, and then every field has its text."""
    code = (
        "import blockgraph as bg\n"
        "from blockgraph.spec import schema, source_schema\n"
        "bg.validate('specs/coat_lite_tiny.yaml')\n"
        "assert not schema._DESCRIBED, 'validate parsed sources'\n"
        "assert schema.registered()['mlp'].model_fields['mlp_ratio'].description is None\n"
        "source_schema.json_schema()\n"
        "assert schema.registered()['mlp'].model_fields['mlp_ratio'].description.startswith('Hidden width')\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_every_yaml_block_of_the_readme_parses_and_is_its_files_text() -> None:
    """An excerpt of a spec is that spec's text, verbatim (the examples that are not excerpts, `define:` blocks,
    are built by tests/spec/test_define.py)."""
    import re

    import yaml

    files = [p.read_text() for p in (ROOT / "specs").rglob("*.yaml")]
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) >= 3
    for block in blocks:
        yaml.safe_load(block)
        if block.startswith(("# yaml-language-server", "define:")):
            continue
        assert any(block in text for text in files), f"README excerpt is not any spec's text:\n{block}"


def test_the_readme_validate_examples_print_what_they_show(run_cli) -> None:
    """Each `$ python cli.py validate ...` of the README whose spec exists (not `broken.yaml`) prints its lines."""
    import shlex

    shown = re.findall(
        r"```console\n\$ python cli.py (validate [^\n]*)\n(.*?)```", (ROOT / "README.md").read_text(), re.S
    )
    checked = 0
    for command, output in shown:
        argv = shlex.split(command)
        if argv[1].endswith(".yaml") and not (ROOT / argv[1]).is_file():
            continue
        code, out, _ = run_cli(*(str(ROOT / a) if a.endswith(".yaml") else a for a in argv))
        assert code == 0 and out.replace(str(ROOT) + "/", "") == output, command
        checked += 1
    assert checked >= 2
