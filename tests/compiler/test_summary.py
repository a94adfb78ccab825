"""MACs are counted on the model's own forward with meta tensors: no replica, no weight touched, modes restored."""

from __future__ import annotations

import torch

import blockgraph as bg


def test_macs_count_the_model_itself_and_leave_it_as_it_was() -> None:
    torch.manual_seed(0)
    model = bg.create_model("swin_tiny_patch4_window7_224", overrides={"depths": [1, 1, 1, 1]}).train()
    model.get_submodule("head").eval()  # a mixed mode is restored module by module
    modes = {name: m.training for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model.eval()(x)  # fills the size-keyed caches (shift masks, attention biases) on the CPU
    model.train().get_submodule("head").eval()
    macs = model.macs()
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model.eval()(x), before)  # no meta tensor left where the forward looks
    assert macs["layers0.patch_embed"] == 56 * 56 * 96 * 3 * 4 * 4  # conv 4x4/4, 3 -> 96 channels
    assert macs["head"] == 768 * 1000
    assert macs["total"] == sum(macs[n] for n in model.nodes) > 0


def test_a_spec_without_outputs_is_summarized_by_its_last_block() -> None:
    spec = "name: noout\ninput: {channels: 3, size: [32, 32]}\nblocks:\n  - {op: conv_patch_embed, dim: 8, patch: 4}\n"
    model = bg.build_model(spec)
    assert model.outputs == ["output"]
    assert model.summary(macs=False).rstrip().endswith("outputs: output")
    assert summary_outputs(model) == {"output": [1, 64, 8]}


def summary_outputs(model: torch.nn.Module) -> dict[str, list[int]]:
    from blockgraph.compiler.summary import describe

    return describe(model, macs=False)["outputs"]
