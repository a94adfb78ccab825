"""The generated forward: each node's output is released right after its last reader (peak memory of hand-written
code), checked with weak references while the forward runs (a view of a value still needed shares its memory and
may stay)."""

from __future__ import annotations

import copy
import warnings
import weakref

import pytest
import torch
from torch.utils._pytree import tree_leaves

import blockgraph as bg
from blockgraph.compiler.codegen import script_program
from blockgraph.ops import conv as conv_ops
from blockgraph.ops.autotune import forcing
from blockgraph.ops.kernel import residual_training
from tests.conftest import ROOT
from tests.support.specs import shrunk


@pytest.mark.parametrize(("name", "outputs"), [("coat_lite_tiny", None), ("mpvit_tiny", ["stage2", "logits"])])
def test_every_intermediate_is_released_after_its_last_reader(name: str, outputs) -> None:
    model = bg.create_model(name, outputs=outputs).eval()
    graph = model.inference.graph
    order = list(model.nodes)
    readers = {n: [e.dst for e in graph.out_edges(n) if e.dst in order] for n in order}
    returned = {graph.outputs.get(k, graph.features.get(k)).node for k in model.outputs}
    alive: dict[str, list[weakref.ref]] = {}
    done: set[str] = set()
    leaks: list[tuple[str, str]] = []

    def before(name: str):
        def check(module, args, kwargs=None) -> None:
            needed = {n for n in alive if n in returned or not all(r in done for r in readers[n])}
            needed_storage = {_storage(t) for n in needed for r in alive[n] if (t := r()) is not None}
            for other, refs in alive.items():
                if other in needed:
                    continue
                for r in refs:  # a view of a value still needed shares its memory: not a leak
                    if (t := r()) is not None and _storage(t) not in needed_storage:
                        leaks.append((other, name))

        return check

    def after(name: str):
        def record(module, args, output) -> None:
            values = output if isinstance(output, tuple) else (output,)
            alive[name] = [weakref.ref(v) for v in values]
            done.add(name)

        return record

    for n in order:
        model.get_submodule(n).register_forward_pre_hook(before(n))
        model.get_submodule(n).register_forward_hook(after(n))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert len(done) == len(order)
    assert not leaks, f"outputs still alive after their last reader (node, checked before): {leaks[:5]}"


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize(
    "name",
    ["coat_lite_tiny", "coat_tiny", "vit_tiny_patch16_224", "mpvit_tiny", "swin_tiny_patch4_window7_224",
     "mobilevit_xxs", "deformable_encoder", "coat_lite_small_deformable"],
)  # fmt: skip
def test_one_graph_without_breaks_for_torch_compile(name: str) -> None:
    """Dynamo traces the whole forward as one graph (what torch.compile(fullgraph=True) needs): one spec per family,
    the deformable ones included (per-size caches must not break it)."""
    import torch._dynamo as dynamo

    model = bg.create_model(name).eval()
    with torch.no_grad():
        explained = dynamo.explain(model)(torch.randn(1, 3, *model.spec.input.size))
    dynamo.reset()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), [r.reason for r in explained.break_reasons]


@pytest.mark.parametrize(
    "name",
    ["coat_tiny", "deit_base_distilled_patch16_224", "mpvit_tiny", "swin_tiny_patch4_window7_224", "mobilevit_xxs",
     "deformable_encoder", "convnext_atto"],
)  # fmt: skip
def test_inductor_compiled_model_equals_eager(name: str) -> None:
    """One spec per family (CoaT's serial and parallel blocks, ViT with DeiT's head, MPViT, Swin, MobileViT, the
    deformable encoder, ConvNeXt's residual branches with their layer scales), depths at 1: torch.compile with
    inductor (the graphs compiled for inference call the eager inference kernels as ops of their own: the linear and
    convolution ops, the merged CRPE) gives the eager model's values, float32, within 1e-4."""
    path = ROOT / "specs" / f"{name}.yaml"
    torch.manual_seed(0)
    model = bg.build_model(path, overrides=shrunk(path)).eval()
    x = torch.randn(2, 3, *model.spec.input.size)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True, dynamic=False)(x)
    torch._dynamo.reset()
    for got, expected in zip(tree_leaves(compiled), tree_leaves(eager), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


_LAYOUT_SPEC = """
name: layout
input: {{name: image, channels: 3, size: [32, 32]{extra}}}
blocks:
  - {{name: conv, op: conv2d, dim_out: 8, kernel: 3, stride: 2}}
  - {{name: norm, op: norm, kind: group, groups: 1}}
  - {{name: pool, op: pool, kind: avg, kernel: 3, stride: 1, padding: 1}}
  - {{name: head, op: avg_pool_head, dim: 8, num_classes: 5}}
outputs: {{logits: head}}
"""


def test_an_image_in_channels_last_memory_gives_the_same_values(tmp_path) -> None:
    """``memory_format: channels_last`` copies the image to channels-last memory on entry (the maps after it keep
    that layout) and changes no value beyond float rounding (float64 here); an image already in it is not copied."""
    models = {}
    for fmt, extra in (("contiguous", ""), ("channels_last", ", memory_format: channels_last")):
        path = tmp_path / f"{fmt}.yaml"
        path.write_text(_LAYOUT_SPEC.format(extra=extra))
        torch.manual_seed(0)
        models[fmt] = bg.build_model(path, dtype=torch.float64).train()
    seen = []
    models["channels_last"].get_submodule("norm").register_forward_hook(
        lambda m, args, out: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    outs = [models[fmt](x) for fmt in ("contiguous", "channels_last")]
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-12)
    grads = [torch.autograd.grad(out.square().sum(), x)[0] for out in outs]
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-12)
    assert seen == [True]
    assert "contiguous(memory_format=torch.channels_last)" in models["channels_last"].code
    assert "memory_format" not in models["contiguous"].code
    # channels_last_training: the copy in training mode only
    (tmp_path / "training.yaml").write_text(_LAYOUT_SPEC.format(extra=", memory_format: channels_last_training"))
    torch.manual_seed(0)
    model = bg.build_model(tmp_path / "training.yaml", dtype=torch.float64).train()
    seen.clear()
    model.get_submodule("norm").register_forward_hook(
        lambda m, args, out: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    torch.testing.assert_close(model(x), outs[0], rtol=0, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), models["contiguous"].eval()(x), rtol=0, atol=1e-12)
    assert seen == [True, False]
    (tmp_path / "mask.yaml").write_text(
        _LAYOUT_SPEC.format(extra="").replace(
            "input: {name: image, channels: 3, size: [32, 32]}",
            "inputs:\n  image: {channels: 3, size: [32, 32]}\n  mask: {kind: mask, memory_format: channels_last}",
        )
    )
    with pytest.raises(bg.SpecError, match="only an image input has a memory format"):
        bg.analyze(tmp_path / "mask.yaml")


def test_an_auto_memory_format_is_measured_per_shape_in_inference(tmp_path) -> None:
    """``memory_format: auto``: channels-last in training; in eager inference the layout whose whole forward
    measured faster for the image's shape, timed once per shape (autotune.choices lists it), the values those of
    the image as given; NCHW without measuring when tuning is off or forward hooks would see the timed calls;
    channels-last in a graph compiled for inference (nothing measured); the image as given under autograd and in
    TorchScript."""
    from blockgraph.ops import autotune

    (tmp_path / "auto.yaml").write_text(_LAYOUT_SPEC.format(extra=", memory_format: auto"))
    torch.manual_seed(0)
    model = bg.build_model(tmp_path / "auto.yaml").eval()
    assert "self._measured_layout(image)" in model.code
    autotune.reset()
    seen = []
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model._forward_laid_out(x, torch.contiguous_format)
        with autotune.tuning(False):  # NCHW, nothing measured
            torch.testing.assert_close(model(x.contiguous(memory_format=torch.channels_last)), expected)
        assert not [k for k in autotune.choices() if k[0] == "memory_format"]
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        measured = [k for k in autotune.choices() if k[0] == "memory_format"]
        assert [k[3] for k in measured] == [(2, 3, 32, 32)]
        assert set(autotune.choices()[measured[0]].seconds) == {"contiguous", "channels_last"}
        hook = model.get_submodule("norm").register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
        model(x)  # known: taken, hooks or not (one call)
        model(torch.randn(1, 3, 32, 32))  # a new shape with hooks: NCHW, not measured
        hook.remove()
    assert len(seen) == 2 and len([k for k in autotune.choices() if k[0] == "memory_format"]) == 1
    model.train()
    seen_cl = []
    hook = model.get_submodule("norm").register_forward_hook(
        lambda m, args, out: seen_cl.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    model(x)
    hook.remove()
    assert seen_cl == [True]
    model.eval()
    compiled = torch.compile(model._measured_layout, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert compiled(x).is_contiguous(memory_format=torch.channels_last)
    assert compiled(x).is_contiguous()  # gradients recorded: as given
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.x: "torch.jit.script is deprecated"
        script = torch.jit.script(model.eval())
    with torch.no_grad():
        torch.testing.assert_close(script(x), expected, rtol=1e-5, atol=1e-5)
        before = model._layout_key
        model.reset_classifier(3)  # another architecture: its layout measured anew, not the old head's choice
        model(x)
    assert model._layout_key != before and model._layout_key[2] == sum(p.numel() for p in model.parameters())
    assert len([k for k in autotune.choices() if k[0] == "memory_format"]) == 2


_ACT_SPEC = """
name: acts
input: {name: image, channels: 3, size: [32, 32]}
blocks:
  - {name: conv, op: conv2d, dim_out: 16, kernel: 3, stride: 2}
  - {name: act, op: act, kind: gelu}
  - {name: tokens, op: rearrange, pattern: b c h w -> b (h w) c}
  - {name: fc, op: linear, dim_out: 16}
  - {name: fc_act, op: act, kind: silu}
  - {name: star, op: act, kind: star_relu}
  - {name: proj, op: linear, dim_out: 16}
  - {name: proj_act, op: act, kind: relu}
  - {name: sum, op: add, from: [proj, proj_act]}
  - {name: pool, op: pool, kind: avg, global: true}
  - {name: head, op: classifier, num_classes: 5}
"""


def test_an_activation_rides_along_the_convolution_or_linear_it_alone_reads(tmp_path) -> None:
    """An activation right after a conv2d or linear that nothing else reads is passed to its call (``act=``), so
    that an inference kernel applies it in its epilogue: the same values as the separate calls (eval, inference,
    against the training-mode-free reference of each layer), the activation's hooks still called. Not fused: an
    activation with parameters (star_relu), a producer with another reader, or one returned as an output."""
    path = tmp_path / "acts.yaml"
    path.write_text(_ACT_SPEC)
    torch.manual_seed(0)
    model = bg.build_model(path).eval()
    code = model.code
    assert "self.conv(image, act=self.act)" in code and "self.fc(tokens, act=self.fc_act)" in code
    assert "act=self.star" not in code and "act=self.proj_act" not in code  # star_relu; proj read twice
    x = torch.randn(2, 3, 32, 32)
    layers = dict(model.named_children())

    def reference(x: torch.Tensor) -> torch.Tensor:
        t = layers["act"](layers["conv"](x)).flatten(2).transpose(1, 2)
        t = layers["star"](layers["fc_act"](layers["fc"](t)))
        p = layers["proj"](t)
        return layers["head"](layers["pool"](p + layers["proj_act"](p)))

    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    seen = []
    model.get_submodule("act").register_forward_hook(lambda m, args, out: seen.append(out.shape))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    assert seen == [torch.Size([2, 16, 16, 16])] * 2  # (reference's call, then the model's)
    path.write_text(_ACT_SPEC + "outputs: {logits: head, conv: conv}\n")
    assert "act=self.act)" not in bg.build_model(path, outputs=["conv", "logits"]).code
    assert "act=self.act)" in bg.build_model(path, outputs=["logits"]).code


def test_each_container_is_reached_from_self_once_per_forward_and_swaps_are_seen() -> None:
    """A container two calls reach through gets a local name at its first use: one walk from ``self`` per
    container and forward (Python overhead), looked up again on every call (a module swapped in is used)."""
    model = bg.create_model("convnext_atto").eval()
    walks = [line.split(" = ", 1)[1] for line in model.code.splitlines() if " = self." in line]
    assert sorted(walks) == sorted(
        f"self.{child}" for child in ("stem", "stage0", "stage1", "stage2", "stage3", "head")
    )
    assert "self.stage0.blocks[0]" not in model.code and "m_stage0_blocks_0.conv_dw(" in model.code
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        model.stage0.blocks[0] = torch.nn.Identity()  # the container replaced between calls: not cached anywhere
        with pytest.raises(AttributeError, match="conv_dw"):
            model(x)
    assert before.shape == (1, 1000)
    coat = bg.create_model("coat_lite_tiny", device="meta")
    scripted = script_program(coat.inference, coat._program, set()).code  # TorchScript's program: the full paths
    assert "self.stage1.blocks[0](" in scripted and "m_stage1" not in scripted


_RESIDUAL_SPEC = """
name: residuals
input: {name: image, channels: 3, size: [32, 32], memory_format: channels_last}
blocks:
  - {name: stem, op: conv2d, dim_out: 16, kernel: 3, stride: 2}
  - {name: fc1, op: conv2d, dim_out: 32, kernel: 1}
  - {name: act, op: act, kind: gelu}
  - {name: fc2, op: conv2d, dim_out: 16, kernel: 1}
  - {name: gamma, op: layer_scale, init: 0.5}
  - {name: drop, op: drop_path, rate: 0.5}
  - {name: add, op: add, from: [drop, stem]}
  - {name: pw, op: conv2d, dim_out: 16, kernel: 1}
  - {name: pa, op: layer_scale, init: 0.3}
  - {name: pb, op: layer_scale, init: 2.0}
  - {name: add2, op: add, from: [add, pb]}
  - {name: proj, op: linear, dim_out: 16}
  - {name: ls, op: layer_scale, init: 0.3}
  - {name: pdrop, op: dropout, rate: 0.5}
  - {name: add3, op: add, from: [pdrop, add2]}
  - {name: side, op: conv2d, dim_out: 16, kernel: 1}
  - {name: add4, op: add, from: [side, add3]}
  - {name: mix, op: add, from: [add4, side]}
  - {name: dw, op: conv2d, dim_out: 16, kernel: 3, groups: 16}
  - {name: dw_act, op: act, kind: relu}
  - {name: add5, op: add, from: [dw_act, mix]}
  - {name: pool, op: pool, kind: avg, global: true}
  - {name: head, op: classifier, num_classes: 5}
"""


def _residual_reference(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The residual spec's model with each module called as written."""
    m = dict(model.named_children())
    stem = m["stem"](x)
    add = m["drop"](m["gamma"](m["fc2"](m["act"](m["fc1"](stem))))) + stem
    add2 = add + m["pb"](m["pa"](m["pw"](add)))
    add3 = m["pdrop"](m["ls"](m["proj"](add2))) + add2
    side = m["side"](add3)
    mix = (side + add3) + side
    return m["head"](m["pool"](m["dw_act"](m["dw"](mix)) + mix))


def test_a_residual_branch_rides_along_the_convolution_or_linear_it_ends_in(tmp_path, monkeypatch) -> None:
    """An add whose input is a conv2d or linear followed only by layer scales, dropout or drop path, each read by the
    next alone, is one call (``residual_add``), whose eager inference kernel adds the residual in its epilogue and
    folds the scales into the weights: the same values as the modules called as written, in eval with either kernel
    (float64 reference) and in a training step (drop path on, same seed; float64, 1e-10: the scale folded into the
    weights, the drop path's factors and the add one pass), gradients too; the values follow a
    scale changed in place; in a graph compiled for inference the convolution's op takes the residual and the scale;
    under autocast, with two layer scales (``pa``, ``pb``) and when a hook is on a branch's
    module, the modules run as written (the hook sees its call). Not fused: a layer another node reads
    (``side``), a branch through an activation (``dw_act``)."""
    path = tmp_path / "residuals.yaml"
    path.write_text(_RESIDUAL_SPEC)
    torch.manual_seed(0)
    model = bg.build_model(path)
    code = model.code
    assert "residual_add(self.fc2, act, stem, (self.gamma, self.drop), self.add)" in code
    assert "residual_add(self.pw, add, add, (self.pa, self.pb), self.add2, first=False)" in code
    assert "residual_add(self.proj, add2, add2, (self.ls, self.pdrop), self.add3)" in code
    assert code.count("residual_add(") == 3  # side: read twice; dw: its activation between
    x = torch.randn(2, 3, 32, 32)
    trained = copy.deepcopy(model).double()
    folded = []
    monkeypatch.setattr(conv_ops, "residual_training", lambda *a: folded.append(a[-1]) or residual_training(*a))
    torch.manual_seed(1)
    out = trained(x.double())
    out.sum().backward()
    grads = [p.grad.clone() for p in trained.parameters()]
    trained.zero_grad()
    torch.manual_seed(1)  # (the same drop path mask)
    expected = _residual_reference(trained, x.double().contiguous(memory_format=torch.channels_last))
    expected.sum().backward()
    assert len(folded) == 1 and folded[0].shape == (2, 1, 1, 1)  # fc2's branch (proj's has live dropout)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    for g, p in zip(grads, trained.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-10)
    model.eval()
    with torch.no_grad():
        expected = _residual_reference(model.double(), x.double())
        model.float()
        for kernel in ("fused", "plain"):
            with forcing(kernel):
                torch.testing.assert_close(model(x).double(), expected, rtol=1e-5, atol=1e-5, msg=kernel)
        model.get_submodule("gamma").gamma.mul_(-3)
        torch.testing.assert_close(model(x), _residual_reference(model, x), rtol=1e-5, atol=1e-5)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # inference: the layers' ops take the add
    with torch.no_grad(), forcing("fused"):
        torch.testing.assert_close(compiled(x), _residual_reference(model, x), rtol=1e-5, atol=1e-5)
        with torch.profiler.profile(record_shapes=True) as prof:
            compiled(x)
    calls = [e.input_shapes for e in prof.key_averages(group_by_input_shape=True) if e.key.startswith("blockgraph::")]
    with_residual = [(e[0], e[-2]) for e in calls if len(e) > 1 and e[-2]]  # the op's (input, residual) shapes
    assert len(with_residual) == 1 and with_residual[0][1] == [2, 16, 16, 16], calls  # fc2's; pw has two scales
    torch._dynamo.reset()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # as written: the branch's dtypes kept
        got = model(x)
        assert torch.equal(got, _residual_reference(model, x.contiguous(memory_format=torch.channels_last)))
    seen = []
    model.get_submodule("ls").register_forward_hook(lambda m, args, out: seen.append(out.shape))
    with torch.no_grad():
        torch.testing.assert_close(model(x), _residual_reference(model, x), rtol=1e-5, atol=1e-5)
    assert len(seen) == 2  # (the model's call, then the reference's)
