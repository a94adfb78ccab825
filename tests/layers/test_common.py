"""The layers every family uses: Linear is nn.Linear with its state, and a residual branch adds its residual in the
projection's epilogue only where dropout and drop path cannot be live."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 (the usual name)
from torch import nn

from blockgraph.layers.common import DropPath, Linear, linear, residual_branch
from blockgraph.layers.mlp import Mlp
from blockgraph.ops.autotune import forcing
from tests.support.weights import ops_called


def test_the_blocks_linear_layers_are_nn_linear_with_its_state() -> None:
    layer = linear(24, 40)
    assert isinstance(layer, nn.Linear) and type(layer) is Linear
    assert list(layer.state_dict()) == ["weight", "bias"] and repr(layer) == repr(nn.Linear(24, 40))
    x = torch.randn(3, 24)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))  # with autograd on: F.linear itself
    assert linear(24, 40, device="meta")(x.to("meta")).shape == (3, 40)


def test_a_residual_branch_drops_before_adding_in_training_and_fuses_the_add_in_eval() -> None:
    torch.manual_seed(0)
    mlp = Mlp(16, 2.0, drop=0.5, drop_path=0.5)
    x, residual = torch.randn(4, 5, 16), torch.randn(4, 5, 16)
    with torch.no_grad():
        torch.manual_seed(1)
        trained = mlp.train()(x, residual)
        torch.manual_seed(1)  # the same draws, written out: dropout after each layer, then drop path, then the add
        h = F.dropout(F.gelu(mlp.fc1(x)), 0.5)
        expected = residual + mlp.drop_path(F.dropout(mlp.fc2(h), 0.5))
        torch.testing.assert_close(trained, expected, rtol=0, atol=1e-6)
        assert not torch.allclose(trained, residual + mlp.fc2(F.gelu(mlp.fc1(x))))  # the drops are live
        mlp.eval()
        torch.testing.assert_close(mlp(x, residual), residual + mlp.fc2(F.gelu(mlp.fc1(x))), rtol=0, atol=1e-5)
        with forcing("fused"):
            called = ops_called(lambda: residual_branch(mlp.fc2, h, residual, mlp.drop2, mlp.drop_path))
    assert "mkldnn::_linear_pointwise" in called and "aten::add" not in called


def test_drop_path_scales_kept_samples_and_is_the_identity_in_eval() -> None:
    torch.manual_seed(0)
    layer, x = DropPath(0.25), torch.ones(4000, 3)
    y = layer(x)
    kept = y[:, 0] != 0
    assert torch.equal(y[kept], torch.full_like(y[kept], 1 / 0.75)) and abs(kept.float().mean().item() - 0.75) < 0.03
    assert layer.eval()(x) is x and DropPath(0.0)(x) is x
