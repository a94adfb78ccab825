"""timm's own model tests, run on one spec of each family beside its timm twin.

The logic is that of ``tests/test_models.py`` of huggingface/pytorch-image-models as stored at commit
010b486590916f3ee16708fc74dbcfe6b9b902da (read through the search tool), rewritten case by case with only model
creation swapped: each case runs on the twin first, and on our spec when the twin passes it (a case the twin fails
is skipped, saying so). Not adapted, with the reason:

- ``test_model_load_pretrained`` / ``test_model_features_pretrained``: they download weights (no network here);
  loading a twin's file, with ``in_chans`` adapted and ``features_only``, is tested in
  tests/compiler/test_timm_api.py and tests/test_api.py.

``test_model_forward_torchscript`` passes: ``torch.jit.script`` compiles the model's script view
(blockgraph/compiler/script.py). ``test_model_forward_fx`` passes: while ``torch.fx`` traces symbolically, the
generated input check is skipped and the blocks take the decisions of the size the model is built for (a traced
graph is specialized to it, as timm's are).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import blockgraph as bg
from tests.support.specs import ONE_TWIN_PER_FAMILY
from tests.support.timm_oracle import create_timm, import_timm

pytestmark = pytest.mark.timm

FAMILIES = ONE_TWIN_PER_FAMILY
NON_STD_FILTERS = ["vit_*", "swin_*", "coat_*", "deit*"]  # upstream's list, restricted to our families
TARGET_FWD_SIZE = MAX_FWD_SIZE = 384
TARGET_BWD_SIZE = 128
MAX_BWD_SIZE = 320
MAX_FWD_OUT_SIZE = 448
TARGET_FFEAT_SIZE = 96
MAX_FFEAT_SIZE = 256
TARGET_FWD_FX_SIZE = 128
MAX_FWD_FX_SIZE = 224

Factory = Callable[..., nn.Module]


@pytest.fixture(scope="module", autouse=True)
def _timm():
    import_timm()


def _get_input_size(model: nn.Module, target: int | None = None) -> tuple[int, ...]:
    cfg = model.default_cfg
    input_size = cfg["input_size"]
    if cfg.get("fixed_input_size", None):
        return input_size
    if target and max(input_size) > target:
        input_size = tuple(min(x, target) for x in input_size)
    return input_size


def _std(name: str) -> bool:
    return not any(fnmatch.fnmatch(name, f) for f in NON_STD_FILTERS)


def _check_cfg_names(cfg: dict[str, Any], state_dict: dict[str, Any]) -> None:
    """The classifier and first conv the default_cfg names are parameters of the model (both upstream cases)."""
    if cfg.get("num_classes", None):
        classifier = cfg["classifier"]
        for c in classifier if isinstance(classifier, tuple | list) else (classifier,):
            assert c + ".weight" in state_dict, f"{c} not in model params"
    first_conv = cfg["first_conv"]
    for fc in (first_conv,) if isinstance(first_conv, str) else first_conv:
        assert fc + ".weight" in state_dict, f"{fc} not in model params"


def case_forward(create: Factory, name: str) -> None:
    model = create().eval()
    input_size = _get_input_size(model, TARGET_FWD_SIZE)
    if max(input_size) > MAX_FWD_SIZE:
        pytest.skip("Fixed input size model > limit.")
    outputs = model(torch.randn((1, *input_size)))
    assert outputs.shape[0] == 1
    assert not torch.isnan(outputs).any(), "Output included NaNs"


def case_backward(create: Factory, name: str) -> None:
    model = create(num_classes=42)
    input_size = _get_input_size(model, TARGET_BWD_SIZE)
    if max(input_size) > MAX_BWD_SIZE:
        pytest.skip("Fixed input size model > limit.")
    num_params = sum(x.numel() for x in model.parameters())
    model.train()
    outputs = model(torch.randn((2, *input_size)))
    if isinstance(outputs, tuple):
        outputs = torch.cat(outputs)
    outputs.mean().backward()
    for n, x in model.named_parameters():
        assert x.grad is not None, f"No gradient for {n}"
    num_grad = sum(x.grad.numel() for x in model.parameters() if x.grad is not None)
    assert outputs.shape[-1] == 42
    assert num_params == num_grad, "Some parameters are missing gradients"
    assert not torch.isnan(outputs).any(), "Output included NaNs"


def case_default_cfgs(create: Factory, name: str) -> None:
    if not _std(name):
        pytest.skip("upstream runs this case on standard (non-transformer) models only")
    model = create().eval()
    state_dict = model.state_dict()
    cfg = model.default_cfg
    pool_size = cfg["pool_size"]
    input_size = cfg["input_size"]
    if all(x <= MAX_FWD_OUT_SIZE for x in input_size):
        input_tensor = torch.randn((1, *input_size))
        outputs = model.forward_features(input_tensor)
        assert outputs.shape[-1] == pool_size[-1] and outputs.shape[-2] == pool_size[-2]
        model.reset_classifier(0)
        outputs = model.forward(input_tensor)
        assert len(outputs.shape) == 2
        assert outputs.shape[-1] == model.num_features
        model.reset_classifier(0, "")
        outputs = model.forward(input_tensor)
        assert len(outputs.shape) == 4
        assert outputs.shape[-1] == pool_size[-1] and outputs.shape[-2] == pool_size[-2]
        model = create(num_classes=0, global_pool="").eval()
        outputs = model.forward(input_tensor)
        assert len(outputs.shape) == 4
        assert outputs.shape[-1] == pool_size[-1] and outputs.shape[-2] == pool_size[-2]
    _check_cfg_names(cfg, state_dict)


def case_default_cfgs_non_std(create: Factory, name: str) -> None:
    if _std(name):
        pytest.skip("upstream runs this case on transformer-like (non-standard) models only")
    model = create().eval()
    state_dict = model.state_dict()
    cfg = model.default_cfg
    input_size = _get_input_size(model)
    if max(input_size) > 320:
        pytest.skip("Fixed input size model > limit.")
    input_tensor = torch.randn((1, *input_size))
    outputs = model.forward_features(input_tensor)
    if isinstance(outputs, tuple | list):
        outputs = outputs[0]
    assert outputs.shape[1] == model.num_features
    model.reset_classifier(0)
    outputs = model.forward(input_tensor)
    if isinstance(outputs, tuple | list):
        outputs = outputs[0]
    assert len(outputs.shape) == 2
    assert outputs.shape[1] == model.num_features
    model = create(num_classes=0).eval()
    outputs = model.forward(input_tensor)
    if isinstance(outputs, tuple | list):
        outputs = outputs[0]
    assert len(outputs.shape) == 2
    assert outputs.shape[1] == model.num_features
    _check_cfg_names(cfg, state_dict)


def case_forward_features(create: Factory, name: str) -> None:
    if not _std(name):
        pytest.skip("upstream runs this case on standard (non-transformer) models only")
    model = create(features_only=True).eval()
    expected_channels = model.feature_info.channels()
    assert len(expected_channels) >= 4
    input_size = _get_input_size(model, TARGET_FFEAT_SIZE)
    if max(input_size) > MAX_FFEAT_SIZE:
        pytest.skip("Fixed input size model > limit.")
    outputs = model(torch.randn((1, *input_size)))
    assert len(expected_channels) == len(outputs)
    for e, o in zip(expected_channels, outputs, strict=True):
        assert e == o.shape[1]
        assert o.shape[0] == 1
        assert not torch.isnan(o).any()


def case_forward_torchscript(create: Factory, name: str) -> None:
    model = create().eval()
    input_size = _get_input_size(model, 128)
    model = torch.jit.script(model)
    outputs = model(torch.randn((1, *input_size)))
    assert outputs.shape[0] == 1


def case_forward_fx(create: Factory, name: str) -> None:
    """Upstream's: trace with torchvision's feature extractor (timm's leaf modules and wrapped functions), take the
    last node in eval mode, compare with the model."""
    from timm.layers._fx import _autowrap_functions, _leaf_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    model = create().eval()
    input_size = _get_input_size(model, TARGET_FWD_FX_SIZE)
    if max(input_size) > MAX_FWD_FX_SIZE:
        pytest.skip("Fixed input size model > limit.")
    tracer_kwargs = {"leaf_modules": list(_leaf_modules), "autowrap_functions": list(_autowrap_functions)}
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    fx_model = create_feature_extractor(
        model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs
    )
    inputs = torch.randn((1, *input_size))
    outputs = model(inputs)  # as upstream, with gradients recorded (so no eager inference kernel either side)
    if isinstance(outputs, tuple):
        outputs = torch.cat(outputs)
    fx_outputs = tuple(fx_model(inputs).values())
    if isinstance(fx_outputs, tuple):
        fx_outputs = torch.cat(fx_outputs)
    assert torch.all(fx_outputs == outputs)
    assert outputs.shape[0] == 1
    assert not torch.isnan(outputs).any(), "Output included NaNs"


CASES = {
    "forward": case_forward,
    "backward": case_backward,
    "default_cfgs": case_default_cfgs,
    "default_cfgs_non_std": case_default_cfgs_non_std,
    "forward_features": case_forward_features,
    "forward_torchscript": case_forward_torchscript,
    "forward_fx": case_forward_fx,
}


def _factories(name: str) -> tuple[Factory, Factory]:
    twin_name = bg.analyze(name).spec.twin.timm

    def twin(**kwargs: Any) -> nn.Module:
        torch.manual_seed(0)
        return create_timm(twin_name, **kwargs)

    def ours(**kwargs: Any) -> nn.Module:
        torch.manual_seed(0)
        return bg.create_model(name, **kwargs)

    return twin, ours


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", FAMILIES)
def test_timm_model_case(case: str, name: str) -> None:
    twin, ours = _factories(name)
    try:
        CASES[case](twin, name)
    except pytest.skip.Exception:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of the twin: the case does not apply to this family
        pytest.skip(f"timm's own {name} fails this case: {type(e).__name__}: {str(e)[:120]}")
    CASES[case](ours, name)
