"""Training under ``torch.autocast("cpu", dtype=torch.bfloat16)``: one spec of each family (depths shrunk to one),
the deformable ones included, takes a training step with finite gradients on every parameter that has one, its
logits within bf16 tolerance of the float32 model's, and every linear layer and convolution computing in bf16 (no
silent upcast of the model)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

import blockgraph as bg
from blockgraph.spec.references import SPEC_DIR
from tests.support.specs import ONE_TWIN_PER_FAMILY, shrunk

SPECS = [*ONE_TWIN_PER_FAMILY, "mpvit_tiny", "vit_small_early_conv", "coat_lite_small_deformable", "deformable_encoder"]

BF16_EPS = 2.0**-8
"""bfloat16 keeps 8 significant bits: each rounding is off by at most 2^-8 of the value, relative."""
TOLERANCE = 10 * BF16_EPS
"""The logits may differ from float32's by 10 roundings' worth, relative to their largest magnitude (~0.04): every
matrix product, convolution and normalization rounds its result to bf16, and a shrunk model stacks some 10-30 of them
whose errors add up like a random walk (measured: 0.004-0.015 on these specs)."""


@pytest.mark.parametrize("name", SPECS)
def test_a_bf16_autocast_training_step(name: str) -> None:
    torch.manual_seed(0)
    model = bg.build_model(name, overrides=shrunk(SPEC_DIR / f"{name}.yaml")).train()
    x = torch.randn(2, 3, *model.spec.input.size)
    computed: list[torch.dtype] = []
    hooks = [
        m.register_forward_hook(lambda m, i, out: computed.append(out.dtype))
        for m in model.modules()
        if isinstance(m, nn.Linear | nn.Conv2d)
    ]
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x)
    for hook in hooks:
        hook.remove()
    assert computed and all(d == torch.bfloat16 for d in computed), set(computed)  # no silent upcast
    loss = sum(t.float().square().mean() for t in tree_leaves(low))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) > 0.9 * len(list(model.parameters()))
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    torch.manual_seed(1)
    with torch.no_grad():
        high = model(x)
    for a, b in zip(tree_leaves(low), tree_leaves(high), strict=True):
        assert (a.float() - b).abs().max().item() <= TOLERANCE * b.abs().max().item()
