"""Budgets before allocation: absurd specs fail fast with a BudgetError (or a SpecError), never a torch crash."""

from __future__ import annotations

import pytest

import blockgraph as bg
from tests.conftest import ROOT

VIT = (ROOT / "specs" / "vit.yaml").read_text()
TINY = ROOT / "specs" / "coat_lite_tiny.yaml"


def test_a_width_too_large_to_exist_names_its_block() -> None:
    with pytest.raises(bg.BudgetError, match="too large to exist") as info:
        bg.build_model(VIT.replace("dim: 192", "dim: 999999999"))
    assert info.value.node == "blocks.0"
    assert info.value.line == VIT.split("\n").index("  - name: blocks") + 1


def test_a_model_over_max_params_is_refused_with_its_count() -> None:
    with pytest.raises(bg.BudgetError, match=r"would have 129,663,751,000 parameters, over the limit of 2,000,000,000"):
        bg.build_model(VIT.replace("dim: 192", "dim: 30000"))
    with pytest.raises(bg.BudgetError, match="5,721,960 parameters"):
        bg.build_model(TINY, max_params=1e6)
    assert bg.build_model(TINY, max_params=None, device="meta") is not None


def test_a_depth_of_ten_million_is_refused_by_expansion() -> None:
    with pytest.raises(bg.SpecError, match=r"`depth` 10,000,000 is larger than the limit 100,000"):
        bg.build_model(VIT.replace("depth: 12", "depth: 10000000"))


def test_cli_budgets(run_cli) -> None:
    code, _, err = run_cli("build", TINY, "--max-params", "1e6")
    assert code == 2 and "over the limit of 1,000,000" in err and "largest nodes: stage4.blocks.0 (1,232,960)" in err
    code, _, err = run_cli("build", TINY, "--max-activation-bytes", "1e6", "--batch", "8")
    assert code == 2 and "MiB of activations for a batch of 8 at 224x224" in err
    code, out, err = run_cli("build", TINY, "--max-activation-bytes", "1e9")
    assert code == 0, err
