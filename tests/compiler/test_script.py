"""``torch.jit.script(model)``: TorchScript compiles the model's script view (blockgraph/compiler/script.py). The
scripted model computes what the eager one does, at the spec's size and at another accepted size, in eval and in
training (gradients reach the model's own parameters), saves and loads with ``torch.jit.save``/``load``, and
rejects a size the model does not accept; the model itself is left as it was."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch.utils._pytree import tree_leaves

import blockgraph as bg
from blockgraph.spec.references import SPEC_DIR
from tests.support.specs import shrunk

# (spec, another accepted size or None for a fixed-size model, overrides beyond the shrinking)
CASES = [
    ("coat_lite_tiny", (96, 160), {}),
    ("coat_tiny", (160, 96), {}),
    ("vit_tiny_patch16_224", None, {}),
    ("deit_base_distilled_patch16_224", None, {}),
    ("vit_small_early_conv", None, {}),
    ("swin_tiny_patch4_window7_224", (448, 448), {}),
    ("swin_tiny_patch4_window7_224", (252, 332), {"pad": True}),
    ("mobilevit_xxs", (160, 200), {}),
    ("convnext_atto", (96, 128), {}),
    ("poolformer_s12", (96, 128), {}),
    ("pvt_v2_b0", (96, 128), {}),
    ("inception_next_tiny", (96, 128), {}),
    ("mpvit_tiny", (96, 128), {}),
]


def _script(model: torch.nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.x: "torch.jit.script is deprecated"
        return torch.jit.script(model)


def _max_diff(a: object, b: object) -> float:
    return max((x - y).abs().max().item() for x, y in zip(tree_leaves(a), tree_leaves(b), strict=True))


def _model(name: str, overrides: dict) -> bg.BlockgraphModel:
    torch.manual_seed(0)
    return bg.build_model(name, overrides={**shrunk(SPEC_DIR / f"{name}.yaml"), **overrides})


@pytest.mark.parametrize(("name", "other", "overrides"), CASES, ids=[f"{c[0]}{'-pad' if c[2] else ''}" for c in CASES])
def test_scripted_model_equals_the_model(name: str, other: tuple[int, int] | None, overrides: dict) -> None:
    model = _model(name, overrides).eval()
    before = [(n, type(m), dict(m._modules)) for n, m in model.named_modules()]
    scripted = _script(model)
    assert [(n, type(m), dict(m._modules)) for n, m in model.named_modules()] == before  # the model is untouched
    sizes = [tuple(model.spec.input.size)] + ([other] if other else [])
    with torch.no_grad():
        for size in sizes:
            x = torch.randn(2, 3, *size)
            assert _max_diff(scripted(x), model(x)) < 1e-5, size


def test_scripted_training_step_reaches_the_models_parameters() -> None:
    """A scripted forward in training (dropout and drop path off for a comparison) back-propagates into the very
    parameters of the model: gradients equal the eager model's (fp64, 1e-10)."""
    model = _model("coat_lite_tiny", {}).double().train()
    scripted = _script(model)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    model(x).square().sum().backward()
    eager = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    assert sum(g is not None for g in eager.values()) > 0.9 * len(eager)
    model.zero_grad(set_to_none=True)
    scripted(x).square().sum().backward()
    for n, p in model.named_parameters():
        if eager[n] is None:
            assert p.grad is None, n
        else:
            assert p.grad is not None and torch.allclose(p.grad, eager[n], atol=1e-10, rtol=0), n


def test_scripted_model_saves_loads_and_follows_the_weights(tmp_path: Path) -> None:
    model = _model("pvt_v2_b0", {}).eval()
    scripted = _script(model)
    x = torch.randn(1, 3, 96, 96)
    path = tmp_path / "model.pt"
    torch.jit.save(scripted, str(path))
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        assert torch.equal(loaded(x), scripted(x))
        next(model.parameters()).add_(1.0)  # shared, not copied: the scripted model sees the change
        assert _max_diff(scripted(x), model(x)) < 1e-5


def test_scripted_model_rejects_a_size_it_does_not_accept() -> None:
    scripted = _script(_model("swin_tiny_patch4_window7_224", {}).eval())
    with pytest.raises(
        torch.jit.Error, match=r"takes images \[B, 3, H, W\] with H in \{224k, .* got shape \[1, 3, 100, 100\]"
    ):
        scripted(torch.randn(1, 3, 100, 100))


def test_a_block_without_a_torchscript_form_is_a_clear_error() -> None:
    model = bg.build_model("deformable_encoder", overrides=shrunk(SPEC_DIR / "deformable_encoder.yaml"))
    with pytest.raises(bg.BlockgraphError, match="node 'encoder' \\(op deformable_encoder\\) has no TorchScript form"):
        _script(model)
