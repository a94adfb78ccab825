"""Self-checks of the plain-PyTorch MPViT reference (tests/reference/mpvit.py).

Parameter counts are the official docstring numbers (ARCHITECTURES.md 3.1), the shape walk is 3.3 and the alias
keys are 3.6.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from tests.reference.mpvit import (
    MHCA_stage,
    MPViT,
    Patch_Embed_stage,
    mpvit_base,
    mpvit_small,
    mpvit_tiny,
    mpvit_xsmall,
)

Factory = Callable[[], MPViT]


@pytest.mark.parametrize(
    ("factory", "expected"),
    [
        (mpvit_tiny, 5_843_736),
        (mpvit_xsmall, 10_573_448),
        (mpvit_small, 22_892_400),
        (mpvit_base, 74_845_976),
    ],
    ids=["tiny", "xsmall", "small", "base"],
)
def test_param_count_matches_official_docstring(factory: Factory, expected: int) -> None:
    with torch.device("meta"):
        model = factory()
    assert sum(p.numel() for p in model.parameters()) == expected


def test_shape_walk_mpvit_small() -> None:
    torch.manual_seed(0)
    model = mpvit_small().eval()
    pe_shapes: list[list[tuple[int, ...]]] = []
    stage_shapes: list[tuple[int, ...]] = []

    def pe_hook(_m: nn.Module, _inp: tuple[torch.Tensor, ...], out: list[torch.Tensor]) -> None:
        pe_shapes.append([tuple(t.shape) for t in out])

    def stage_hook(_m: nn.Module, _inp: tuple[object, ...], out: torch.Tensor) -> None:
        stage_shapes.append(tuple(out.shape))

    stem_shapes: list[tuple[int, ...]] = []
    for stem_conv in model.stem:
        stem_conv.register_forward_hook(lambda _m, _i, out: stem_shapes.append(tuple(out.shape)))
    for m in model.modules():
        if isinstance(m, Patch_Embed_stage):
            m.register_forward_hook(pe_hook)
        elif isinstance(m, MHCA_stage):
            m.register_forward_hook(stage_hook)

    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model.cls_head(feats[-1])

    assert stem_shapes == [(1, 32, 112, 112), (1, 64, 56, 56)]
    assert pe_shapes == [
        [(1, 64, 56, 56)] * 2,
        [(1, 128, 28, 28)] * 3,
        [(1, 216, 14, 14)] * 3,
        [(1, 288, 7, 7)] * 3,
    ]
    expected_stages = [(1, 128, 56, 56), (1, 216, 28, 28), (1, 288, 14, 14), (1, 288, 7, 7)]
    assert stage_shapes == expected_stages
    assert [tuple(f.shape) for f in feats] == expected_stages
    assert tuple(logits.shape) == (1, 1000)

    # Concat widths (P+1)*C feeding each aggregate: 192, 512, 864, 1152.
    agg_in = [stage.aggregate.conv.in_channels for stage in model.mhca_stages]
    assert agg_in == [192, 512, 864, 1152]
    # Stage-1 CRPE splits [16, 24, 24] with kernels 3/5/7.
    crpe = model.mhca_stages[0].mhca_blks[0].crpe
    assert crpe.channel_splits == [16, 24, 24]
    assert [c.kernel_size for c in crpe.conv_list] == [(3, 3), (5, 5), (7, 7)]


def test_state_dict_alias_keys_share_storage() -> None:
    # CPU, not meta: data_ptr() needs real storage.
    model = mpvit_tiny()
    sd = model.state_dict()

    for i, stage in enumerate(model.mhca_stages):
        assert isinstance(stage, MHCA_stage)
        for p, enc in enumerate(stage.mhca_blks):
            base = f"mhca_stages.{i}.mhca_blks.{p}"
            for name in ("weight", "bias"):
                cpe_key = f"{base}.cpe.proj.{name}"
                assert cpe_key in sd
                for layer in range(len(enc.MHCA_layers)):
                    alias = f"{base}.MHCA_layers.{layer}.cpe.proj.{name}"
                    assert alias in sd, alias
                    assert sd[alias].data_ptr() == sd[cpe_key].data_ptr()
                for j in range(3):
                    crpe_key = f"{base}.crpe.conv_list.{j}.{name}"
                    assert crpe_key in sd
                    for layer in range(len(enc.MHCA_layers)):
                        for alias in (
                            f"{base}.MHCA_layers.{layer}.crpe.conv_list.{j}.{name}",
                            f"{base}.MHCA_layers.{layer}.factoratt_crpe.crpe.conv_list.{j}.{name}",
                        ):
                            assert alias in sd, alias
                            assert sd[alias].data_ptr() == sd[crpe_key].data_ptr()

    # Representative non-alias keys from ARCHITECTURES.md 3.6.
    for key in (
        "stem.0.conv.weight",
        "stem.1.bn.num_batches_tracked",
        "patch_embed_stages.1.patch_embeds.0.patch_conv.dwconv.weight",
        "patch_embed_stages.1.patch_embeds.2.patch_conv.pwconv.weight",
        "patch_embed_stages.1.patch_embeds.2.patch_conv.bn.running_var",
        "mhca_stages.1.mhca_blks.2.MHCA_layers.1.norm1.weight",
        "mhca_stages.1.mhca_blks.2.MHCA_layers.1.norm2.bias",
        "mhca_stages.1.mhca_blks.2.MHCA_layers.1.factoratt_crpe.qkv.bias",
        "mhca_stages.1.mhca_blks.2.MHCA_layers.1.factoratt_crpe.proj.weight",
        "mhca_stages.1.mhca_blks.2.MHCA_layers.1.mlp.fc2.bias",
        "mhca_stages.0.InvRes.conv1.conv.weight",
        "mhca_stages.0.InvRes.conv1.bn.weight",
        "mhca_stages.0.InvRes.dwconv.weight",
        "mhca_stages.0.InvRes.norm.running_mean",
        "mhca_stages.0.InvRes.conv2.conv.weight",
        "mhca_stages.3.aggregate.conv.weight",
        "mhca_stages.3.aggregate.bn.bias",
        "cls_head.cls.weight",
        "cls_head.cls.bias",
    ):
        assert key in sd, key
    # state_dict keeps every alias, parameters() de-duplicates.
    n_param_keys = sum(1 for k in sd if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert n_param_keys > len(list(model.parameters()))


def test_state_dict_alias_key_count_mpvit_tiny() -> None:
    with torch.device("meta"):
        model = mpvit_tiny()
    sd_keys = list(model.state_dict().keys())
    # Per layer: 2 cpe alias keys + 2 * 6 crpe alias keys = 14; tiny has sum(P_i * L_i) = 2*1 + 3*2 + 3*4 + 3*1 layers.
    n_layers = 2 * 1 + 3 * 2 + 3 * 4 + 3 * 1
    aliases = [k for k in sd_keys if ".MHCA_layers." in k and (".cpe." in k or ".crpe." in k)]
    assert len(aliases) == 14 * n_layers
    assert len(sd_keys) == len(set(sd_keys))


def test_mpvit_tiny_forward_finite() -> None:
    torch.manual_seed(0)
    model = mpvit_tiny().eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 224, 224))
    assert logits.shape == (2, 1000)
    assert torch.isfinite(logits).all()
