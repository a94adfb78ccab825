"""The timm model API of built models (blockgraph/compiler/timm_api.py), derived from the graph: against timm's
twins where they have one (same weights: the same pre-logits features, widths and no-weight-decay sets), and with
timm's own training tools (layer-wise decay, gradient checkpointing)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import blockgraph as bg
from tests.support.specs import ONE_TWIN_PER_FAMILY
from tests.support.timm_oracle import create_timm, import_timm
from tests.support.weights import randomize_batchnorm

pytestmark = pytest.mark.timm

ONE_PER_FAMILY = ONE_TWIN_PER_FAMILY


@pytest.fixture(scope="module", autouse=True)
def _timm():
    import_timm()


def _pair(name: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    twin = create_timm(bg.analyze(name).spec.twin.timm).eval()
    randomize_batchnorm(twin, torch.Generator().manual_seed(3))
    ours = bg.create_model(name).eval()
    bg.load_timm_state_dict(ours, twin.state_dict())
    return ours, twin


def _image(name: str) -> torch.Tensor:
    size = 256 if "mobilevit" in name else 224
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_features_and_head_as_the_twins(name: str) -> None:
    """forward_head(forward_features(x)) is forward(x); pre-logits equal the twin's; the widths are the twin's."""
    ours, twin = _pair(name)
    x = _image(name)
    with torch.no_grad():
        features = ours.forward_features(x)
        torch.testing.assert_close(ours.forward_head(features), ours(x), rtol=0, atol=1e-5)
        pre = ours.forward_head(features, pre_logits=True)
        expected = twin.forward_head(twin.forward_features(x), pre_logits=True)
    torch.testing.assert_close(pre, expected, rtol=0, atol=1e-5)
    assert (ours.num_classes, ours.num_features, ours.head_hidden_size) == (
        twin.num_classes,
        twin.num_features,
        getattr(twin, "head_hidden_size", twin.num_features),
    )
    first = features[0] if isinstance(features, list) else features
    assert ours.num_features in (first.shape[1], first.shape[-1])


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_no_weight_decay_is_the_twins(name: str) -> None:
    """The parameters timm's optimizer factory would not decay because the twin lists them (1-d ones are never
    decayed), mapped through the twin's rename rules."""
    from blockgraph.compiler.weights import _twin_rules, rename_key

    ours = bg.create_model(name, device="meta")
    twin = create_timm(bg.analyze(name).spec.twin.timm, device="meta")
    listed = twin.no_weight_decay() if hasattr(twin, "no_weight_decay") else set()
    _, rules = _twin_rules(ours)
    expected = {rename_key(k, rules) for k, p in twin.named_parameters() if k in listed and p.ndim > 1}
    assert {k for k in ours.no_weight_decay() if ours.get_parameter(k).ndim > 1} == expected


@pytest.mark.parametrize("name", ["coat_lite_tiny", "convnext_atto", "pvt_v2_b0", "deit_base_distilled_patch16_224"])
def test_reset_classifier(name: str) -> None:
    """0 classes: the model returns its pre-logits features; n classes: a fresh classifier of that width, in the
    spec the model carries (it pickles and deep-copies as such)."""
    ours, _ = _pair(name)
    x = _image(name)
    with torch.no_grad():
        pre = ours.forward_head(ours.forward_features(x), pre_logits=True)
        ours.reset_classifier(0)
        assert ours.num_classes == 0 and ours(x).shape == (2, ours.head_hidden_size)
        torch.testing.assert_close(ours(x), pre, rtol=0, atol=1e-5)  # trimmed last block vs all tokens
        classifiers = ours.get_classifier()
        assert all(
            isinstance(c, nn.Identity) for c in (classifiers if isinstance(classifiers, tuple) else [classifiers])
        )
        ours.reset_classifier(7)
        assert ours.num_classes == 7 and ours(x).shape == (2, 7)
        assert ours.output_types()["logits"].channels == 7
        for clone in (pickle.loads(pickle.dumps(ours)), copy.deepcopy(ours)):
            torch.testing.assert_close(clone(x), ours(x), rtol=0, atol=0)
    with pytest.raises(bg.BlockgraphError, match="num_classes must be an int >= 0"):
        ours.reset_classifier(-1)


def test_reset_classifier_global_pool_of_a_cls_head() -> None:
    ours = bg.create_model("vit_tiny_patch16_224").eval()
    ours.reset_classifier(0, "avg")
    x = _image("vit")
    with torch.no_grad():
        tokens = ours.forward_features(x)
        torch.testing.assert_close(ours(x), ours.get_submodule("head").norm(tokens)[:, 1:].mean(1), rtol=0, atol=1e-6)
    with pytest.raises(bg.BlockgraphError, match="global_pool='max'"):
        ours.reset_classifier(0, "max")


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "coat_lite_tiny", "convnext_atto"])
def test_layer_decay_groups_follow_execution_order(name: str) -> None:
    """timm's param_groups_layer_decay over group_matcher(): every parameter in a layer, the stem first, the
    head last, layer ids never decreasing along the forward."""
    from timm.optim import create_optimizer_v2
    from timm.optim._param_groups import param_groups_layer_decay

    model = bg.create_model(name, device="meta")
    groups = param_groups_layer_decay(model, weight_decay=0.05, no_weight_decay_list=model.no_weight_decay())
    by_id = {id(p): g["lr_scale"] for g in groups for p in g["params"]}  # decay ** (last layer - layer)
    scale = {n: by_id[id(p)] for n, p in model.named_parameters()}
    order = [scale[n] for n in _execution_order(model)]
    assert order == sorted(order) and len(set(order)) > 3 and order[-1] == 1.0
    assert all(scale[n] == 1.0 for n in scale if n.startswith("head"))
    create_optimizer_v2(bg.create_model(name), "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)


def _execution_order(model: nn.Module) -> list[str]:
    """The parameters in the order the forward first uses them (shared modules with their first user)."""
    graph = model.inference.graph
    names = [n for n, _ in model.named_parameters()]
    out: list[str] = []
    for node in model.nodes:
        n = graph.nodes[node]
        modules = [n.module_name, *(q for qs in n.shared.values() for q in ([qs] if isinstance(qs, str) else qs))]
        out += [p for p in names for m in modules if p.startswith(m + ".") and p not in out]
    return out


@pytest.mark.parametrize("name", ["coat_lite_tiny", "swin_tiny_patch4_window7_224"])
def test_grad_checkpointing_gives_the_same_gradients_and_keeps_fewer_activations(name: str) -> None:
    """float64, train mode (drop path off): equal loss and gradients (1e-10); the tensors saved for backward
    (measured with saved_tensors_hooks) shrink."""
    torch.manual_seed(0)
    model = bg.create_model(name, overrides={"drop_path": 0.0}).double().train()
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def step() -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        model.zero_grad()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nbytes) or t, lambda t: t):
            loss = model(x).square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, sum(saved)

    loss, grads, plain = step()
    model.set_grad_checkpointing(True)
    assert model.grad_checkpointing
    loss2, grads2, checkpointed = step()
    torch.testing.assert_close(loss2, loss, rtol=0, atol=1e-12)
    for n in grads:
        torch.testing.assert_close(grads2[n], grads[n], rtol=0, atol=1e-10, msg=n)
    assert checkpointed < 0.2 * plain, (checkpointed, plain)
    clone = pickle.loads(pickle.dumps(model))
    assert clone.grad_checkpointing and "checkpointed" in clone.forward.__func__.__code__.co_names
    model.set_grad_checkpointing(False)
    assert step()[2] == plain


def test_a_model_without_a_classifier_says_so() -> None:
    model = bg.build_model("deformable_encoder", overrides={"layers": 1}, device="meta")
    with pytest.raises(bg.BlockgraphError, match="has no classifier head"):
        model.get_classifier()
    with pytest.raises(bg.BlockgraphError, match="has no classifier head"):
        _ = model.num_classes


def test_timms_training_tools_run_two_steps() -> None:
    """What timm's train.py calls, on synthetic data: the data config, create_optimizer_v2 with layer decay,
    ModelEmaV3, grad checkpointing, the classification task, and the logit distillation task with our model as the
    student (a timm teacher) and as the teacher (a timm student)."""
    from timm.data import resolve_data_config
    from timm.optim import create_optimizer_v2
    from timm.task import ClassificationTask, LogitDistillationTask
    from timm.utils import ModelEmaV3

    torch.manual_seed(0)
    model = bg.create_model("coat_lite_tiny", num_classes=10, drop_path_rate=0.1)
    assert resolve_data_config(model=model)["crop_pct"] == 0.9
    model.set_grad_checkpointing(True)
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    ema = ModelEmaV3(model, decay=0.9)
    timm_model = create_timm("resnet18", num_classes=10)
    tasks = [
        ClassificationTask(model, verbose=False),
        LogitDistillationTask(model, timm_model, verbose=False),  # ours the student
        LogitDistillationTask(timm_model, bg.create_model("coat_lite_tiny", num_classes=10), verbose=False),
    ]
    x, y = torch.randn(2, 3, 96, 96), torch.tensor([1, 7])
    for task in tasks:
        task.train()
        student = task.trainable_module
        before = {n: p.detach().clone() for n, p in student.named_parameters()}
        opt = optimizer if student is model else torch.optim.SGD(student.parameters(), lr=0.1)
        for _ in range(2):
            out = task(x, y)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
            if student is model:
                ema.update(model)
        assert torch.isfinite(out["loss"])
        assert any(not torch.equal(p, before[n]) for n, p in student.named_parameters())
    ema_logits = ema.module.eval()(x)
    assert ema_logits.shape == (2, 10) and torch.isfinite(ema_logits).all()


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_forward_intermediates_are_the_twins(name: str) -> None:
    """The declared feature maps (ViT: its blocks' tokens as maps), equal to the twin's forward_intermediates with
    the same weights; the final features are forward_features'."""
    ours, twin = _pair(name)
    x = _image(name)
    with torch.no_grad():
        got = ours.forward_intermediates(x, intermediates_only=True)
        expected = twin.forward_intermediates(x, intermediates_only=True)
        assert len(got) == len(expected) == len(ours.feature_info or got)
        for a, b in zip(got, expected, strict=True):  # float32 rounding grows with the map's scale (CoaT: 6e3)
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * max(1.0, b.abs().max().item()))
        final, last_two = ours.forward_intermediates(x, indices=2)
        torch.testing.assert_close(last_two[1], got[-1], rtol=0, atol=0)
        features = ours.forward_features(x)
        for a, b in zip(
            final if isinstance(final, list) else [final],
            features if isinstance(features, list) else [features],
            strict=True,
        ):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        tokens = ours.forward_intermediates(x, indices=[0], output_fmt="NLC", intermediates_only=True)[0]
        assert tokens.shape == (2, got[0].shape[2] * got[0].shape[3], got[0].shape[1])


@pytest.mark.parametrize("name", ["convnext_atto", "coat_lite_tiny", "vit_tiny_patch16_224"])
def test_prune_intermediate_layers(name: str) -> None:
    """Pruned to intermediate 1: the later blocks and the head are gone, forward returns that intermediate (an
    identity head), forward_intermediates still takes indices up to it, and the model pickles as pruned."""
    model = bg.create_model(name).eval()
    x = _image(name)
    with torch.no_grad():
        expected = model.forward_intermediates(x, indices=[1], intermediates_only=True)[0]
    before = sum(p.numel() for p in model.parameters())
    assert model.prune_intermediate_layers([1]) == [1]
    assert sum(p.numel() for p in model.parameters()) < before and isinstance(model.get_classifier(), nn.Identity)
    with torch.no_grad():
        out = model(x)
        kept = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        clone = pickle.loads(pickle.dumps(model))
        again = clone(x)
    if out.ndim == 3:  # ViT: its block's tokens, the cls token first; the intermediate is the map of the others
        out = out[:, 1:].transpose(1, 2).reshape(expected.shape)
    for got in (out, kept[1]):  # the same computation (the fused eval kernels pick per call: not bit for bit)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(again, model(x), rtol=0, atol=1e-5)
    assert model.num_classes == 0 and model.num_features == expected.shape[1]
    with pytest.raises(bg.BlockgraphError, match="pruned"):
        model.forward_intermediates(x, indices=[2])
    with pytest.raises(bg.BlockgraphError, match="was pruned"):
        model.set_grad_checkpointing(True)


@pytest.mark.parametrize(("name", "chans"), [("convnext_atto", 1), ("coat_lite_tiny", 4)])
def test_in_chans_adapts_the_first_conv_of_pretrained_weights(name: str, chans: int, tmp_path) -> None:
    """create_model(in_chans=..., checkpoint_path=twin weights): the first convolution is adapted as timm's
    pretrained loader adapts it (summed over RGB for one channel, repeated and scaled by 3/n for more); the model
    then equals timm's model built with the same in_chans from the same file."""
    torch.manual_seed(0)
    twin = create_timm(bg.analyze(name).spec.twin.timm)
    path = tmp_path / "twin.pth"
    torch.save(twin.state_dict(), path)
    ours = bg.create_model(name, pretrained=True, in_chans=chans, checkpoint_path=path).eval()
    adapted = (
        import_timm()
        .create_model(  # timm's own loader adapts the file's first conv
            bg.analyze(name).spec.twin.timm, pretrained=True, in_chans=chans, pretrained_cfg_overlay={"file": str(path)}
        )
        .eval()
    )
    x = torch.randn(2, chans, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), adapted(x), rtol=0, atol=1e-5)
    assert ours.pretrained_cfg["input_size"][0] == chans


@pytest.mark.parametrize("name", ["convnext_atto", "poolformer_s12", "pvt_v2_b0", "mobilevit_xxs"])
def test_no_classifier_and_no_pooling_as_the_twins(name: str) -> None:
    """reset_classifier(0, '') and create_model(num_classes=0, global_pool=''): timm's pass-through head, a map of
    pool_size (the head's parts after the pool work on the map: ConvNeXt's norm over its channels), equal to the
    twin's with the same weights; the model pickles as such. (timm's InceptionNeXt cannot disable its pooling.)"""
    ours, twin = _pair(name)
    x = _image(name)
    pool = ours.pretrained_cfg["pool_size"]
    ours.reset_classifier(0, "")
    twin.reset_classifier(0, "")
    with torch.no_grad():
        got, expected = ours(x), twin(x)
        assert got.shape[-2:] == pool and got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * max(1.0, expected.abs().max().item()))
        torch.testing.assert_close(pickle.loads(pickle.dumps(ours))(x), got, rtol=0, atol=1e-5)
    fresh = bg.create_model(name, num_classes=0, global_pool="").eval()
    assert fresh(x).shape == got.shape and fresh.num_classes == 0 and fresh.num_features == ours.num_features
