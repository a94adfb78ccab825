"""The timm-style API: create_model(pretrained, num_classes, features_only, out_indices, checkpoint_path),
list_models, feature_info. No network: weights come from files the tests write."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import blockgraph as bg
from blockgraph.compiler.checkpoint import save
from tests.conftest import ROOT

TINY = "coat_lite_tiny"  # dims 64, 128, 256, 320; strides 4, 8, 16, 32
SMALL_INPUT = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return bg.create_model(TINY).eval()


@pytest.fixture(scope="module")
def checkpoint(tiny: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save(tiny, path)
    return path


def _equal_state(a: torch.nn.Module, b: torch.nn.Module, skip: set[str] = frozenset()) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sb if k not in skip)


def test_list_models_glob() -> None:
    assert bg.list_models("coat*") == [
        "coat",
        "coat_lite",
        "coat_lite_medium",
        "coat_lite_mini",
        "coat_lite_small",
        "coat_lite_small_deformable",
        "coat_lite_tiny",
        "coat_mini",
        "coat_small",
        "coat_tiny",
    ]
    assert bg.list_models("*patch16_224") == [
        "deit_base_distilled_patch16_224",
        "vit_base_patch16_224",
        "vit_small_patch16_224",
        "vit_tiny_patch16_224",
    ]
    assert bg.list_models("nothing*") == []


def test_build_model_takes_an_analysis() -> None:
    analysis = bg.analyze(ROOT / "specs" / f"{TINY}.yaml", num_classes=7)
    model = bg.build_model(analysis, device="meta")
    assert model.inference is analysis.inference and model.get_submodule("head.fc").out_features == 7
    with pytest.raises(bg.SpecError, match="apply to a spec, not to its analysis"):
        bg.build_model(analysis, num_classes=3)


def test_num_classes_changes_the_head() -> None:
    model = bg.create_model(TINY, num_classes=7).eval()
    assert model.get_submodule("head.fc").weight.shape == (7, 320)
    with torch.no_grad():
        assert model(SMALL_INPUT).shape == (1, 7)


def test_feature_info_names_channels_strides_and_modules() -> None:
    model = bg.create_model(TINY, device="meta")
    assert list(model.feature_info) == [
        {"name": f"stage{i + 1}", "module": f"stage{i + 1}.to_map", "num_chs": c, "reduction": r, "index": i}
        for i, (c, r) in enumerate([(64, 4), (128, 8), (256, 16), (320, 32)])
    ]
    assert model.feature_info.out_indices == (0, 1, 2, 3)
    assert model.feature_info.channels(2) == 256 and model.feature_info.reduction([0, 3]) == [4, 32]
    features = bg.create_model(TINY, device="meta", features_only=True)
    assert list(features.feature_info) == list(model.feature_info)
    for info in features.feature_info:  # every module named is a real submodule
        features.get_submodule(info["module"])


@pytest.mark.parametrize(
    ("out_indices", "names"),
    [
        ((1, -1), ["stage2", "stage4"]),
        ([3, 0], ["stage1", "stage4"]),  # returned in declaration order, as timm's feature extractor
        (2, ["stage3", "stage4"]),  # an int n: the last n (timm)
        ((-4,), ["stage1"]),
    ],
)
def test_out_indices_select_feature_maps(out_indices, names: list[str]) -> None:
    model = bg.create_model(TINY, features_only=True, out_indices=out_indices).eval()
    assert model.outputs == names
    info = model.feature_info
    assert info.module_name() == [f"{n}.to_map" for n in names]
    with torch.no_grad():
        feats = model(SMALL_INPUT)
    assert [f.shape[1] for f in feats] == info.channels()
    assert [64 // f.shape[-1] for f in feats] == info.reduction()
    assert all(not k.startswith("head.") for k in model.state_dict())  # the classifier is not built


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"features_only": True, "out_indices": (0, 4)}, r"out_indices: 4 is out of range for 4 feature maps"),
        ({"features_only": True, "out_indices": (-5,)}, r"out_indices: -5 is out of range"),
        ({"features_only": True, "out_indices": (1, -3)}, r"feature 1 \(stage2\) is selected twice"),
        ({"features_only": True, "out_indices": 5}, r"the last 5 of 4 feature maps"),
        ({"features_only": True, "out_indices": ()}, r"out_indices is empty"),
        ({"out_indices": (0,)}, r"out_indices selects feature maps: it needs features_only=True"),
    ],
)
def test_bad_out_indices(kwargs: dict, match: str) -> None:
    with pytest.raises(bg.SpecError, match=match) as info:
        bg.create_model(TINY, device="meta", **kwargs)
    assert "selected twice" in info.value.message or "stage1" in info.value.hint


def test_pretrained_without_a_file_says_what_to_pass() -> None:
    with pytest.raises(bg.WeightsError, match="bundles no pretrained weights and never downloads") as info:
        bg.create_model("coat_lite_small", pretrained=True)
    assert "checkpoint_path=" in info.value.message
    assert "--out coat_lite_small.pt" in info.value.hint
    assert "timm.create_model('coat_lite_small', pretrained=True).state_dict()" in info.value.hint


def test_pretrained_from_a_blockgraph_checkpoint(tiny, checkpoint: Path) -> None:
    model = bg.create_model(TINY, pretrained=True, checkpoint_path=checkpoint).eval()
    assert _equal_state(tiny, model)
    with torch.no_grad():
        assert torch.equal(model(SMALL_INPUT), tiny(SMALL_INPUT))


def test_plain_state_dict_in_our_layout_with_ddp_prefix(tiny, tmp_path: Path) -> None:
    path = tmp_path / "sd.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tiny.state_dict().items()}, "epoch": 3}, path)
    assert _equal_state(tiny, bg.create_model(TINY, checkpoint_path=path))


def test_num_classes_differs_from_the_checkpoint_head_is_skipped_like_timm(tiny, checkpoint: Path) -> None:
    with pytest.warns(UserWarning, match=r"2 tensor\(s\) of the classifier were not loaded .* head\.fc\.weight"):
        model = bg.create_model(TINY, pretrained=True, checkpoint_path=checkpoint, num_classes=10)
    assert model.get_submodule("head.fc").weight.shape == (10, 320)
    assert _equal_state(tiny, model, skip={"head.fc.weight", "head.fc.bias"})  # the head's norm is loaded
    assert torch.equal(model.state_dict()["head.norm.weight"], tiny.state_dict()["head.norm.weight"])


def test_with_num_classes_only_the_classifier_width_may_differ(tiny, tmp_path: Path) -> None:
    """The classifier's tensors are skipped where they differ in num_classes only; its norm must still fit."""
    state = dict(tiny.state_dict(), **{"head.norm.weight": torch.ones(100)})
    torch.save(state, tmp_path / "sd.pth")
    with pytest.raises(
        bg.WeightsError, match=r"'head\.norm\.weight' has shape \[100\], our 'head\.norm\.weight' has \[320\]"
    ):
        bg.create_model(TINY, num_classes=10, checkpoint_path=tmp_path / "sd.pth", device="meta")


def test_features_only_drops_the_checkpoint_head(tiny, checkpoint: Path) -> None:
    model = bg.create_model(TINY, features_only=True, out_indices=(0, 2), checkpoint_path=checkpoint).eval()
    assert _equal_state(tiny, model)
    with torch.no_grad():
        feats = model(SMALL_INPUT)
    assert [tuple(f.shape) for f in feats] == [(1, 64, 16, 16), (1, 256, 4, 4)]


def test_a_checkpoint_of_another_model_is_refused(checkpoint: Path) -> None:
    with pytest.raises(bg.WeightsError, match=r"checkpoint of 'coat_lite_tiny'.* does not fit 'coat_lite_mini'"):
        bg.create_model("coat_lite_mini", checkpoint_path=checkpoint, device="meta")


def test_a_head_mismatch_without_num_classes_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "ten.pt"
    save(bg.create_model(TINY, num_classes=10), path)
    assert bg.create_model(TINY, num_classes=10, checkpoint_path=path).get_submodule("head.fc").out_features == 10
    with pytest.raises(bg.WeightsError, match=r"'head\.fc\.weight' has shape \[10, 320\]") as info:
        bg.create_model(TINY, checkpoint_path=path)
    assert "pass num_classes=" in info.value.hint


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ({"weights": [1, 2]}, "holds no state_dict"),
        ({"bogus.weight": torch.zeros(1)}, "spec 'coat_lite_tiny' names no|1 unexpected: bogus.weight"),
    ],
)
def test_files_that_are_not_weights_of_this_model(tmp_path: Path, payload, match: str) -> None:
    path = tmp_path / "x.pth"
    torch.save(payload, path)
    with pytest.raises(bg.WeightsError, match=match):
        bg.create_model(TINY, checkpoint_path=path, device="meta")
    with pytest.raises(bg.WeightsError, match="no such checkpoint"):
        bg.create_model(TINY, checkpoint_path=tmp_path / "missing.pth", device="meta")


@pytest.mark.timm
def test_pretrained_from_the_timm_twin_state_dict(tmp_path: Path) -> None:
    from tests.support.timm_oracle import create_timm

    torch.manual_seed(1)
    twin = create_timm(TINY).eval()
    path = tmp_path / "timm.pth"
    torch.save(twin.state_dict(), path)
    model = bg.create_model(TINY, pretrained=True, checkpoint_path=path).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))  # timm's CoaT takes 224 only
    with torch.no_grad():
        torch.testing.assert_close(model(x), twin(x), rtol=0, atol=1e-5)
    with pytest.warns(UserWarning, match="head.fc.weight, head.fc.bias"):
        model = bg.create_model(TINY, pretrained=True, checkpoint_path=path, num_classes=3)
    assert torch.equal(model.state_dict()["stage1.cpe.proj.weight"], twin.state_dict()["cpe1.proj.weight"])


def test_a_selected_feature_model_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    model = bg.create_model(TINY, features_only=True, out_indices=(0, 3), overrides={"depths": [1, 1, 1, 1]})
    save(model, tmp_path / "feats.pt")
    loaded = bg.load(tmp_path / "feats.pt").eval()
    assert loaded.outputs == ["stage1", "stage4"] and loaded.feature_info.out_indices == (0, 3)
    assert _equal_state(model, loaded)
    with torch.no_grad():
        assert [tuple(f.shape) for f in loaded(SMALL_INPUT)] == [(1, 64, 16, 16), (1, 320, 2, 2)]
    # MACs are counted on the same selection (the head is not built, so not counted).
    macs = loaded.macs((64, 64))
    assert macs["total"] == sum(macs[n] for n in loaded.nodes) and "head" not in macs


def test_create_model_takes_timms_keywords() -> None:
    """timm's train.py passes these (None for the ones it does not set, checkpoint_path=''): None is ignored, the
    others become overrides of the spec; an unknown keyword names the accepted ones."""
    model = bg.create_model(
        "coat_lite_tiny", pretrained=False, in_chans=1, num_classes=None, drop_rate=0.1, drop_path_rate=0.1,
        drop_block_rate=None, global_pool=None, bn_momentum=None, bn_eps=None, scriptable=False, checkpoint_path="",
        device="meta",
    )  # fmt: skip
    assert model.spec.input.channels == 1 and model.get_submodule("head").drop.p == 0.1
    assert model.spec.variables["drop_path"] == 0.1
    assert model(torch.empty(2, 1, 64, 64, device="meta")).shape == (2, 1000)
    assert bg.create_model("vit_tiny_patch16_224", global_pool="avg", device="meta").get_submodule("head").pool == "avg"
    assert bg.create_model("convnext_atto", drop_rate=0.0, device="meta").num_classes == 1000  # train.py's default
    assert bg.create_model("mobilevit_xxs", drop_path_rate=0.0, device="meta").num_classes == 1000
    with pytest.raises(TypeError, match=r"unexpected keyword\(s\) foo; it takes: num_classes, .*in_chans"):
        bg.create_model("convnext_atto", foo=1)
    assert bg.create_model("pvt_v2_b0", drop_rate=0.3, device="meta").get_submodule("head_drop").p == 0.3
    assert bg.create_model("convnext_atto", drop_rate=0.2, device="meta").get_submodule("head.drop").p == 0.2
    for keyword, value, message in [("drop_rate", 0.2, "its head has no `drop`"),
                                    ("bn_eps", 1e-3, "no block of a blockgraph spec reads it"),
                                    ("drop_path_rate", 0.1, "no `drop_path` variable")]:  # fmt: skip
        name = "deformable_encoder" if keyword in ("drop_path_rate", "drop_rate") else "convnext_atto"
        with pytest.raises(bg.SpecError, match=message):
            bg.create_model(name, **{keyword: value})
