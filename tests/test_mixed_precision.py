"""Training under ``torch.autocast("cpu", dtype=torch.bfloat16)``: one spec of each family (depths shrunk to one),
the deformable ones included, takes a training step with finite gradients on every parameter that has one, its
logits within bf16 tolerance of the float32 model's, and every linear layer and convolution computing in bf16 (no
silent upcast of the model); then an AdamW step (tests/support/autocast.py; tests/test_cuda.py takes the same step on
a GPU)."""

from __future__ import annotations

import pytest
import torch

import blockgraph as bg
from blockgraph.spec.references import SPEC_DIR
from tests.support.autocast import SPECS, check_bf16_training_step
from tests.support.specs import shrunk


@pytest.mark.parametrize("name", SPECS)
def test_a_bf16_autocast_training_step(name: str) -> None:
    torch.manual_seed(0)
    model = bg.build_model(name, overrides=shrunk(SPEC_DIR / f"{name}.yaml")).train()
    check_bf16_training_step(model, torch.randn(2, 3, *model.spec.input.size))
