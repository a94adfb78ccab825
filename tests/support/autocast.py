"""One training step under bf16 autocast and what it must give: on the CPU (tests/test_mixed_precision.py) and on a GPU
(tests/test_cuda.py), for one spec of each family (depths shrunk to one), the deformable ones included."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from tests.support.specs import ONE_TWIN_PER_FAMILY

SPECS = [*ONE_TWIN_PER_FAMILY, "mpvit_tiny", "vit_small_early_conv", "coat_lite_small_deformable", "deformable_encoder"]

BF16_EPS = 2.0**-8
"""bfloat16 keeps 8 significant bits: each rounding is off by at most 2^-8 of the value, relative."""
TOLERANCE = 10 * BF16_EPS
"""The logits may differ from float32's by 10 roundings' worth, relative to their largest magnitude (~0.04): every
matrix product, convolution and normalization rounds its result to bf16, and a shrunk model stacks some 10-30 of them
whose errors add up like a random walk (measured on the CPU: 0.004-0.015 on these specs)."""


def check_bf16_training_step(model: nn.Module, x: torch.Tensor) -> None:
    """A training step of ``model`` (train mode) on ``x`` under ``torch.autocast(x.device.type, torch.bfloat16)``:
    every linear layer and convolution computes in bf16 (no silent upcast of the model), the float32 gradients of
    (nearly) every parameter are finite, the outputs are within :data:`TOLERANCE` of the float32 model's, and an
    AdamW step leaves every parameter finite."""
    computed: list[torch.dtype] = []
    hooks = [
        m.register_forward_hook(lambda m, i, out: computed.append(out.dtype))
        for m in model.modules()
        if isinstance(m, nn.Linear | nn.Conv2d)
    ]
    torch.manual_seed(1)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
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
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
