"""Budgets before allocation: absurd specs fail fast with a BudgetError (or a SpecError), never a torch crash; the
static costs they use are exact."""

from __future__ import annotations

import time

import pytest

import blockgraph as bg
from blockgraph.compiler.budget import check, estimate
from blockgraph.graph import cost
from tests.conftest import ROOT, SPECS
from tests.support.cost import assert_static_costs_match

VIT_PATH = ROOT / "specs" / "vit.yaml"
VIT = VIT_PATH.read_text()
TINY = ROOT / "specs" / "coat_lite_tiny.yaml"


def test_a_width_too_large_to_exist_is_refused_statically_and_named_without_a_budget() -> None:
    wide = VIT.replace("dim: 192", "dim: 999999999")
    start = time.perf_counter()
    with pytest.raises(bg.BudgetError, match=r"would have 144,000,001,836,999,999,019 parameters") as info:
        bg.build_model(wide)
    assert time.perf_counter() - start < 1.0
    assert "the largest node has 11,999,999,988,999,999,999" in info.value.message
    assert info.value.node == "blocks.0" and info.value.line == VIT.split("\n").index("  - name: blocks") + 1
    assert "next largest: blocks.1 (11,999,999,988,999,999,999), blocks.2" in info.value.hint
    # Without a budget, building fails in the first block that cannot exist, named, as a BudgetError (not torch's
    # RuntimeError): on the CPU the 3 TB patch embedding; on the meta device the first Linear, whose size overflows.
    for device, node, op, what in (
        ("cpu", "patch_embed", "conv_patch_embed", "not enough memory"),
        ("meta", "blocks.0", "vit_block", "too large to exist"),
    ):
        with pytest.raises(bg.BudgetError, match=f"op '{op}': .*{what}") as info:
            bg.build_model(wide, max_params=None, device=device)
        assert info.value.node == node
        assert info.value.line == VIT.split("\n").index(f"  - name: {node.split('.')[0]}") + 1


def test_a_model_over_max_params_is_refused_with_its_count() -> None:
    with pytest.raises(bg.BudgetError, match=r"would have 129,663,751,000 parameters, over the limit of 2,000,000,000"):
        bg.build_model(VIT.replace("dim: 192", "dim: 30000"))
    with pytest.raises(bg.BudgetError, match="5,721,960 parameters"):
        bg.build_model(TINY, max_params=1e6)
    assert bg.build_model(TINY, max_params=None, device="meta") is not None


def test_a_depth_of_ten_million_is_refused_by_expansion() -> None:
    with pytest.raises(
        bg.SpecError, match=r"`depth` 10,000,000 would expand the spec past the limit of 10,000 entries"
    ):
        bg.build_model(VIT.replace("depth: 12", "depth: 10000000"))


def test_cli_budgets(run_cli) -> None:
    code, _, err = run_cli("build", TINY, "--max-params", "1e6")
    assert code == 2 and "over the limit of 1,000,000; the largest node has 1,232,960" in err
    assert err.startswith(f"{TINY.parent / 'coat_lite.yaml'}:54:9: error: node 'stage4.blocks.0'")
    code, _, err = run_cli("build", TINY, "--max-activation-bytes", "1e6", "--batch", "8")
    assert code == 2 and "MiB of activations for a batch of 8 at 224x224" in err
    code, out, err = run_cli("build", TINY, "--max-activation-bytes", "1e9")
    assert code == 0, err


# ------------------------------------------------------------------------------------------- static costs are exact


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_static_params_and_activations_equal_the_built_model(path) -> None:
    """Every block's counting rule equals its module's parameters, and every node's static output bytes equal what
    a forward produces, at the native size and at another accepted size with a batch of 3."""
    model = bg.build_model(path, device="meta")
    native = tuple(model.spec.input.size)
    other = model.inference.acceptance.examples(3)[-1]
    assert_static_costs_match(model, *native)
    assert_static_costs_match(model, *other, batch=3)
    static = cost.params(model.inference)
    assert static.total == sum(p.numel() for p in model.parameters())
    assert not static.unknown


def test_the_estimate_is_exact_and_fast_for_nine_thousand_blocks() -> None:
    """Pricing needs no tensor: a ViT of 9,000 blocks at width 1536 (2.5e11 parameters) is counted exactly and
    refused in a fraction of a second (after its expansion and shape inference)."""
    wide = {"dim": 1536, "heads": 16}
    analysis = bg.analyze(VIT_PATH, overrides={**wide, "depth": 9000})
    start = time.perf_counter()
    result = estimate(analysis.inference, (224, 224), batch=8)
    elapsed = time.perf_counter() - start
    per_block = 12 * 1536**2 + 13 * 1536  # qkv, proj, fc1, fc2 weights; their biases and two LayerNorms
    rest = cost.params(bg.analyze(VIT_PATH, overrides={**wide, "depth": 0}).inference).total
    assert result.params == 9000 * per_block + rest
    assert result.activation_bytes == sum(cost.activation_bytes(analysis.inference, 224, 224, 8).values())
    assert elapsed < 5.0, elapsed  # ~0.3 s here; building the 9,000 blocks, even on the meta device, takes minutes
    with pytest.raises(bg.BudgetError, match=f"would have {result.params:,} parameters"):
        check(analysis.inference, (224, 224))


def test_a_custom_block_without_a_counting_rule_is_counted_on_the_meta_device(monkeypatch) -> None:
    from typing import Literal

    from torch import nn

    from blockgraph.spec import schema
    from blockgraph.spec.schema import BlockSpec, register

    monkeypatch.setattr(schema, "_REGISTRY", dict(schema._REGISTRY))  # the probe op is gone after the test
    monkeypatch.setattr(schema, "_CACHE", {})

    @register
    class BudgetProbeSpec(BlockSpec):
        op: Literal["budget_probe"]
        dim: int

        def infer(self, ctx, x):
            return x

        def build(self, ctx, x):
            return nn.Linear(self.dim, self.dim, **ctx.dd)

    text = VIT.replace(
        "  - if: ${not distilled}\n", "  - {name: probe, op: budget_probe, dim: 192}\n  - if: ${not distilled}\n"
    )
    analysis = bg.analyze(text)
    assert cost.params(analysis.inference).unknown == ["probe"]
    assert estimate(analysis.inference, (224, 224)).params == 5_717_416 + 192 * 192 + 192
