"""The compiled model: its class (spec, feature info, generated ``forward``, summary), built from an analysis by
:func:`compile_model`: each node's module, built by its block (``BlockSpec.build``), installed under the node's
dotted name (``stage1.blocks.0`` → ``model.stage1.blocks[0]``); shared modules once under their qualified name,
handed to their users as keyword arguments. A model pickles as torch.fx's ``GraphModule`` does: its class and
``forward`` are regenerated from the spec (:func:`rebuild`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import types
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from blockgraph.blocks.base import BuildContext
from blockgraph.compiler import summary, timm_api
from blockgraph.compiler.check import check_custom_blocks
from blockgraph.compiler.codegen import Program, generate
from blockgraph.errors import BlockgraphError, BudgetError, ShapeError
from blockgraph.graph.infer import Inference
from blockgraph.layers.common import has_hooks
from blockgraph.ops import autotune
from blockgraph.ops.kernel import compiled_inference, eager_inference
from blockgraph.ops.linear import release_packed
from blockgraph.pipeline import Analysis, analyze_embedded
from blockgraph.spec.plugins import custom_code
from blockgraph.spec.schema import ModelBase
from blockgraph.types import TensorType


class FeatureInfo(list):
    """The declared feature maps, timm style: a list of dicts (``name``, ``module``: the node that produces it,
    ``num_chs``, ``reduction``: its stride, ``index``), one per feature the spec declares, and ``out_indices``, the
    ones ``forward`` returns (all, unless the model was built with ``out_indices``).

    ``channels()``, ``reduction()`` and ``module_name()`` give the values of the returned features, in order (or,
    with ``idx``, of the features at those indices), like timm's ``FeatureInfo``.
    """

    def __init__(self, info: list[dict[str, Any]], out_indices: Any):
        super().__init__(info)
        self.out_indices: tuple[int, ...] = tuple(out_indices)

    def get(self, key: str, idx: int | list[int] | tuple[int, ...] | None = None) -> Any:
        """The value of ``key`` for each returned feature (``idx=None``), for the feature at ``idx``, or for each
        feature at the indices in ``idx``."""
        if idx is None:
            return [self[i][key] for i in self.out_indices]
        if isinstance(idx, list | tuple):
            return [self[i][key] for i in idx]
        return self[idx][key]

    def channels(self, idx: int | list[int] | tuple[int, ...] | None = None) -> Any:
        return self.get("num_chs", idx)

    def reduction(self, idx: int | list[int] | tuple[int, ...] | None = None) -> Any:
        return self.get("reduction", idx)

    def module_name(self, idx: int | list[int] | tuple[int, ...] | None = None) -> Any:
        return self.get("module", idx)


class BlockgraphModel(nn.Module):
    """Base of compiled models. Each compiled model gets its own subclass whose ``forward`` is generated code.

    It pickles (``pickle``, ``torch.save``) as the spec, the outputs chosen and its state, and unpickles by
    analysing the spec again and regenerating its class and ``forward`` (:func:`rebuild`), as torch.fx's
    ``GraphModule`` does; ``copy.deepcopy`` shares the analysis instead.

    Attributes:
        spec: the validated spec (:class:`~blockgraph.spec.schema.ModelBase`).
        spec_data: the expanded spec as plain data: a spec of its own (no ``extends:``, no expressions), which
            rebuilds this architecture.
        feature_info: one dict per declared feature map: ``name``, ``module`` (node), ``num_chs``, ``reduction``,
            ``index``; a :class:`FeatureInfo` (``.channels()``, ``.reduction()``, ``.module_name()``, ``.out_indices``).
        code: the source of the generated ``forward``.
        outputs: the outputs ``forward`` returns, in order.
        trimmed_tokens: nodes that compute only their first k tokens, because every reader reads only those (ViT's
            last block, read by a head on the cls token): ``{node: k}``. A node that is returned (``outputs=``) is
            never trimmed.
    """

    spec: ModelBase
    spec_data: dict[str, Any]
    feature_info: FeatureInfo
    code: str
    outputs: list[str]
    trimmed_tokens: dict[str, int]

    _pruned: list[int] | None = None
    """The intermediates kept by ``prune_intermediate_layers`` (None: not pruned)."""
    grad_checkpointing: bool = False
    """Whether ``forward`` recomputes each block's activations in the backward pass (``set_grad_checkpointing``)."""

    _DERIVED = frozenset(
        "spec code trimmed_tokens outputs returns nodes feature_info _analysis _program _head _api forward".split()
    )
    """What :meth:`_attach` derives from the spec data: not pickled. (``spec_data`` is: read back from JSON text it
    means the same, but its form may differ, ``{3: 2}`` read as ``{"3": 2}``.)"""

    def train(self, mode: bool = True) -> BlockgraphModel:
        """``nn.Module.train`` (``eval()`` calls it too); it also drops the oneDNN copies of this model's weights that
        eager inference packs (:func:`blockgraph.ops.linear.release_packed`), so that a weight written since in a
        way autograd's version counter does not see (through ``.data``) is packed afresh."""
        release_packed(self.parameters())
        return super().train(mode)

    def _attach(self, analysis: Analysis, program: Program) -> None:
        graph = analysis.graph
        self.spec = analysis.spec
        self.spec_data = analysis.expanded.standalone()
        self.code = program.code
        self.trimmed_tokens = program.trimmed
        self.outputs = [name for name, _, _ in program.chosen]
        self.returns = program.returns
        self.nodes = [n for n in program.order if not graph.nodes[n].is_input]
        taps = timm_api.intermediates(analysis.inference)  # the declared features, else (ViT) its blocks
        names = [name for name, _, _ in taps]
        types = [timm_api._port(analysis.inference.types[node], port) for _, node, port in taps]
        info = [{"name": name, "module": node, "num_chs": t.channels, "reduction": t.stride(), "index": i}
                for i, ((name, node, _), t) in enumerate(zip(taps, types, strict=True))]  # fmt: skip
        selected = [names.index(n) for n in self.outputs] if program.returns == "list" else range(len(names))
        self.feature_info = FeatureInfo(info, selected)
        self._analysis, self._program = analysis, program
        self._head = timm_api.find_head(analysis.inference)
        self.__dict__.pop("_layout_key", None)  # (a new head or program: the architecture a layout was measured for)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if state.get("_pruned") is not None:
            timm_api._prune(self, state["_pruned"], remove=False)  # its modules are already the pruned ones
        if state.get("grad_checkpointing"):
            self.set_grad_checkpointing(True)

    # ------------------------------------------------------------------ the timm model API (compiler/timm_api.py)

    @property
    def num_classes(self) -> int:
        """The classifier's width (0: the model returns its pre-logits features)."""
        return timm_api._need_head(self).num_classes

    @property
    def in_chans(self) -> int:
        """Channels of the input image."""
        return self.spec.input.channels

    @property
    def num_features(self) -> int:
        """Channels of what ``forward_features`` returns (of its first value, for a head with several inputs)."""
        return timm_api._need_head(self).num_features

    @property
    def head_hidden_size(self) -> int:
        """Channels of the pre-logits features (``forward_head(x, pre_logits=True)``)."""
        return timm_api._need_head(self).hidden

    def forward_features(self, x: Any) -> Any:
        """The model up to its classifier head: the value the head reads (a list, for a head with several)."""
        return timm_api.features_program(self)(self, x)

    def forward_head(self, x: Any, pre_logits: bool = False) -> Any:
        """The head on ``forward_features``' output: the logits, or with ``pre_logits`` what the classifier reads."""
        return timm_api.forward_head(self, x, pre_logits)

    def get_classifier(self) -> nn.Module | tuple[nn.Module, ...]:
        """The classifier (``nn.Linear``, or ``nn.Identity`` for 0 classes; a pair for a distilled head)."""
        return timm_api.classifier_modules(self)

    def reset_classifier(self, num_classes: int, global_pool: Any = None) -> None:
        """A fresh classifier for ``num_classes`` (0: none); ``global_pool`` changes a cls head's pooling."""
        timm_api.reset_classifier(self, num_classes, global_pool)

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """timm's data config: the spec's ``data:`` (interpolation, crop, mean, std), its input size, and from the
        graph the pooled map's size, the first convolution and the classifier."""
        return timm_api.pretrained_cfg(self)

    @property
    def default_cfg(self) -> dict[str, Any]:
        """The same as ``pretrained_cfg`` (timm's older name)."""
        return self.pretrained_cfg

    def forward_intermediates(
        self,
        x: Any,
        indices: int | list[int] | tuple[int, ...] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Any:
        """timm's: the feature maps at ``indices`` (of ``features:``, or of the longest repeated block for a spec
        without: ViT's blocks), and unless ``intermediates_only`` the final features."""
        return timm_api.forward_intermediates(self, x, indices, norm, stop_early, output_fmt, intermediates_only)

    def prune_intermediate_layers(
        self, indices: int | list[int] | tuple[int, ...] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """timm's: drop the blocks after the last intermediate at ``indices`` and the head; ``forward`` then returns
        that intermediate. Returns the kept indices."""
        return timm_api.prune_intermediate_layers(self, indices, prune_norm, prune_head)

    def no_weight_decay(self) -> set[str]:
        """Parameters that take no weight decay: what the blocks declare (tokens, position embeddings, tables)."""
        return timm_api.no_weight_decay(self)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's parameter grouping (stem, then the blocks in execution order, the head last), for layer decay."""
        return timm_api.group_matcher(self, coarse)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them (training only)."""
        if enable and self._pruned is not None:
            raise BlockgraphError(
                "set_grad_checkpointing: this model was pruned (prune_intermediate_layers)",
                hint="build the model with features_only=True (its forward is the trunk) and checkpoint that",
            )
        if enable:
            program = generate(self.inference, self._program.asked, self._program.features_only, checkpoint=True)
            self.forward = types.MethodType(program.forward(self.spec.name), self)
        else:
            self.__dict__.pop("forward", None)
        self.grad_checkpointing = enable

    def __prepare_scriptable__(self) -> nn.Module:
        """What ``torch.jit.script(model)`` compiles: the script view (compiler/script.py), the same parameters and
        buffers under modules whose code TorchScript can compile; the model itself is unchanged."""
        from blockgraph.compiler.script import script_view

        return script_view(self)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle as the spec (JSON text) and the outputs asked for, from which :func:`rebuild` makes the empty
        model, then the state (submodules, parameters, buffers, hooks, attributes) that pickle restores into it
        through ``__setstate__``: after ``rebuild`` has run (a plugin it loads may define classes of the state)."""
        state = {k: v for k, v in self.__dict__.items() if k not in self._DERIVED}
        return rebuild, (json.dumps(self.spec_data), self._program.asked, self._program.features_only), state

    def __deepcopy__(self, memo: dict[int, Any]) -> BlockgraphModel:
        """A copy like the default one (modules, parameters, buffers, hooks copied), sharing the immutable spec,
        analysis and generated code instead of pickling them through :meth:`__reduce__`."""
        for shared in (self.spec, self._analysis, self._program):
            memo[id(shared)] = shared
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return clone

    @property
    def analysis(self) -> Analysis:
        """The static analysis this model was compiled from: spec, graph, types, constraints, accepted sizes."""
        return self._analysis

    @property
    def inference(self) -> Inference:
        """``analysis.inference``: every node's type, the constraints, the accepted sizes."""
        return self._analysis.inference

    def _measured_layout(self, image: torch.Tensor) -> torch.Tensor:
        """``memory_format: auto`` in eval mode: in eager inference, ``image`` in the memory layout (NCHW or
        channels-last) whose whole forward measured faster for its shape here (timed on the first call of each
        shape: :func:`blockgraph.ops.autotune.choose`); in a graph torch.compile traces for inference on the CPU,
        channels-last (a traced graph cannot time candidates; its convolution ops read packed weights on such maps:
        InceptionNeXt-T compiled took 0.80-0.86 of timm's compiled time at batch 1 and 0.97 at batch 8 so, 1.05-1.10
        and 1.20 on NCHW maps); elsewhere, or while measuring, the image as given."""
        if compiled_inference() and image.device.type == "cpu" and image.dim() == 4:
            return image.contiguous(memory_format=torch.channels_last)
        if self.__dict__.get("_measuring_layout") or not eager_inference(image) or image.dim() != 4:
            return image
        if "_layout_key" not in self.__dict__:  # the architecture: the spec's name and parameter count
            self._layout_key = ("memory_format", self.spec.name, sum(p.numel() for p in self.parameters()))
        key = (*self._layout_key, tuple(image.shape), image.dtype)
        if autotune.chosen(key, device=image.device) is None and any(has_hooks(m) for m in self.modules()):
            return image.contiguous()  # (hooks would see the timed calls)
        layouts = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
        candidates = {name: partial(self._forward_laid_out, image, fmt) for name, fmt in layouts.items()}
        chosen = autotune.choose(key, candidates, device=image.device)
        return image.contiguous(memory_format=layouts[chosen])

    def _forward_laid_out(self, image: torch.Tensor, memory_format: torch.memory_format) -> Any:
        """The forward on ``image`` laid out in ``memory_format`` (a candidate :meth:`_measured_layout` times)."""
        self._measuring_layout = True
        try:
            return self(image.contiguous(memory_format=memory_format))
        finally:
            self._measuring_layout = False

    def _reject(self, x: Any) -> None:
        """Raise a :class:`ShapeError` explaining why ``forward`` cannot take ``x`` (called only on failure)."""
        spec = self.spec
        shape = tuple(x.shape)
        if x.ndim != 4:
            raise ShapeError(
                f"'{spec.name}' takes a 4-d image batch [B, {spec.input.channels}, H, W], got shape {list(shape)}",
                node=spec.input.name,
                hint="add a batch dimension with x.unsqueeze(0)" if x.ndim == 3 else None,
            )
        self.inference.check(shape[2], shape[3], channels=shape[1])
        raise ShapeError(f"input of shape {list(shape)} rejected", node=spec.input.name)  # pragma: no cover

    def _reject_mask(self, name: str, mask: Any, x: Any) -> None:
        """Raise a :class:`ShapeError` explaining why ``forward`` cannot take ``mask`` with the image ``x``."""
        expected = [x.shape[0], x.shape[-2], x.shape[-1]]
        got = f"{getattr(mask, 'dtype', type(mask).__name__)} of shape {list(getattr(mask, 'shape', []))}"
        if isinstance(mask, torch.Tensor) and mask.device != x.device:
            raise ShapeError(
                f"'{self.spec.name}' takes the padding mask '{name}' on the image's device ({x.device}), got it on "
                f"{mask.device}",
                node=name,
                hint=f"move it with mask.to({str(x.device)!r})",
            )
        raise ShapeError(
            f"'{self.spec.name}' takes the padding mask '{name}' as booleans of shape {expected} (the image's batch "
            f"and size), got {got}",
            node=name,
            hint="True where the image is padding; e.g. torch.zeros(B, H, W, dtype=torch.bool) for none",
        )

    def _reject_single(self, x: Any) -> None:
        """Raise the :class:`ShapeError` of a training batch of one image whose map is 1x1 at a BatchNorm."""
        graph = self.inference.graph
        h, w = x.shape[-2], x.shape[-1]
        for name in self.nodes:
            node = graph.nodes[name]
            t = self.inference.types[name]
            values = t.values() if isinstance(t, dict) else (t,)
            if not node.spec.uses_batch_norm():  # type: ignore[union-attr]
                continue
            vector = any(v.grid is None for v in values)
            if vector or any(v.shape({"H": h, "W": w}, 1)[2:] == (1, 1) for v in values):
                raise ShapeError(
                    f"in training, a batch of one {h}x{w} image leaves node '{name}' ({node.op}) "
                    f"{'a vector' if vector else 'a 1x1 map'}: its BatchNorm would see one value per channel and "
                    "cannot compute batch statistics",
                    pos=graph.pos(node.path),
                    node=name,
                    hint=f"train with a batch of 2 or more{'' if vector else ' or with larger images'}, or call "
                    "model.eval()",
                )
        raise ShapeError(f"input of shape {list(x.shape)} rejected in training", node=self.spec.input.name)

    def shared_modules(self) -> list[str]:
        """Qualified names of the shared modules this model uses."""
        graph = self.inference.graph
        names: set[str] = set()
        for n in self.nodes:
            for q in graph.nodes[n].shared.values():
                names.update([q] if isinstance(q, str) else q)
        return sorted(names)

    def macs(self, input_size: tuple[int, int] | None = None, batch: int = 1) -> dict[str, int]:
        """Multiply-accumulates per node (and ``"total"``) for one forward of a batch at ``input_size`` (default: the
        spec's), counted on the meta device (see :func:`blockgraph.compiler.summary.count_macs`)."""
        return summary.count_macs(self, input_size, batch)

    def output_types(self) -> dict[str, TensorType]:
        """The static type of each output ``forward`` returns, by name (``output`` for the last block of a spec that
        declares no outputs)."""
        types = self.inference.types
        return {
            key: types[node] if port is None else types[node][port]  # type: ignore[index,misc]
            for key, node, port in self._program.chosen
        }

    def node_types(self) -> dict[str, TensorType | dict[str, TensorType]]:
        return {n: self.inference.types[n] for n in self.nodes}

    def summary(self, input_size: tuple[int, int] | None = None, batch: int = 1, macs: bool = True) -> str:
        """A table of every node: name, op, output type (symbolic) and shape at ``input_size``, parameters, and
        multiply-accumulates (see :meth:`macs`)."""
        return summary.table(self, input_size, batch, macs)


class Container(nn.Module):
    """A namespace module for dotted names (``stage1`` holding ``patch_embed``, ``blocks``, ...)."""


def compile_model(
    analysis: Analysis,
    *,
    outputs: Sequence[str] | None = None,
    features_only: bool = False,
    device: Any = None,
    dtype: Any = None,
) -> BlockgraphModel:
    """Build the modules of every node the chosen outputs need, and generate ``forward``.

    Raises:
        BlockgraphError: an output is unknown; :class:`BudgetError`: a block's tensors are too large to exist.
    """
    graph = analysis.graph
    program = generate(analysis.inference, outputs, features_only)
    model = empty(analysis, program)
    modules: dict[str, nn.Module] = {}
    for qualified in model.shared_modules():
        shared = graph.shared[qualified]
        pos = graph.pos(shared.path)
        with custom_code(shared.spec, qualified, pos, "its build()"), _sized(qualified, shared.spec.op, pos):
            modules[qualified] = shared.spec.build(BuildContext(qualified, device, dtype))
    input_size = tuple(analysis.spec.input.size)
    for name in model.nodes:
        node = graph.nodes[name]
        if node.module_name in modules:  # a part of a `use` whose shared module an earlier use built
            continue
        pos = graph.pos(node.path)
        with custom_code(node.spec, name, pos, "its build()"), _sized(name, node.op, pos):  # type: ignore[arg-type]
            ctx = BuildContext(name, device, dtype, keep_tokens=program.trimmed.get(name), input_size=input_size)
            modules[node.module_name] = node.spec.build(ctx, *analysis.inference.inputs(name))  # type: ignore[union-attr]
    taps = _taps(analysis, model.nodes)
    for name in taps:  # parameterless nodes the features need beyond the outputs (tokens_to_map): intermediates
        node = graph.nodes[name]
        with custom_code(node.spec, name, graph.pos(node.path), "its build()"):  # type: ignore[arg-type]
            ctx = BuildContext(name, device, dtype, input_size=input_size)
            modules[node.module_name] = node.spec.build(ctx, *analysis.inference.inputs(name))  # type: ignore[union-attr]
    check_custom_blocks(analysis.inference, [*model.shared_modules(), *model.nodes, *taps])  # on the meta device
    _install(model, modules)
    return model


def _taps(analysis: Analysis, built: list[str]) -> list[str]:
    """The nodes the declared features need that the chosen outputs do not, when none of them has parameters or
    shared modules (a tokens-to-map reshape): built too, so that ``forward_intermediates`` reaches the features of
    a classifier. Features that need weights of their own are left to ``features_only``."""
    graph = analysis.graph
    wanted = timm_api.intermediates(analysis.inference)
    needed = graph.ancestors([node for _, node, _ in wanted]) - set(built)
    missing = [n for n in graph.order() if n in needed and not graph.nodes[n].is_input]
    for name in missing:
        node = graph.nodes[name]
        if node.shared or node.spec.params(*analysis.inference.inputs(name)):  # type: ignore[union-attr]
            return []
    return missing


def rebuild(spec: str, outputs: list[str] | None, features_only: bool) -> BlockgraphModel:
    """The empty model that unpickling fills (see :meth:`BlockgraphModel.__reduce__`): the spec (JSON text) analysed
    and the class and ``forward`` for these outputs generated again, as at compile time, without building modules."""
    analysis = analyze_embedded(spec)
    return empty(analysis, generate(analysis.inference, outputs, features_only))


def empty(analysis: Analysis, program: Program) -> BlockgraphModel:
    """A model of a class of its own, named after the spec, whose ``forward`` is the program's; no module in it."""
    name = analysis.spec.name
    class_name = "".join(part.capitalize() for part in re.split(r"[^A-Za-z0-9]+", name) if part) or "Model"
    cls = type(class_name, (BlockgraphModel,), {"__module__": __name__, "forward": program.forward(name)})
    model = cls()
    model._attach(analysis, program)
    return model


@contextlib.contextmanager
def _sized(node: str, op: str, pos: Any) -> Iterator[None]:
    """Turn "this tensor is too large to exist" (even on the meta device) into a BudgetError naming the node."""
    try:
        yield
    except MemoryError as e:
        raise BudgetError(f"op '{op}': not enough memory to build this block", pos=pos, node=node) from e
    except RuntimeError as e:  # torch.OutOfMemoryError included
        text = str(e).lower()
        if "overflow" in text:
            what = "a parameter of this block is too large to exist"
        elif "can't allocate memory" in text or "out of memory" in text:
            what = "not enough memory for the parameters of this block"
        else:
            raise
        raise BudgetError(
            f"op '{op}': {what} ({str(e).splitlines()[0][:160]})",
            pos=pos,
            node=node,
            hint="check the widths and sizes set for this block (and the variables they use); budgets "
            "(max_params) refuse such a model before building it",
        ) from e


def _install(root: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Place modules under their dotted names; a namespace whose children are 0..n-1 becomes a ModuleList."""
    tree: dict[str, Any] = {}
    for dotted, module in modules.items():
        parts = dotted.split(".")
        here = tree
        for part in parts[:-1]:
            here = here.setdefault(part, {})
            if not isinstance(here, dict):
                raise BlockgraphError(f"module name '{dotted}' is used both as a block and as a namespace")
        here[parts[-1]] = module

    def materialize(node: Any) -> nn.Module:
        if isinstance(node, nn.Module):
            return node
        keys = list(node)
        if keys and all(k.isdigit() for k in keys) and sorted(map(int, keys)) == list(range(len(keys))):
            return nn.ModuleList(materialize(node[str(i)]) for i in range(len(keys)))
        container = Container()
        for key in keys:
            container.add_module(key, materialize(node[key]))
        return container

    for key, value in tree.items():
        root.add_module(key, materialize(value))
