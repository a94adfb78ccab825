"""The timm model API of a built model, derived from its graph, not written per family.

The classifier head is found in the graph (:func:`find_head`): the node of the ``logits`` output (or of the one
output, when it is a vector), with the nodes before it whose values are vectors read by the head alone (a global
pool, a norm, an MLP). What enters that region is what ``forward_features`` returns; ``forward_head`` runs the
region, stopping before the classifier with ``pre_logits``. The classifier is a ``classifier`` op, or the
submodules a head block names (:attr:`BlockSpec.classifiers`).

``no_weight_decay`` gathers what the blocks declare (:attr:`BlockSpec.no_weight_decay`: tokens, position
embeddings, relative-position tables, level embeddings), and ``group_matcher`` numbers the blocks in execution order
(one group per block, or per stage with ``coarse``) in timm's regex form, for its layer-wise learning-rate decay.
"""

from __future__ import annotations

import copy
import json
import re
import types
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from blockgraph.blocks.base import BuildContext
from blockgraph.errors import BlockgraphError
from blockgraph.types import TensorType

if TYPE_CHECKING:
    from blockgraph.graph.infer import Inference


@dataclass(frozen=True)
class Head:
    """A model's classifier head, as its graph has it."""

    logits: str
    """The node whose output is the logits."""
    region: tuple[str, ...]
    """The nodes of the head, in execution order (the logits node last)."""
    features: tuple[tuple[str, str | None], ...]
    """The values entering the head, as ``(node, port)``: what ``forward_features`` returns."""
    classifiers: tuple[str, ...]
    """The classifier submodules of the logits node's module (``("fc",)``); ``()``: the module is the classifier
    (a ``classifier`` op)."""
    num_classes: int
    num_features: int
    """Channels of the (first) value entering the head."""
    hidden: int
    """Channels of the pre-logits (what the classifier reads)."""


def find_head(inference: Inference) -> Head | None:
    """The classifier head of a model, or None (no ``logits`` output, or one no classifier makes)."""
    graph = inference.graph
    out = graph.outputs.get("logits")
    if out is None and len(graph.outputs) == 1:
        out = next(iter(graph.outputs.values()))
    if out is None or out.port is not None:
        return None
    logits = graph.nodes[out.node]
    spec = logits.spec
    unpooled = type(spec).is_classifier and spec.num_classes == 0  # type: ignore[union-attr]
    if not (_vector(inference.types[logits.name]) or unpooled):
        return None
    if type(spec).is_classifier:
        classifiers: tuple[str, ...] = ()
    elif spec is not None and type(spec).classifiers:
        classifiers = type(spec).classifiers
    else:
        return None
    outer = [c for c in graph.composites.values() if graph.value_of(c.name) == (logits.name, None)]
    region = {logits.name}
    if outer:  # a head made of blocks (norm_head), whose value is the logits: its parts
        region |= set(max(outer, key=lambda c: len(c.members)).members)
    stack = list(region)
    while stack:  # back through vectors that only the head reads (a pool, a norm, an MLP)
        for edge in graph.in_edges(stack.pop()):
            source = graph.nodes[edge.src]
            if source.is_input or edge.src in region or edge.out is not None:
                continue
            if _vector(inference.types[edge.src]) and all(e.dst in region for e in graph.out_edges(edge.src)):
                region.add(edge.src)
                stack.append(edge.src)
    order = tuple(name for name in graph.order() if name in region)
    entering = [(e.src, e.out) for name in order for e in graph.in_edges(name) if e.src not in region]
    features = tuple(dict.fromkeys(entering))
    first = _port(inference.types[features[0][0]], features[0][1])
    if classifiers:
        hidden = getattr(spec, "dim", None) or first.channels
    else:
        (edge,) = graph.in_edges(logits.name)
        hidden = _port(inference.types[edge.src], edge.out).channels
    return Head(logits.name, order, features, classifiers, spec.num_classes, first.channels, hidden)  # type: ignore[union-attr]


def _vector(value: Any) -> bool:
    return isinstance(value, TensorType) and value.layout == "vector"


def _port(value: Any, port: str | None) -> TensorType:
    return value if port is None else value[port]


def no_weight_decay(model: Any) -> set[str]:
    """The parameters the blocks say take no weight decay (:attr:`BlockSpec.no_weight_decay`), by full name."""
    graph = model.inference.graph
    params = dict(model.named_parameters())
    owners = [(graph.nodes[n].module_name, graph.nodes[n].spec) for n in model.nodes]
    owners += [(name, graph.shared[name].spec) for name in model.shared_modules()]
    names = set()
    for module, spec in owners:
        for pattern in type(spec).no_weight_decay:
            names |= {p for p in params if p.startswith(f"{module}.") and re.fullmatch(pattern, p[len(module) + 1 :])}
    return names


def group_matcher(model: Any, coarse: bool = False) -> dict[str, Any]:
    """timm's ``group_matcher``: ``stem`` (the blocks before the first repeated one) and ``blocks``, one regex per
    block in execution order (per stage with ``coarse``) with its ordinal; the head last. Parameters of shared
    modules go with their first user."""
    graph = model.inference.graph
    head = model._head
    units: list[list[str]] = []  # module names per group, in execution order
    keys: list[Any] = []
    seen: set[str] = set()
    for name in model.nodes:
        node = graph.nodes[name]
        if head is not None and name in head.region:
            continue
        key = node.stage if coarse and node.stage else _unit(graph, name)
        modules = [node.module_name, *(q for qs in node.shared.values() for q in ([qs] if isinstance(qs, str) else qs))]
        modules = [m for m in modules if m not in seen]
        seen.update(modules)
        if keys and keys[-1] == key:
            units[-1] += modules
        else:
            keys.append(key)
            units.append(modules)
    repeated = {n for names in graph.groups.values() for n in names}
    first = next((i for i, k in enumerate(keys) if any(n in repeated for n in _members(graph, k))), 0)
    stem = [m for unit in units[: max(first, 1)] for m in unit] if not coarse else units[0]
    rest = units[max(first, 1) :] if not coarse else units[1:]
    blocks = [(_regex(unit), (i,)) for i, unit in enumerate(rest) if unit]
    if head is not None:
        blocks.append((_regex([graph.nodes[n].module_name for n in head.region]), (99999,)))
    return {"stem": _regex(stem), "blocks": blocks}


def _unit(graph: Any, name: str) -> str:
    """The block a node belongs to: its repetition or its block made of blocks (outermost), else itself."""
    for composite in graph.composites:
        if name == composite or name.startswith(f"{composite}."):
            return composite
    return name


def _members(graph: Any, key: str) -> list[str]:
    return [n for n in graph.nodes if n == key or n.startswith(f"{key}.") or graph.nodes[n].stage == key]


def _regex(modules: list[str]) -> str:
    return "^(?:" + "|".join(re.escape(m) for m in dict.fromkeys(modules)) + r")(?:\.|$)"


def classifier_modules(model: Any) -> nn.Module | tuple[nn.Module, ...]:
    """``get_classifier()``: the classifier module, or the pair of a distilled head."""
    head = _need_head(model)
    if not head.region:  # pruned
        return nn.Identity()
    module = model.get_submodule(model.inference.graph.nodes[head.logits].module_name)
    if not head.classifiers:
        return module
    found = tuple(getattr(module, attr) for attr in head.classifiers)
    return found[0] if len(found) == 1 else found


def reset_classifier(model: Any, num_classes: int, global_pool: Any = None) -> None:
    """Replace the classifier by one for ``num_classes`` (0: none, the pre-logits features), fresh, as timm does;
    the spec the model carries (and pickles) says the new width."""
    from blockgraph.compiler.codegen import generate
    from blockgraph.layers.heads import classifier
    from blockgraph.pipeline import analyze_embedded

    head = _need_head(model)
    if not head.region:
        raise BlockgraphError("reset_classifier: the head of this model was pruned (prune_intermediate_layers)")
    if global_pool == "":
        _unpool(model, head, num_classes)
        return
    graph = model.inference.graph
    node = graph.nodes[head.logits]
    if global_pool is not None and global_pool != getattr(node.spec, "pool", global_pool):
        if global_pool not in ("token", "avg") or not hasattr(node.spec, "pool"):
            raise BlockgraphError(
                f"reset_classifier: global_pool={global_pool!r} is not a pooling op '{node.op}' has",
                node=head.logits,
                hint="`token` or `avg` for cls_head; None keeps the head's pooling",
            )
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
        raise BlockgraphError(f"reset_classifier: num_classes must be an int >= 0, got {num_classes!r}")
    data = copy.deepcopy(model.spec_data)
    entry: Any = data
    for key in node.path:
        entry = entry[key]
    entry["num_classes"] = num_classes
    if global_pool is not None and hasattr(node.spec, "pool"):
        entry["pool"] = global_pool
    if isinstance(data.get("variables"), dict) and "num_classes" in data["variables"]:
        data["variables"]["num_classes"] = num_classes
    analysis = analyze_embedded(json.dumps(data))  # as unpickling reads it
    module = model.get_submodule(node.module_name)
    reference = next(iter(model.parameters()), None)
    dd = {"device": reference.device, "dtype": reference.dtype} if reference is not None else {}
    if head.classifiers:
        for attr in head.classifiers:
            setattr(module, attr, classifier(head.hidden, num_classes, **dd))
        if global_pool is not None and hasattr(module, "pool"):
            module.pool = global_pool
    else:
        parent, _, leaf = node.module_name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, classifier(head.hidden, num_classes, **dd))
    old = model._program
    program = generate(analysis.inference, old.asked, old.features_only)
    for name, keep in old.trimmed.items():  # a head that now reads every token (avg pooling): modules built trimmed
        if program.trimmed.get(name) != keep:
            model.get_submodule(graph.nodes[name].module_name).keep = program.trimmed.get(name)
    model._attach(analysis, program)


def _unpool(model: Any, head: Head, num_classes: int) -> None:
    """``reset_classifier(0, "")``: no classifier and no global pooling, timm's pass-through: the head's global
    pool is taken out of the spec the model carries and the parts after it work on the map (a norm over the map's
    channels); a head block that pools inside (avg_pool_head) becomes a classifier of 0 classes (the identity).
    Modules keep their weights."""
    from blockgraph.compiler.codegen import generate
    from blockgraph.pipeline import analyze_embedded

    if num_classes:
        raise BlockgraphError(
            f"reset_classifier({num_classes}, ''): a classifier without pooling is not written here",
            hint="reset_classifier(0, '') for the unpooled features",
        )
    graph = model.inference.graph
    data = copy.deepcopy(model.spec_data)
    pools = [n for n in head.region if graph.nodes[n].spec.pools_globally()]  # type: ignore[union-attr]
    if pools:
        for name in head.region:  # (before the pool's entry goes: the paths are the spec's as it is)
            if type(graph.nodes[name].spec).is_classifier:
                entry_at(data, graph.nodes[name].path)["num_classes"] = 0
        pool = graph.nodes[pools[0]]
        siblings, index = entry_at(data, pool.path[:-1]), pool.path[-1]
        removed = siblings.pop(index)
        if index < len(siblings) and "from" in removed and "from" not in siblings[index]:
            siblings[index]["from"] = removed["from"]  # the next part read the pool: it reads the pool's input
    else:  # a head block that pools within: no classifier (the identity on the map)
        node = graph.nodes[head.logits]
        old = entry_at(data, node.path)
        replacement = {"name": old["name"], "op": "classifier", "num_classes": 0}
        replacement |= {"from": old["from"]} if "from" in old else {}
        entry_at(data, node.path[:-1])[node.path[-1]] = replacement
    analysis = analyze_embedded(json.dumps(data))
    program = generate(analysis.inference, model._program.asked, model._program.features_only)
    reference = next(iter(model.parameters()), None)
    dd = {"device": reference.device, "dtype": reference.dtype} if reference is not None else {}
    new_graph = analysis.graph
    for name in head.region:  # the head's modules, rebuilt for the map, with their weights
        parent, _, leaf = graph.nodes[name].module_name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        old_module = getattr(owner, leaf, None)
        if name not in new_graph.nodes:
            delattr(owner, leaf)
            continue
        node = new_graph.nodes[name]
        built = node.spec.build(BuildContext(name, **dd), *analysis.inference.inputs(name))  # type: ignore[union-attr]
        if old_module is not None and any(True for _ in built.parameters()):  # (a classifier of 0 has none)
            built.load_state_dict(old_module.state_dict())
        setattr(owner, leaf, built)
    model._attach(analysis, program)
    model.forward = types.MethodType(program.forward(model.spec.name), model)


def prune_intermediate_layers(model: Any, indices: Any, prune_norm: bool, prune_head: bool) -> list[int]:
    """timm's: drop what the intermediates at ``indices`` do not need (the blocks after the last, the head); the
    model's forward then returns the last kept intermediate (as timm's, through an identity head). Returns the
    kept indices."""
    available = intermediates(model.inference)
    take = take_indices(len(available), indices)
    last = max(take)
    if last == len(available) - 1 and not prune_head:
        return take
    _prune(model, take)
    return take


def _prune(model: Any, take: list[int], *, remove: bool = True) -> None:
    """Make ``model`` the trunk up to its intermediate ``max(take)`` (``remove``: delete the other modules)."""
    from blockgraph.compiler.codegen import features_forward

    graph = model.inference.graph
    available = intermediates(model.inference)
    _, node, port = available[max(take)]
    needed = graph.ancestors([n for _, n, _ in available[: max(take) + 1]])
    if remove:
        for name in reversed(
            [n for n in graph.order() if n not in needed and _has_module(model, _module_of(graph, n))]
        ):
            parent, _, leaf = _module_of(graph, name).rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            if leaf.isdigit():  # a repetition in a ModuleList (removed from the end: the indices before stay)
                del owner[int(leaf)]
            else:
                delattr(owner, leaf)
        users = {
            q for n in needed for qs in graph.nodes[n].shared.values() for q in ([qs] if isinstance(qs, str) else qs)
        }
        for shared in [q for q in model.shared_modules() if q not in users and _has_module(model, q)]:
            parent, _, leaf = shared.rpartition(".")
            delattr(model.get_submodule(parent) if parent else model, leaf)
    value = _port(model.inference.types[node], port)
    model.nodes = [n for n in model.nodes if n in needed]
    model._head = Head("", (), ((node, port),), (), 0, value.channels, value.channels)
    model._pruned = list(take)
    model.grad_checkpointing = False  # the forward below is the trunk's, without checkpoints
    forward = features_forward(model.inference, [(node, port)], model.spec.name, model.trimmed_tokens)
    model.forward = types.MethodType(forward, model)


def entry_at(data: Any, path: tuple[Any, ...]) -> Any:
    """The value at ``path`` (keys and list indices) of plain spec data."""
    for key in path:
        data = data[key]
    return data


def _module_of(graph: Any, name: str) -> str:
    return graph.nodes[name].module_name


def forward_head(model: Any, x: Any, pre_logits: bool = False) -> Any:
    """Run the head on what ``forward_features`` returned (a tensor, or a list for a head with several inputs)."""
    head = _need_head(model)
    if not head.region:  # pruned: an identity head
        return x
    graph = model.inference.graph
    given = list(x) if len(head.features) > 1 else [x]
    values = dict(zip(head.features, given, strict=True))
    for name in head.region:
        node = graph.nodes[name]
        edges = graph.in_edges(name)
        args = [values[e.src, e.out] for e in edges]
        if node.spec.takes_size(*model.inference.inputs(name)):  # type: ignore[union-attr]
            raise BlockgraphError(
                f"forward_head: head node '{name}' ({node.op}) needs the map size, which its input does not carry",
                node=name,
            )
        kwargs = {
            field: model.get_submodule(q) if isinstance(q, str) else tuple(model.get_submodule(s) for s in q)
            for field, q in node.shared.items()
        }
        if name == head.logits:
            if not head.classifiers and pre_logits:
                return args[0]
            if head.classifiers:
                kwargs["pre_logits"] = pre_logits
        out = model.get_submodule(node.module_name)(*args, **kwargs)
        if isinstance(out, dict):
            values.update({(name, port): v for port, v in out.items()})
        elif isinstance(out, tuple) and name != head.logits:
            ports = graph.ports(name) or ()
            values.update({(name, port): v for port, v in zip(ports, out, strict=True)})
        else:
            values[name, None] = out
    return values[head.logits, None]


def features_program(model: Any) -> Any:
    """The generated function computing what enters the head (``forward_features``), made once per analysis."""
    from blockgraph.compiler.codegen import features_forward

    cache = model.__dict__.setdefault("_api", {})
    key = ("features", id(model._analysis))
    if key not in cache:
        features = list(_need_head(model).features)
        cache[key] = features_forward(model.inference, features, model.spec.name, model.trimmed_tokens)
    return cache[key]


def intermediates(inference: Inference) -> list[tuple[str, str, str | None]]:
    """The intermediate values ``forward_intermediates`` can take, as ``(name, node, port)``: the declared feature
    maps, or, for a spec that declares none (ViT), the outputs of its longest repeated block (``blocks.0`` ...)."""
    graph = inference.graph
    if graph.features:
        return [(name, out.node, out.port) for name, out in graph.features.items()]
    groups = []
    for names in graph.groups.values():  # a repetition may be a block made of blocks: the value it gives
        values = [graph.value_of(name) for name in names]
        if all(v is not None and _gridded(_port(inference.types[v[0]], v[1])) for v in values):
            groups.append([(name, *v) for name, v in zip(names, values, strict=True)])  # type: ignore[misc]
    return max(groups, key=len, default=[])


def _gridded(value: Any) -> bool:
    return isinstance(value, TensorType) and value.grid is not None and value.layout in ("image", "tokens")


def take_indices(count: int, indices: int | list[int] | tuple[int, ...] | None) -> list[int]:
    """timm's ``feature_take_indices``: all (None), the last n (an int), or these (negative ones from the end)."""
    if indices is None:
        indices = count
    if isinstance(indices, int):
        if not 0 < indices <= count:
            raise BlockgraphError(f"indices={indices}: the last n must be between 1 and {count}")
        return list(range(count - indices, count))
    out = []
    for i in indices:
        if not -count <= i < count:
            raise BlockgraphError(f"index {i} is out of range for {count} intermediates")
        out.append(i % count)
    return out


def forward_intermediates(
    model: Any, x: Any, indices: Any, norm: bool, stop_early: bool, output_fmt: str, intermediates_only: bool
) -> Any:
    """timm's ``forward_intermediates``: the intermediates at ``indices`` (NCHW maps; a token sequence is given
    as the map of its grid tokens, extra tokens dropped; ``NLC``: tokens), and unless ``intermediates_only`` the
    final features (``forward_features``' value; with ``stop_early``, the last intermediate taken)."""
    from blockgraph.compiler.codegen import features_forward

    if output_fmt not in ("NCHW", "NLC"):
        raise BlockgraphError(f"output_fmt={output_fmt!r}: NCHW or NLC")
    if norm:
        raise BlockgraphError(
            "forward_intermediates(norm=True): the final norm is part of this model's head block",
            hint="take the intermediates unnormalized (norm=False)",
        )
    available = intermediates(model.inference)
    take = take_indices(len(available), indices)
    chosen = [available[i] for i in take]
    final = not intermediates_only and not stop_early
    if getattr(model, "_pruned", None) is not None and max(take) > max(model._pruned):
        raise BlockgraphError(f"indices {take}: this model keeps the intermediates up to {max(model._pruned)} (pruned)")
    values = [(node, port) for _, node, port in chosen] + (list(_need_head(model).features) if final else [])
    cache = model.__dict__.setdefault("_api", {})
    key = (id(model._analysis), tuple(values))
    if key not in cache:
        graph = model.inference.graph
        for name in graph.ancestors([node for node, _ in values]):
            node = graph.nodes[name]
            if not node.is_input and not _has_module(model, node.module_name):
                raise BlockgraphError(
                    f"forward_intermediates: node '{name}' was not built with this model (the outputs do not need "
                    "it and it has weights of its own)",
                    node=name,
                    hint="build the model with features_only=True for its feature maps",
                )
        values_once = list(dict.fromkeys(values))
        cache[key] = features_forward(model.inference, values_once, model.spec.name, model.trimmed_tokens)
    outputs = cache[key](model, x)
    outputs = outputs if isinstance(outputs, list) else [outputs]
    by_value = dict(zip(dict.fromkeys(values), outputs, strict=True))
    env = {"H": x.shape[-2], "W": x.shape[-1]}
    types = model.inference.types
    taken = [_formatted(by_value[n, p], _port(types[n], p), env, output_fmt) for _, n, p in chosen]
    if intermediates_only:
        return taken
    if stop_early:
        return by_value[values[-1]], taken
    features = [by_value[v] for v in _need_head(model).features]
    return (features[0] if len(features) == 1 else features), taken


def _has_module(model: Any, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _formatted(value: Any, t: TensorType, env: dict[str, int], output_fmt: str) -> Any:
    """An intermediate as ``NCHW`` (a token sequence as the map of its grid tokens) or ``NLC``."""
    if t.layout == "tokens":
        grid = value[:, t.extra :]  # [B, h*w, C]
        if output_fmt == "NLC":
            return grid
        h, w = (g.evaluate(env) for g in t.grid)  # type: ignore[union-attr]
        return grid.transpose(1, 2).reshape(value.shape[0], t.channels, h, w)
    return value.flatten(2).transpose(1, 2) if output_fmt == "NLC" else value


def pretrained_cfg(model: Any) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` (what ``timm.data.resolve_data_config(model=...)`` reads): the spec's ``data:``
    section, its input size, and from the graph the pooled map's size, the first convolution and the classifier.
    ``fixed_input_size``: the model does not take an image of half the size (ViT's position table, Swin's
    windows), so timm's tools keep the default size."""
    spec, head = model.spec, model._head
    channels, (h, w) = spec.input.channels, spec.input.size
    data = spec.data
    cfg: dict[str, Any] = {
        "architecture": spec.name,
        "input_size": (channels, h, w),
        "interpolation": data.interpolation,
        "crop_pct": data.crop_pct,
        "crop_mode": data.crop_mode,
        "mean": tuple(data.mean),
        "std": tuple(data.std),
        "num_classes": head.num_classes if head is not None else 0,
        "pool_size": None,
        "first_conv": _first_conv(model),
        "classifier": None,
        "fixed_input_size": not model.inference.acceptance.contains({"H": h // 2, "W": w // 2}),
    }  # fmt: skip
    if data.test_input_size is not None:
        cfg["test_input_size"] = (channels, *data.test_input_size)
    if head is not None:
        node, port = head.features[0]
        value = _port(model.inference.types[node], port)
        if value.grid is not None and value.extra == 0:
            cfg["pool_size"] = tuple(g.evaluate({"H": h, "W": w}) for g in value.grid)
        module = model.inference.graph.nodes[head.logits].module_name
        names = tuple(f"{module}.{attr}" for attr in head.classifiers) or (module,)
        cfg["classifier"] = names[0] if len(names) == 1 else names
    return cfg


def _first_conv(model: Any) -> str | None:
    """The first convolution the image meets: of the first node (in execution order) that reads an input."""
    graph = model.inference.graph
    for name in model.nodes:
        if any(graph.nodes[e.src].is_input for e in graph.in_edges(name)):
            module_name = graph.nodes[name].module_name
            for sub, module in model.get_submodule(module_name).named_modules():
                if isinstance(module, nn.Conv2d):
                    return f"{module_name}.{sub}" if sub else module_name
    return None


def _need_head(model: Any) -> Head:
    head = model._head
    if head is None:
        raise BlockgraphError(
            f"'{model.spec.name}' has no classifier head: no `logits` output made by a `classifier` op or a head "
            "block (cls_head, avg_pool_head, ...)",
            hint="declare `outputs: {logits: NODE}` where NODE is a head block or a `classifier`",
        )
    return head
