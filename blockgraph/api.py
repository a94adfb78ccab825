"""The public Python API: validate, build, create and list models, load timm weights.

``validate`` and everything before compilation never import torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from blockgraph.compiler import budget
from blockgraph.errors import BlockgraphError, Pos, SpecError, WeightsError
from blockgraph.pipeline import Analysis, SpecLike, analyze
from blockgraph.spec.references import list_models, spec_path
from blockgraph.spec.schema import ModelBase
from blockgraph.types import describe_value, sizes_text

if TYPE_CHECKING:
    from torch import nn


__all__ = [
    "Analysis",
    "analyze",
    "build_model",
    "create_model",
    "list_models",
    "load",
    "load_timm_state_dict",
    "validate",
]


@dataclass
class Report:
    """What :func:`validate` found: the model's nodes and their static types, and the accepted input sizes."""

    name: str
    variant: str | None
    input: tuple[int, int, int]
    """The checked input (C, H, W): the one asked for, or the spec's default size."""
    nodes: list[dict[str, Any]]
    accepted: list[str]
    """The accepted input sizes, as simple constraints (``H >= 32``)."""
    outputs: dict[str, str]
    params: int = 0
    """The parameter count, from the blocks' counting rules."""
    activation_bytes: int = 0
    """The bytes of every node's output for one forward of one input at ``input`` (float32)."""
    warnings: list[BlockgraphError] = field(default_factory=list)
    analysis: Analysis | None = field(default=None, repr=False)
    inputs: dict[str, str] = field(default_factory=dict)
    """Each model input's shape at ``input`` (batch 1): ``{"image": "1x3x224x224", "mask": "1x224x224 bool,
    optional"}``."""

    def format(self) -> str:
        c, h, w = self.input
        lines = [f"{self.name}: valid ({len(self.nodes)} nodes)"]
        if len(self.inputs) > 1:
            lines.append("inputs: " + ", ".join(f"{k} {v}" for k, v in self.inputs.items()))
        lines.append(f"accepts: {sizes_text(self.accepted)}")
        lines.append(f"checked at input {c}x{h}x{w}: " + ", ".join(f"{k} {v}" for k, v in self.outputs.items()))
        lines.append(f"parameters: {self.params:,}; activations: {self.activation_bytes / 2**20:,.1f} MiB per input")
        lines += [w.format() for w in self.warnings]
        return "\n".join(lines)


def validate(
    spec: SpecLike,
    *,
    input_size: Sequence[int] | None = None,
    variant: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    max_params: float | None = budget.DEFAULT_MAX_PARAMS,
    max_activation_bytes: float | None = None,
    batch: int = 1,
    root: str | os.PathLike[str] | None = None,
) -> Report:
    """Check a spec statically (no torch import), at ``input_size`` (``(C, H, W)`` or ``(H, W)``) or its default,
    including its budgets: at most ``max_params`` parameters and ``max_activation_bytes`` bytes of node outputs for
    a batch of ``batch`` (``None``: no limit), so that a spec that validates also builds. ``root``: a directory
    outside which no file is read (see :func:`analyze`), for specs sent by others.

    Raises:
        BlockgraphError: the spec is invalid, the model cannot take ``input_size``, or it is over budget
            (:class:`BudgetError`); the error says where and why.
    """
    analysis = analyze(spec, variant=variant, overrides=overrides, root=root)
    model = analysis.spec
    c, h, w = _input_triplet(input_size, model)
    analysis.inference.check(h, w, channels=c)
    price = budget.check(
        analysis.inference, (h, w), max_params=max_params, max_activation_bytes=max_activation_bytes, batch=batch
    )
    env = {"H": h, "W": w}
    nodes = []
    for node in analysis.graph:
        text, shape = describe_value(analysis.inference.types[node.name], env)
        nodes.append({"name": node.name, "op": node.op, "type": text, "shape": shape})
    graph = analysis.graph
    outputs = {
        k: "x".join(map(str, analysis.output(k).shape(env, batch=1))) for k in {**graph.outputs, **graph.features}
    }
    return Report(
        model.name,
        model.variant,
        (c, h, w),
        nodes,
        analysis.inference.acceptance.describe(),
        outputs,
        price.params,
        price.activation_bytes // batch,
        list(graph.warnings),
        analysis,
        {
            name: f"1x{h}x{w} bool" + (", optional" if given.optional else "")
            if given.kind == "mask"
            else f"1x{given.channels}x{h}x{w}"
            for name, given in model.input_specs().items()
        },
    )


def _input_triplet(size: Sequence[int] | None, model: ModelBase) -> tuple[int, int, int]:
    if size is None:
        return (model.input.channels, *model.input.size)
    size = tuple(int(s) for s in size)
    if len(size) == 2:
        return (model.input.channels, *size)
    if len(size) == 3:
        return size  # type: ignore[return-value]
    raise SpecError(f"input size {list(size)} must be (C, H, W) or (H, W)", pos=Pos("<input>"))


def build_model(
    spec: SpecLike | Analysis,
    *,
    variant: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    num_classes: int | None = None,
    features_only: bool = False,
    out_indices: int | Sequence[int] | None = None,
    outputs: Sequence[str] | None = None,
    device: Any = None,
    dtype: Any = None,
    max_params: float | None = budget.DEFAULT_MAX_PARAMS,
    root: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """Build the ``nn.Module`` a spec describes.

    The module carries ``.spec``, ``.feature_info``, ``.summary()`` and ``.code`` (its generated forward).
    ``forward`` returns the one output as a tensor, the features as a list (``features_only``), or a dict when
    ``outputs`` names several. A model over ``max_params`` parameters is refused before any memory is allocated
    (counted statically, from the blocks' counting rules); ``None`` skips the check.

    Args:
        spec: a spec (see :func:`analyze`), or the :class:`Analysis` of one (of :func:`analyze`, or a
            :func:`validate` report's): it is not analysed again, and its variant and overrides are those it was
            made with.
        num_classes: the classifier's width (the spec's ``num_classes`` variable).
        features_only: return the declared feature maps, as a list, in declaration order.
        out_indices: with ``features_only``, which feature maps (timm style): indices into the declared features
            (negative ones count from the end), or an int ``n`` for the last ``n``. They are returned in
            declaration order.
        outputs: names of the outputs (or, with ``features_only``, of the features) to return.
        root: a directory outside which no file is read (see :func:`analyze`), for specs sent by others.

    Raises:
        SpecError: ``variant``, ``overrides``, ``num_classes`` or ``root`` given with an :class:`Analysis`.
    """
    from blockgraph.compiler.model import compile_model

    analysis = spec
    if not isinstance(analysis, Analysis):
        analysis = analyze(analysis, variant=variant, overrides=overrides, num_classes=num_classes, root=root)
    elif variant is not None or overrides or num_classes is not None or root is not None:
        raise SpecError("variant, overrides, num_classes and root apply to a spec, not to its analysis")
    if out_indices is not None:
        outputs = _feature_names(analysis, out_indices, features_only, outputs)
    device = _device(device)
    if max_params is not None and str(device) != "meta":  # refuse a huge model before allocating it
        budget.check(analysis.inference, tuple(analysis.spec.input.size), max_params=max_params)
    return compile_model(analysis, outputs=outputs, features_only=features_only, device=device, dtype=dtype)


def _feature_names(
    analysis: Analysis, out_indices: int | Sequence[int], features_only: bool, outputs: Sequence[str] | None
) -> list[str]:
    """The feature names ``out_indices`` selects, in declaration order."""
    graph = analysis.graph
    where = graph.pos(("features",))
    names = list(graph.features)
    if not features_only or outputs:
        raise SpecError(
            "out_indices selects feature maps: it needs features_only=True" + (" and no outputs" if outputs else ""),
            pos=where,
            hint=f"e.g. features_only=True, out_indices=(1, 2, 3); the features: {', '.join(names) or 'none'}",
        )
    n = len(names)
    listed = ", ".join(f"{i}: {name}" for i, name in enumerate(names))
    if isinstance(out_indices, bool) or not isinstance(out_indices, int | Sequence):
        raise SpecError(f"out_indices must be an int or a sequence of ints, got {out_indices!r}", pos=where)
    if isinstance(out_indices, int):
        if not 1 <= out_indices <= n:
            raise SpecError(
                f"out_indices={out_indices} asks for the last {out_indices} of {n} feature maps",
                pos=where,
                hint=f"use 1..{n}, or a list of indices ({listed})",
            )
        indices = list(range(n - out_indices, n))
    else:
        indices = []
        for i in out_indices:
            if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n:
                raise SpecError(
                    f"out_indices: {i!r} is out of range for {n} feature maps",
                    pos=where,
                    hint=f"indices go from {-n} to {n - 1} ({listed})",
                )
            if i % n in indices:
                raise SpecError(f"out_indices: feature {i % n} ({names[i % n]}) is selected twice", pos=where)
            indices.append(i % n)
        if not indices:
            raise SpecError("out_indices is empty", pos=where, hint=f"select at least one of: {listed}")
    return [names[i] for i in sorted(indices)]


def _device(device: Any) -> Any:
    """``device`` as a ``torch.device`` (None stays None), refused clearly when torch does not know it or this
    machine does not have it (no CUDA build, no GPU)."""
    import torch

    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise SpecError(
            f"unknown device {str(device)[:40]!r}",
            pos=Pos("<arguments>"),
            hint="e.g. cpu, cuda, cuda:1, mps or meta (--device)",
        ) from e
    module = getattr(torch, parsed.type, None)
    available = getattr(module, "is_available", None)
    if callable(available) and not available():
        raise SpecError(
            f"device {str(device)[:40]!r} is not available on this machine",
            pos=Pos("<arguments>"),
            hint=f"torch {torch.__version__} sees no {parsed.type} device here; build on cpu (or meta)",
        )
    if parsed.index is not None and callable(getattr(module, "device_count", None)):
        if parsed.index >= module.device_count():
            raise SpecError(
                f"device {str(device)[:40]!r} does not exist: this machine has {module.device_count()}",
                pos=Pos("<arguments>"),
                hint=f"use {parsed.type}:0 ... {parsed.type}:{module.device_count() - 1}",
            )
    return parsed


_BUILD_KEYWORDS = ("variant", "overrides", "outputs", "device", "dtype", "max_params")
_TIMM_KEYWORDS = ("in_chans", "drop_rate", "drop_path_rate", "global_pool", "pretrained_cfg", "pretrained_cfg_overlay",
                  "feature_cls", "scriptable", "exportable", "no_jit", "cache_dir", "drop_block_rate", "bn_momentum",
                  "bn_eps")  # fmt: skip


def create_model(
    name: str,
    pretrained: bool = False,
    *,
    num_classes: int | None = None,
    features_only: bool = False,
    out_indices: int | Sequence[int] | None = None,
    checkpoint_path: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a reference model by name, timm style (``create_model("coat_lite_small", num_classes=10)``).

    blockgraph never downloads: ``pretrained=True`` loads the weights from ``checkpoint_path``, and without one
    raises a :class:`WeightsError`. ``checkpoint_path`` (with or without ``pretrained``) may be a blockgraph
    checkpoint (``blockgraph build --out``), a state_dict in our key layout, or the timm twin's state_dict
    (``torch.save(timm_model.state_dict(), path)``), whose keys go through the spec's ``twin.rename`` rules. Given a
    ``num_classes`` other than the file's, the classifier's tensors that differ in it are skipped (they keep their
    fresh initialization; a UserWarning names them), as timm does; any other mismatch is an error. With
    ``features_only``, the file's classifier is dropped.

    Args:
        name: a reference spec (see :func:`list_models`).
        pretrained: load weights (from ``checkpoint_path``: there are no bundled weights).
        num_classes: the classifier's width.
        features_only, out_indices: return feature maps (see :func:`build_model`).
        checkpoint_path: the weights file (``""``, timm's default, is none).
        **kwargs: :func:`build_model`'s ``variant``, ``overrides``, ``outputs``, ``device``, ``dtype``,
            ``max_params``; and timm's keywords: ``in_chans`` (the image's channels), ``drop_path_rate`` (the spec's
            ``drop_path`` variable), ``drop_rate`` and ``global_pool`` (the head's dropout and pooling). A keyword
            given as ``None`` is ignored, as timm does; ``scriptable``, ``exportable``, ``no_jit``, ``cache_dir``
            and ``feature_cls`` (``None``/``getter``) change nothing here.

    Raises:
        SpecError: no reference spec has this name, or a keyword this spec cannot honour.
        TypeError: an unknown keyword (the message names the accepted ones).
        WeightsError: ``pretrained`` without ``checkpoint_path``, or weights that do not fit.
    """
    path = spec_path(name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    checkpoint_path = checkpoint_path or None
    unknown = sorted(set(kwargs) - {*_BUILD_KEYWORDS, *_TIMM_KEYWORDS})
    if unknown:
        accepted = ", ".join(["num_classes", "features_only", "out_indices", "checkpoint_path", *_BUILD_KEYWORDS,
                              *_TIMM_KEYWORDS])  # fmt: skip
        raise TypeError(f"create_model() got unexpected keyword(s) {', '.join(unknown)}; it takes: {accepted}")
    unpooled = kwargs.get("global_pool") == ""  # timm's pass-through head: made after the build
    if unpooled:
        del kwargs["global_pool"]
    kwargs = _timm_keywords(name, path, kwargs)
    if pretrained and checkpoint_path is None:
        twin = analyze(path, variant=kwargs.get("variant")).spec.twin
        timm_name = twin.timm if twin is not None and twin.timm else None
        example = (
            f"; or the timm twin's: torch.save(timm.create_model({timm_name!r}, pretrained=True).state_dict(), "
            f"'{timm_name}.pth')"
            if timm_name
            else ""
        )
        raise WeightsError(
            f"'{name}': blockgraph bundles no pretrained weights and never downloads them; pass "
            "checkpoint_path=... with pretrained=True",
            pos=Pos(str(path)),
            hint=f"a blockgraph checkpoint (`blockgraph build {path} --out {name}.pt`){example}",
        )
    model = build_model(path, num_classes=num_classes, features_only=features_only, out_indices=out_indices, **kwargs)
    if checkpoint_path is not None:
        from blockgraph.compiler.weights import load_weights_file

        resized = num_classes is not None or "num_classes" in (kwargs.get("overrides") or {})
        load_weights_file(model, os.fspath(checkpoint_path), resized_classifier=resized)
    if unpooled:  # after the weights: the file's head is the pooled one
        model.reset_classifier(num_classes or 0, "")
    return model


def _timm_keywords(name: str, path: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """timm's ``create_model`` keywords turned into overrides of the spec (``build_model``'s keywords kept)."""
    overrides = dict(kwargs.pop("overrides", None) or {})
    knobs = {"in_chans", "drop_path_rate", "drop_rate", "global_pool"} & set(kwargs)
    analysis = analyze(path, variant=kwargs.get("variant")) if knobs else None  # only when a knob must be found
    model = analysis.spec if analysis is not None else None

    def refuse(keyword: str, value: Any, why: str) -> None:
        raise SpecError(f"create_model({name!r}, {keyword}={value!r}): {why}", pos=Pos(str(path)))

    if (chans := kwargs.pop("in_chans", None)) is not None and model is not None:
        overrides[f"inputs.{model.input.name}.channels" if model.inputs else "input.channels"] = chans
    if (rate := kwargs.pop("drop_path_rate", None)) is not None and model is not None:
        if "drop_path" in model.variables:
            overrides["drop_path"] = rate
        elif rate != 0:  # 0 (no stochastic depth) is what a spec without the variable does already
            refuse("drop_path_rate", rate, "the spec has no `drop_path` variable to set")
    head = _head_node(analysis) if analysis is not None else None
    for keyword, field_name in (("drop_rate", "drop"), ("global_pool", "pool")):
        if (value := kwargs.pop(keyword, None)) is None:
            continue
        place = _head_knob(analysis, head, field_name, keyword) if head is not None else None
        if place is None:
            if keyword == "drop_rate" and value == 0:  # train.py's default: nothing to do
                continue
            refuse(keyword, value, f"its head has no `{field_name}` to set")
        overrides[place] = value
    for keyword in ("pretrained_cfg", "pretrained_cfg_overlay"):
        if value := kwargs.pop(keyword, None):
            refuse(keyword, value, "blockgraph takes no pretrained configuration (a spec's data preprocessing is "
                   "its own)")  # fmt: skip
    if (feature_cls := kwargs.pop("feature_cls", "getter")) not in ("getter", "hook"):
        refuse("feature_cls", feature_cls, "features come from the graph (`features_only=True`)")
    for keyword in ("drop_block_rate", "bn_momentum", "bn_eps"):
        if (value := kwargs.pop(keyword, None)) is not None:
            refuse(keyword, value, "no block of a blockgraph spec reads it (set the fields of the spec's blocks)")
    for keyword in ("scriptable", "exportable", "no_jit", "cache_dir"):
        kwargs.pop(keyword, None)
    return {**kwargs, "overrides": overrides} if overrides else kwargs


def _head_node(analysis: Analysis) -> Any:
    """The graph node of the classifier head (the ``logits`` output's), or None."""
    out = analysis.graph.outputs.get("logits")
    return analysis.graph.nodes[out.node] if out is not None else None


def _head_knob(analysis: Any, head: Any, field_name: str, keyword: str) -> str | None:
    """The dotted path of the head's ``field_name`` (``drop``, ``pool``): a field of the head block, a parameter of
    the head made of blocks (norm_head's ``drop``), or, for ``drop_rate``, the rate of a dropout that only the
    classifier reads (PVT-v2's ``head_drop``); None if the head has none."""
    graph = analysis.graph
    if field_name in type(head.spec).model_fields:
        return _dotted(analysis, head.path) + f".{field_name}"
    for composite in graph.composites.values():
        if graph.value_of(composite.name) == (head.name, None) and field_name in composite.spec.args:
            return _dotted(analysis, composite.path) + f".{field_name}"
    edges = graph.in_edges(head.name)
    source = graph.nodes[edges[0].src] if len(edges) == 1 else None
    rate = type(source.spec).dropout_rate_field if source is not None and source.spec is not None else None
    if keyword == "drop_rate" and rate is not None:
        return _dotted(analysis, source.path) + f".{rate}"  # type: ignore[union-attr]
    return None


def _dotted(analysis: Analysis, path: tuple[Any, ...]) -> str:
    """A place in the expanded spec as a dotted path of keys and item names (``blocks.head``)."""
    data: Any = analysis.expanded.data
    parts = []
    for key in path:
        data = data[key]
        parts.append(data["name"] if isinstance(key, int) else key)
    return ".".join(parts)


def load_timm_state_dict(model: nn.Module, state_dict: Mapping[str, Any]) -> nn.Module:
    """Load a timm twin's weights into a built model, strictly, through the spec's rename rules."""
    from blockgraph.compiler.weights import load_timm_state_dict as load

    return load(model, state_dict)


def load(
    path: str | os.PathLike[str], *, device: Any = None, max_params: float | None = budget.DEFAULT_MAX_PARAMS
) -> nn.Module:
    """Rebuild a model from a checkpoint written by ``blockgraph build --out`` (the spec is embedded; the sha256 of
    the spec and of every tensor are checked; weights load strictly with ``weights_only=True``; a spec over
    ``max_params`` parameters is refused before anything is allocated)."""
    from blockgraph.compiler.checkpoint import load as load_checkpoint

    return load_checkpoint(path, device=device, max_params=max_params)
