"""The layers every family uses: Linear is nn.Linear with its state, and a residual branch adds its residual in the
projection's epilogue only where dropout and drop path cannot be live; in a training step, the scale folded into the
weights and the drop path's factors and the add in one pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 (the usual name)
from torch import nn

from blockgraph.layers.common import DropPath, Linear, linear, residual_branch
from blockgraph.layers.mlp import Mlp
from blockgraph.layers.primitives import Add, Conv2d, layer_scale, residual_add
from blockgraph.layers.primitives import linear as channel_linear
from blockgraph.ops import conv as conv_ops
from blockgraph.ops import linear as linear_ops
from blockgraph.ops.autotune import forcing
from blockgraph.ops.kernel import folding, residual_training
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


@pytest.mark.parametrize("case", ["tokens", "linear2d", "conv3x3", "mlp"])
def test_a_training_branch_folds_its_scale_and_adds_the_drop_path_in_one_pass(case: str, monkeypatch) -> None:
    """In an eager training step a residual branch (a layer, its layer scale, drop path, dropout at 0, the add) runs
    as one ``addcmul`` after a product with the scale folded into the weights (``residual_training``): the same
    values and gradients as its modules run as written, from the same drop path draws (float64, 1e-10), with a
    sample dropped and one kept; tokens and maps (channels-last), linear layers and a 3x3 convolution, and the
    built-in blocks' ``residual_branch`` (an MLP: its drop path and the add). With a hook on the drop path, the
    modules run as written, and so they do with folding turned off."""
    torch.manual_seed(0)
    dd = {"dtype": torch.float64}
    if case == "mlp":
        mlp = Mlp(16, 2.0, drop_path=0.5, **dd).train()
        x, residual = torch.randn(6, 5, 16, **dd), torch.randn(6, 5, 16, **dd)
        params = list(mlp.parameters())

        def run(fused: bool) -> torch.Tensor:
            if fused:
                return mlp(x, residual)
            return residual + mlp.drop_path(mlp.fc2(F.gelu(mlp.fc1(x))))
    else:
        image = case != "tokens"
        layer = (
            Conv2d(8, 8, (3, 3), padding=(1, 1), **dd)
            if case == "conv3x3"
            else channel_linear(8, 8, layout="image" if image else "tokens", **dd)
        ).train()
        scale = layer_scale(8, "image" if image else "tokens", init=0.5, **dd)
        nn.init.normal_(scale.gamma)
        branch = [scale, DropPath(0.5), nn.Dropout(0.0)]
        add = Add(["image", "image"] if image else ["tokens", "tokens"])
        shape = (6, 8, 5, 7) if image else (6, 5, 8)
        x, residual = torch.randn(shape, **dd), torch.randn(shape, **dd)
        if image:
            x, residual = (t.contiguous(memory_format=torch.channels_last) for t in (x, residual))
        params = [*layer.parameters(), scale.gamma]

        def run(fused: bool) -> torch.Tensor:
            if fused:
                return residual_add(layer, x, residual, branch, add)
            y = layer(x)
            for m in branch:
                y = m(y)
            return add(y, residual)

    folded = []
    for ops in (conv_ops, linear_ops):
        monkeypatch.setattr(ops, "residual_training", lambda *a: folded.append(a[-1]) or residual_training(*a))
    x.requires_grad_(), residual.requires_grad_()
    cotangent = torch.randn(residual.shape, **dd)
    results = []
    for fused in (True, False):
        torch.manual_seed(3)
        out = run(fused)
        results.append((out, torch.autograd.grad(out, [x, residual, *params], cotangent)))
    assert len(folded) == 1 and sorted(set(folded[0].flatten().tolist())) == [0.0, 2.0]  # one dropped, one kept
    (out, grads), (expected, expected_grads) = results
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    with folding(False):  # turned off (benchmarks): the modules as written, bit for bit
        torch.manual_seed(3)
        assert torch.equal(run(True), expected) and len(folded) == 1
    seen = []  # a hook on the drop path: it runs as a module of its own, and the hook sees it
    (mlp.drop_path if case == "mlp" else branch[1]).register_forward_hook(lambda m, args, out: seen.append(m))
    run(True)
    assert len(folded) == 1 and len(seen) == 1
