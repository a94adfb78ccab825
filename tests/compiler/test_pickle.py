"""Built models round-trip through pickle, torch.save / torch.load and copy.deepcopy: same class name, code, outputs,
feature info, trimmed tokens and state; equal outputs; independent of the original; they train and pickle again."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import blockgraph as bg

CASES: dict[str, tuple[str, dict]] = {
    name: (name, {})
    for name in [
        "coat_lite_tiny",
        "coat_tiny",
        "vit_tiny_patch16_224",  # carries trimmed tokens: its last block computes the cls token only
        "deit_base_distilled_patch16_224",
        "mpvit_tiny",
        "swin_tiny_patch4_window7_224",
        "mobilevit_xxs",
        "deformable_encoder",
        "coat_lite_small_deformable",
    ]
}
CASES["coat_lite_tiny-features"] = ("coat_lite_tiny", {"features_only": True, "out_indices": (0, 2)})
CASES["mpvit_tiny-outputs"] = ("mpvit_tiny", {"outputs": ["stage2", "logits"]})


def _pickle(model: torch.nn.Module, tmp_path: Path) -> torch.nn.Module:
    return pickle.loads(pickle.dumps(model))


def _torch_save(model: torch.nn.Module, tmp_path: Path) -> torch.nn.Module:
    torch.save(model, tmp_path / "model.pt")
    return torch.load(tmp_path / "model.pt", weights_only=False)


def _deepcopy(model: torch.nn.Module, tmp_path: Path) -> torch.nn.Module:
    return copy.deepcopy(model)


METHODS: dict[str, Callable[[torch.nn.Module, Path], torch.nn.Module]] = {
    "pickle": _pickle,
    "torch.save": _torch_save,
    "deepcopy": _deepcopy,
}


def _flat(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    return [t for v in (value.values() if isinstance(value, dict) else value) for t in _flat(v)]


def _equal(a, b) -> bool:
    return type(a) is type(b) and len(_flat(a)) == len(_flat(b)) and all(map(torch.equal, _flat(a), _flat(b)))


def _gradients(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The gradients of one training step (seeded: drop path draws alike), then cleared."""
    torch.manual_seed(2)
    sum(v.float().pow(2).mean() for v in _flat(model.train()(x))).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def built(request) -> tuple[torch.nn.Module, torch.Tensor, dict[str, torch.Tensor]]:
    """A small model of the case (every depth variable at 1), after a training step, a forward and a MAC count
    (caches filled), an input it takes, and the gradients of that step."""
    name, kwargs = CASES[request.param]
    analysis = bg.analyze(bg.api.spec_path(name))
    depths = {k: [1] * len(v) if isinstance(v, list) else 1 for k, v in analysis.spec.variables.items() if "depth" in k}
    torch.manual_seed(0)
    model = bg.create_model(name, overrides=depths, **kwargs)
    h, w = analysis.inference.acceptance.examples(1)[0]
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(1))
    grads = _gradients(model, x)
    with torch.no_grad():
        model.eval()(x)
    model.macs((h, w))
    return model, x, grads


@pytest.mark.parametrize("method", list(METHODS))
def test_round_trip(built, method: str, tmp_path: Path) -> None:
    model, x, grads = built
    clone = METHODS[method](model, tmp_path)
    assert clone is not model and type(clone).__name__ == type(model).__name__
    for attr in ("code", "outputs", "returns", "nodes", "trimmed_tokens", "spec_data"):
        assert getattr(clone, attr) == getattr(model, attr), attr
    # The spec read back from spec_data, as from a checkpoint: the same but for what the spec keeps for the record
    # only (the variant chosen, variables as read back from JSON).
    record = {"variant", "variables"}
    assert clone.spec.model_dump(exclude=record) == model.spec.model_dump(exclude=record)
    assert list(clone.feature_info) == list(model.feature_info)
    assert clone.feature_info.out_indices == model.feature_info.out_indices
    state, cloned = model.state_dict(), clone.state_dict()
    assert list(cloned) == list(state) and all(torch.equal(cloned[k], state[k]) for k in state)
    with torch.no_grad():
        assert _equal(clone.eval()(x), model(x))

    # It pickles again, into the same model.
    again = pickle.loads(pickle.dumps(clone))
    with torch.no_grad():
        assert _equal(again.eval()(x), clone(x))

    # It trains as the original does: the same gradients, for the same parameters.
    cloned_grads = _gradients(clone, x)
    assert list(cloned_grads) == list(grads) and all(torch.equal(cloned_grads[k], grads[k]) for k in grads)

    # Independent: a change to the copy leaves the original as it was.
    name, parameter = next(iter(clone.named_parameters()))
    with torch.no_grad():
        parameter.add_(1.0)
    assert not torch.equal(model.get_parameter(name), parameter)


def test_the_copies_share_what_the_spec_determines(built) -> None:
    """deepcopy shares the analysis (no spec is analysed again); unpickling analyses the spec anew, into a class of
    its own whose forward is the same code."""
    model, _, _ = built
    copied, unpickled = copy.deepcopy(model), pickle.loads(pickle.dumps(model))
    assert copied.inference is model.inference and copied.spec is model.spec and type(copied) is type(model)
    assert unpickled.inference is not model.inference and type(unpickled) is not type(model)


def test_the_cases_cover_trimmed_tokens_features_and_several_outputs() -> None:
    kinds = {}
    for key, (name, kwargs) in CASES.items():
        model = bg.create_model(name, device="meta", **kwargs)
        kinds[key] = (model.returns, bool(model.trimmed_tokens))
    assert kinds["vit_tiny_patch16_224"] == ("tensor", True)
    assert kinds["coat_lite_tiny-features"] == ("list", False)
    assert kinds["mpvit_tiny-outputs"] == ("dict", False)
