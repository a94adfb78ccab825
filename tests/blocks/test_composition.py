"""The primitives compose beyond the reference specs; the block library is torch-free, its modules are ordinary
torch modules."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

import blockgraph as bg
from tests.conftest import ROOT

HYBRID = """
name: hybrid
input: {channels: 3, size: [64, 96]}
variables: {dim: 48}
shared:
  crpe: {op: conv_rel_pos_enc, dim: 48, heads: 4, windows: {3: 1, 5: 2, 7: 1}}
stages:
  - name: stem
    blocks:
      - {name: conv, op: conv_patch_embed, dim: "${dim}", patch: 4, norm: false, flatten: false}
      - {name: tokens, op: map_to_tokens}
      - {name: attn, op: factor_attn_crpe, dim: "${dim}", heads: 4, crpe: crpe}
      - {name: mlp, op: mlp, dim: "${dim}", mlp_ratio: 2, dim_out: 64, act: silu}
      - {name: map, op: tokens_to_map}
blocks:
  - {name: head, op: cls_head, from: stem.mlp, dim: 64, num_classes: 5, pool: avg}
outputs: {logits: head}
features: {stem: {from: stem.map, stride: 4}}
"""


def test_a_hybrid_of_standalone_primitives_builds_infers_and_trains() -> None:
    report = bg.validate(HYBRID, input_size=(3, 64, 96))
    assert report.outputs == {"logits": "1x5", "stem": "1x64x16x24"}
    torch.manual_seed(0)
    model = bg.build_model(HYBRID, outputs=["logits", "stem"])
    out = model(torch.randn(2, 3, 64, 96))
    assert out["logits"].shape == (2, 5) and out["stem"].shape == (2, 64, 16, 24)
    (out["logits"].sum() + out["stem"].mean()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    # no cls token: the CRPE takes every token as an image token
    assert "tokens[(H//4)*(W//4), 48]" in str(model.node_types()["stem.attn"])


def test_compiled_models_are_real_modules() -> None:
    from blockgraph.layers.coat import SerialBlock

    model = bg.create_model("coat_lite_tiny")
    assert isinstance(model, torch.nn.Module)
    assert type(model.get_submodule("stage1.blocks.0")) is SerialBlock
    twin = copy.deepcopy(model).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(twin(x), model.eval()(x))
    meta = bg.create_model("coat_lite_tiny", device="meta")
    assert all(p.is_meta for p in meta.parameters())


def test_importing_the_block_library_does_not_import_torch() -> None:
    code = "import sys, blockgraph, blockgraph.blocks; assert 'torch' not in sys.modules; print(len(sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr


def test_training_a_batch_of_one_on_a_1x1_batchnorm_map_is_a_shape_error() -> None:
    """MPViT accepts 32x32 (stage 4 is 1x1). Training with one image there would crash inside BatchNorm ("Expected
    more than 1 value per channel"); the compiled forward names the node instead. Batches of two and eval run."""
    torch.manual_seed(0)
    model = bg.create_model("mpvit_tiny")
    with pytest.raises(bg.ShapeError, match=r"node 'stage4.patch_embed' \(multi_scale_patch_embed\) a 1x1 map") as e:
        model(torch.randn(1, 3, 32, 32))
    assert (
        e.value.line == (ROOT / "specs" / "mpvit.yaml").read_text().split("\n").index("      - name: patch_embed") + 1
    )
    assert "batch of 2 or more" in e.value.hint
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 1000)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)  # stage 4 is 2x2
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 1000)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):  # what torch would have said
        model.train().get_submodule("stage4.patch_embed")(torch.randn(1, 216, 2, 2))


def test_vit_block_written_in_yaml_equals_the_built_in() -> None:
    """specs/blocks/vit.yaml's transformer_block, made of primitives, has the built-in vit_block's keys and values
    (the built-in keeps its fused paths: residual adds in the kernels, the last block's cls token alone)."""
    library = ROOT / "specs" / "blocks" / "vit.yaml"
    text = (ROOT / "specs" / "vit.yaml").read_text().replace("op: vit_block", "op: transformer_block")
    composed = bg.build_model(f"imports: [{library}]\n{text}", variant="small", overrides={"depth": 3}).eval()
    built_in = bg.build_model(ROOT / "specs" / "vit.yaml", variant="small", overrides={"depth": 3}).eval()
    assert list(composed.state_dict()) == list(built_in.state_dict())
    assert composed.trimmed_tokens == {} and built_in.trimmed_tokens == {"blocks.2": 1}
    composed.load_state_dict(built_in.state_dict())
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # (float64: the same math, not two float32 kernels' roundings, which the ops' tests check)
        torch.testing.assert_close(composed.double()(x.double()), built_in.double()(x.double()), rtol=0, atol=1e-12)
