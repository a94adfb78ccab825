"""Generate a compiled model's ``forward``: Python source, one line per node, no interpretation loop, readable via
``model.code`` (like ``torch.fx``'s ``GraphModule.code``). Deterministic in the inference and the outputs asked for,
and torch-free: unpickling regenerates it without building any module (:func:`blockgraph.compiler.model.rebuild`).
"""

from __future__ import annotations

import keyword
import linecache
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import count
from typing import Any, Optional  # (Optional: TorchScript reads the name in generated code)

from blockgraph.errors import BlockgraphError
from blockgraph.graph.infer import Inference
from blockgraph.types import Expr, TensorType

_counter = count()


@dataclass(frozen=True)
class Program:
    """A model's generated ``forward`` and what it computes."""

    asked: list[str] | None
    """The outputs asked for (``None``: the spec's default ones)."""
    features_only: bool
    chosen: list[tuple[str, str, str | None]]
    """The outputs computed, as ``(name, node, port)``."""
    returns: str
    """How ``forward`` returns them: ``"tensor"``, ``"list"`` (features) or ``"dict"``."""
    order: list[str]
    """The nodes the outputs need, in execution order (the input included)."""
    trimmed: dict[str, int]
    """The nodes that compute only their first k tokens (see :func:`trimmed_tokens`)."""
    code: str

    def forward(self, name: str) -> Callable[..., Any]:
        """The function :attr:`code` defines; tracebacks show its lines (it is registered in ``linecache``)."""
        filename = f"<blockgraph {name} #{next(_counter)}>"
        linecache.cache[filename] = (len(self.code), None, self.code.splitlines(keepends=True), filename)
        import torch  # the code compares dtypes (torch.bool); only a built model's class needs it
        from torch.fx._symbolic_trace import is_fx_symbolic_tracing as is_fx_tracing

        from blockgraph.layers.common import checkpointed
        from blockgraph.layers.primitives import residual_add

        namespace: dict[str, Any] = {
            "torch": torch, "checkpointed": checkpointed, "residual_add": residual_add, "is_fx_tracing": is_fx_tracing,
            "Optional": Optional,
        }  # fmt: skip
        exec(compile(self.code, filename, "exec"), namespace)  # noqa: S102 (our generated code: identifiers only)
        return namespace["forward"]


def generate(
    inference: Inference, outputs: Sequence[str] | None = None, features_only: bool = False, checkpoint: bool = False
) -> Program:
    """The forward computing ``outputs`` (see :func:`select_outputs`, which raises a BlockgraphError for an unknown
    one): only the nodes they need, each value released after its last reader. With ``checkpoint``, each node's
    call goes through activation checkpointing while gradients are recorded (``set_grad_checkpointing``)."""
    chosen, returns = select_outputs(inference, outputs, features_only)
    return _program(inference, chosen, returns, list(outputs) if outputs else None, features_only, checkpoint)


def features_forward(
    inference: Inference, values: list[tuple[str, str | None]], name: str, built_trimmed: dict[str, int]
) -> Callable[..., Any]:
    """The function computing ``values`` (``(node, port)``: what enters the head, for ``forward_features``): a
    tensor for one value, a list for several. ``built_trimmed``: the nodes whose modules the model built to compute
    their first tokens only; those this function needs whole are called with ``full=True``."""
    chosen = [(f"{node}.{port}" if port else node, node, port) for node, port in values]
    returns = "tensor" if len(chosen) == 1 else "list"
    program = _program(inference, chosen, returns, None, False, False, built_trimmed)
    return program.forward(f"{name}.forward_features")


def script_program(inference: Inference, program: Program, packs: set[str]) -> Program:
    """``program`` written for TorchScript (``torch.jit.script`` of a model's script view, compiler/script.py):
    typed arguments, the input checks raising a ``ValueError`` with the accepted sizes (no Python method to call),
    shared modules not passed (the view attaches each to its users), and the inputs of the nodes in ``packs`` (joints
    of any number of inputs) passed as one list."""
    code = _generate(inference, program.order, program.chosen, program.returns, program.trimmed, script=packs)
    return Program(program.asked, program.features_only, program.chosen, program.returns, program.order,
                   program.trimmed, code)  # fmt: skip


def _program(
    inference: Inference,
    chosen: list[tuple[str, str, str | None]],
    returns: str,
    asked: list[str] | None,
    features_only: bool,
    checkpoint: bool,
    built_trimmed: dict[str, int] | None = None,
) -> Program:
    """The program for ``chosen``; ``built_trimmed``: how the model's modules were built (their trimmed tokens),
    when they were built for another program: a node this one needs whole is called with ``full=True``."""
    needed = inference.graph.ancestors([node for _, node, _ in chosen])
    order = [name for name in inference.graph.order() if name in needed]
    trimmed = trimmed_tokens(inference, order, chosen)
    whole = {n for n, keep in (built_trimmed or {}).items() if trimmed.get(n) != keep}
    code = _generate(inference, order, chosen, returns, trimmed, checkpoint, whole)
    return Program(asked, features_only, chosen, returns, order, trimmed, code)


def select_outputs(
    inference: Inference, outputs: Sequence[str] | None, features_only: bool
) -> tuple[list[tuple[str, str, str | None]], str]:
    """The outputs to compute as ``(name, node, port)``, and how forward returns them (tensor, list or dict).

    ``features_only``: the feature maps named by ``outputs`` (all declared ones by default), returned as a list.
    """
    graph = inference.graph
    if features_only and not graph.features:
        raise BlockgraphError(
            "features_only asked for, but the spec declares no `features:`",
            pos=graph.pos(()),
            hint="declare the feature maps under `features:` with their strides",
        )
    table = graph.features if features_only else {**graph.features, **graph.outputs}
    default = graph.spec.default_outputs or list(graph.outputs) or list(graph.features)
    names = list(outputs) if outputs else list(graph.features) if features_only else default
    if unknown := [n for n in names if n not in table]:
        raise BlockgraphError(
            f"unknown {'feature' if features_only else 'output'}(s): {', '.join(unknown)}",
            pos=graph.pos(()),
            hint=f"declared: {', '.join(table)}",
        )
    if not names:  # nothing declared: the last block's output, as nn.Sequential
        last = max((n for n in graph.nodes.values() if not n.is_input), key=lambda n: n.index, default=None)
        if last is None:
            raise BlockgraphError("the spec has no blocks", pos=graph.pos(()), hint="add `stages:` or `blocks:`")
        ports = graph.ports(last.name)
        if ports:
            return [(p, last.name, p) for p in ports], "dict"
        return [("output", last.name, None)], "tensor"
    chosen = [(n, table[n].node, table[n].port) for n in names]
    return chosen, "list" if features_only else "tensor" if len(chosen) == 1 and not outputs else "dict"


def trimmed_tokens(inference: Inference, order: list[str], chosen: list[tuple[str, str, str | None]]) -> dict[str, int]:
    """The nodes that compute only their first k tokens, with k: those whose block ``trims_tokens`` and whose every
    reader reads at most k leading tokens, all of them extra tokens (cls, distillation), and that are not returned.

    It is dead-code elimination on tokens: ViT's head reads the cls token alone, so the last block needs the keys
    and values of every token but queries, projection and MLP for the cls token only (about 5/6 of its work).
    """
    graph = inference.graph
    needed = set(order)
    returned = {node for _, node, _ in chosen}
    trimmed = {}
    for name in order:
        node = graph.nodes[name]
        t = inference.types[name]
        if node.is_input or name in returned or not type(node.spec).trims_tokens or not isinstance(t, TensorType):
            continue
        if node.module is not None:  # a part of a `use`: its module serves other uses, which may read every token
            continue
        readers = [e.dst for e in graph.out_edges(name) if e.dst in needed]
        wants = [_reads(inference, reader, t) for reader in readers]
        if readers and None not in wants and max(wants) <= t.extra:  # type: ignore[type-var]
            trimmed[name] = max(wants)  # type: ignore[type-var]
    return trimmed


def _reads(inference: Inference, reader: str, t: TensorType) -> int | None:
    """How many leading tokens of ``t`` the node ``reader`` reads, if that is its only input (else None: all)."""
    graph = inference.graph
    if len(graph.in_edges(reader)) != 1:
        return None
    return graph.nodes[reader].spec.reads_tokens(t)  # type: ignore[union-attr]


class _Names:
    def __init__(self, reserved: set[str]):
        self.used = set(reserved)

    def __call__(self, wanted: str) -> str:
        base = re.sub(r"\W", "_", wanted)
        if not base or base[0].isdigit() or keyword.iskeyword(base):
            base = f"v_{base}"
        name, i = base, 1
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name


def _generate(
    inference: Inference,
    order: list[str],
    chosen: list[tuple[str, str, str | None]],
    returns: str,
    trimmed: dict[str, int],
    checkpoint: bool = False,
    whole: set[str] | frozenset[str] = frozenset(),
    script: set[str] | None = None,
) -> str:
    graph = inference.graph
    spec = graph.spec
    names = _Names({"self", "H", "W", "torch", "checkpointed", "residual_add", "is_fx_tracing", "Optional"})
    var: dict[str, str] = {}
    image = names(spec.input.name)
    var[spec.input.name] = image
    masks = [m for m in spec.input_specs().values() if m.kind == "mask"]
    params = [image if script is None else f"{image}: torch.Tensor"]
    for mask in masks:
        var[mask.name] = names(mask.name)
        typed = var[mask.name] if script is None else f"{var[mask.name]}: Optional[torch.Tensor]"
        params.append(f"{typed}=None" if mask.optional else typed)
    lines = [
        f"def forward(self, {', '.join(params)}):",
        f"    H, W = {image}.shape[-2], {image}.shape[-1]",
    ]
    checks = _acceptance_code(inference, image)
    if script is None:  # a symbolic trace (torch.fx) has no sizes to check: the checks are skipped while tracing
        lines.append(f"    if not is_fx_tracing() and ({checks}):")
        lines.append(f"        self._reject({image})")
    else:
        accepted = "; ".join(inference.acceptance.describe()) or "any H, W"
        takes = f"'{spec.name}' takes images [B, {spec.input.channels}, H, W] with {accepted}"
        lines.append(f"    if {checks}:")
        lines.append(f"        raise ValueError({takes + ', got shape '!r} + str({image}.shape))")
    for mask in masks:  # [B, H, W] booleans, B and (H, W) the image's
        m = var[mask.name]
        bad = f"{m}.shape != [{image}.shape[0], H, W] or {m}.dtype != torch.bool or {m}.device != {image}.device"
        if script is None:
            bad = bad.replace(f"[{image}.shape[0], H, W]", f"({image}.shape[0], H, W)")
        present = f"{m} is not None and ({bad})" if mask.optional else f"({bad})"
        lines.append(f"    if {'not is_fx_tracing() and ' if script is None else ''}{present}:")
        if script is None:
            lines.append(f"        self._reject_mask({mask.name!r}, {m}, {image})")
        else:
            lines.append(
                f"        raise ValueError({f'the mask {mask.name!r} must be booleans [B, H, W] as the image'!r})"
            )
    if spec.input.memory_format == "channels_last":  # (a no-op for an image already in channels-last memory)
        lines.append(f"    {image} = {image}.contiguous(memory_format=torch.channels_last)")
    elif spec.input.memory_format in ("channels_last_training", "auto"):
        lines.append("    if self.training:")
        lines.append(f"        {image} = {image}.contiguous(memory_format=torch.channels_last)")
        if spec.input.memory_format == "auto" and script is None:  # (TorchScript: the image as given)
            lines.append("    else:")
            lines.append(f"        {image} = self._measured_layout({image})")
    single = _batch_stat_code(inference, order)
    if single:
        always = "" if single == "True" else f" and ({single})"  # a BatchNorm of a vector: any batch of one
        if script is None:
            lines.append(f"    if self.training and not is_fx_tracing() and {image}.shape[0] == 1{always}:")
            lines.append(f"        self._reject_single({image})")
        else:
            lines.append(f"    if self.training and {image}.shape[0] == 1{always}:")
            lines.append(
                "        raise ValueError('in training, a batch of one image leaves a BatchNorm one value per "
                "channel: train with a batch of 2 or more')"
            )
    sizes: dict[str, str] = {}
    ports: dict[tuple[str, str], str] = {}
    # Each value is dropped (`del`) right after its last reader, as torch.fx does, so that a forward holds only the
    # activations still needed: peak memory is that of hand-written code, not the sum of every node's output.
    last_read: dict[tuple[str, str | None], int] = {}
    for i, name in enumerate(order):
        for e in graph.in_edges(name):
            last_read[e.src, e.out] = i
    kept = {(n, p) for _, n, p in chosen} | {(name, None) for name in spec.input_specs()}

    def ref(node: str, port: str | None) -> str:
        return var[node] if port is None else ports[node, port]

    def arguments(name: str, edges: list[Any]) -> list[str]:
        node = graph.nodes[name]
        args = [ref(e.src, e.out) for e in edges]
        if node.spec.takes_size(*inference.inputs(name)):
            for t in inference.inputs(name):
                grid = t.grid
                key = f"({_py(grid[0])}, {_py(grid[1])})"
                if key not in sizes:
                    sizes[key] = names(f"size_{len(sizes) + 1}")
                    lines.append(f"    {sizes[key]} = {key}")
                args.append(sizes[key])
        if script is not None and name in script:  # a joint of any number of inputs takes them (and sizes) as lists
            n = len(edges)
            args = [f"[{', '.join(args[:n])}]"] + ([f"[{', '.join(args[n:])}]"] if args[n:] else [])
        for field, q in node.shared.items() if script is None else ():  # (a script view attaches them)
            value = module_ref(q) if isinstance(q, str) else "(" + ", ".join(module_ref(x) for x in q) + ",)"
            args.append(f"{field}={value}")
        if name in whole:  # its module was built to compute its first tokens only: all of them, here
            args.append("full=True")
        return args

    fused = {} if checkpoint or script is not None else fused_activations(inference, order, kept, {*trimmed, *whole})
    producer_of = {act: producer for producer, act in fused.items()}
    branches = {} if checkpoint or script is not None else fused_residuals(inference, order, kept, {*trimmed, *whole})
    # (no node is in both: a branch's layer is read by a branch module or the add, never by an activation)
    in_branch = {n for b in branches.values() for n in (b.layer, *b.modules)}
    # A container that two or more calls reach through gets a local name at its first use (`m_stage0_blocks_0 =
    # m_stage0_blocks[0]`): each call then costs one attribute lookup, not a walk from `self` through every level
    # (nn.Module.__getattr__, ModuleList indexing): about 4 us per block in Python. Not in TorchScript's program.
    reaches: Counter[str] = Counter()
    if script is None:
        for path in _module_paths(graph, order):
            parts = path.split(".")
            reaches.update(".".join(parts[:k]) for k in range(1, len(parts)))
    local: dict[str, str] = {}

    def module_ref(dotted: str) -> str:
        """Python code reaching a submodule (``stage1.blocks.0`` → ``self.stage1.blocks[0]``) through the local
        names of its containers (each defined at its first use)."""
        parts = dotted.split(".")
        code = "self"
        for k, part in enumerate(parts):
            code += f"[{part}]" if part.isdigit() else f".{part}"
            prefix = ".".join(parts[: k + 1])
            if k < len(parts) - 1 and reaches[prefix] >= 2:
                if prefix not in local:
                    local[prefix] = names(f"m.{prefix}")
                    lines.append(f"    {local[prefix]} = {code}")
                code = local[prefix]
        return code

    for i, name in enumerate(order):
        node = graph.nodes[name]
        if node.is_input or name in fused or name in in_branch:  # (called by their activation's or add's line)
            continue
        edges = graph.in_edges(name)
        module = module_ref(node.module_name)
        if name in branches:  # the residual branch's layer, its modules and this add, in one call
            b = branches[name]
            residual = next(e for e in edges if e.src != b.end)
            edges = [*graph.in_edges(b.layer), residual]
            chain = [module_ref(graph.nodes[n].module_name) for n in b.modules]
            branch = f"({', '.join(chain)}{',' if len(chain) == 1 else ''})"
            layer = module_ref(graph.nodes[b.layer].module_name)
            args = [
                layer,
                *arguments(b.layer, graph.in_edges(b.layer)),
                ref(residual.src, residual.out),
                branch,
                module,
            ]
            call = f"residual_add({', '.join(args)}{'' if b.first else ', first=False'})"
        else:
            if name in producer_of:  # the producer's call, the activation passed to it
                producer = producer_of[name]
                edges = graph.in_edges(producer)
                args = [*arguments(producer, edges), f"act={module}"]
                module = module_ref(graph.nodes[producer].module_name)
            else:
                args = arguments(name, edges)
            call = f"checkpointed({', '.join([module, *args])})" if checkpoint else f"{module}({', '.join(args)})"
        t = inference.types[name]
        if isinstance(t, TensorType):
            var[name] = names(name)
            note = (
                f"; computes its first {trimmed[name]} token(s) only, all its readers read" if name in trimmed else ""
            )
            lines.append(f"    {var[name]} = {call}  # {t.symbolic_shape()}{note}")
        else:  # several outputs: unpack the tuple into one variable per port
            targets = []
            for port in t:
                ports[name, port] = names(f"{name}.{port}")
                targets.append(ports[name, port])
            shapes = ", ".join(f"{p}: {pt.symbolic_shape()}" for p, pt in t.items())
            lines.append(f"    {', '.join(targets)} = {call}  # {shapes}")
        made = [(name, None)] if isinstance(t, TensorType) else [(name, p) for p in t]
        dead = [k for k in dict.fromkeys([(e.src, e.out) for e in edges] + made) if last_read.get(k, -1) <= i]
        dead = [ref(*k) for k in dead if k not in kept]
        if dead:
            lines.append(f"    del {', '.join(dead)}")

    if returns == "tensor":
        lines.append(f"    return {ref(chosen[0][1], chosen[0][2])}")
    elif returns == "list":
        lines.append(f"    return [{', '.join(ref(n, p) for _, n, p in chosen)}]")
    else:
        lines.append("    return {" + ", ".join(f"{k!r}: {ref(n, p)}" for k, n, p in chosen) + "}")
    return "\n".join(lines) + "\n"


def _module_paths(graph: Any, order: list[str]) -> list[str]:
    """The dotted paths of the submodules a program calls or passes (nodes' modules, shared modules)."""
    paths = []
    for name in order:
        node = graph.nodes[name]
        if node.is_input:
            continue
        paths.append(node.module_name)
        for q in node.shared.values():
            paths.extend([q] if isinstance(q, str) else q)
    return paths


def fused_activations(
    inference: Inference, order: list[str], kept: set[tuple[str, str | None]], excluded: set[str]
) -> dict[str, str]:
    """The activations that ride along their producer's call, as producer → activation node: an activation that
    may (:meth:`~blockgraph.spec.schema.BlockSpec.fusable`) right after the node it reads, a node whose module takes
    ``act=`` (:attr:`~blockgraph.spec.schema.BlockSpec.takes_act`: conv2d, linear) and that nothing else reads nor
    returns. The producer's kernel may then apply it in its epilogue (in eager inference: oneDNN's post-op) instead
    of a second pass over its output; the values are the same math. ``excluded``: nodes that must keep their call
    (trimmed ones)."""
    graph = inference.graph
    fused = {}
    for name, reader in zip(order, order[1:], strict=False):
        node, act = graph.nodes[name], graph.nodes[reader]
        if node.is_input or act.is_input or name in excluded or reader in excluded or (name, None) in kept:
            continue
        if not type(node.spec).takes_act or not act.spec.fusable() or act.shared:
            continue
        if [e.dst for e in graph.out_edges(name)] == [reader] and isinstance(inference.types[name], TensorType):
            fused[name] = reader
    return fused


@dataclass(frozen=True)
class ResidualBranch:
    """A residual branch whose add the generated code calls with its layer (:func:`fused_residuals`)."""

    layer: str
    """The node that takes the residual (conv2d, linear)."""
    modules: tuple[str, ...]
    """The nodes between it and the add, in order (layer scales, dropout, drop path)."""
    first: bool
    """Whether the branch is the add's first input (the residual its second)."""

    @property
    def end(self) -> str:
        """The node the add reads from the branch."""
        return self.modules[-1] if self.modules else self.layer


def fused_residuals(
    inference: Inference, order: list[str], kept: set[tuple[str, str | None]], excluded: set[str]
) -> dict[str, ResidualBranch]:
    """The adds whose residual branch rides along the branch's layer, as add node → branch: a node whose module
    takes ``residual=`` and ``scale=`` (:attr:`~blockgraph.spec.schema.BlockSpec.takes_residual`: conv2d, linear),
    then only blocks that :meth:`~blockgraph.spec.schema.BlockSpec.passes_residual_branch` (layer scales, dropout,
    drop path), then an add of two inputs of one type (:meth:`~blockgraph.spec.schema.BlockSpec.joins_residual`),
    each next in the execution order and read by the next alone, none of them kept, excluded or sharing modules.
    The generated code calls :func:`blockgraph.layers.primitives.residual_add`, which in eager inference adds the
    residual in the layer's kernel (and folds a layer scale into its weights), and otherwise runs the modules as
    written: ConvNeXt's, InceptionNeXt's and PoolFormer's MLP branches written in YAML get the epilogue the built-in
    blocks have."""
    graph = inference.graph
    position = {name: i for i, name in enumerate(order)}

    def alone(name: str) -> bool:  # a node of one tensor output, read by one node, kept by nobody
        node = graph.nodes[name]
        return (
            not node.is_input
            and name not in excluded
            and (name, None) not in kept
            and not node.shared
            and isinstance(inference.types[name], TensorType)
            and len(graph.out_edges(name)) == 1
        )

    branches = {}
    for name in order:
        add = graph.nodes[name]
        edges = graph.in_edges(name)
        if add.is_input or add.shared or name in excluded or not add.spec.joins_residual(len(edges)):
            continue
        if edges[0].src == edges[1].src or inference.types[edges[0].src] != inference.types[edges[1].src]:
            continue
        for k, edge in enumerate(edges):
            chain = [edge.src]  # walking back from the add, each node the one right before the next
            while alone(chain[-1]) and graph.nodes[chain[-1]].spec.passes_residual_branch():
                before = graph.in_edges(chain[-1])
                if len(before) != 1 or position[before[0].src] != position[chain[-1]] - 1:
                    break
                chain.append(before[0].src)
            layer = chain[-1]
            if (
                position[edge.src] == position[name] - 1
                and all(alone(n) for n in chain)
                and type(graph.nodes[layer].spec).takes_residual
                and len(graph.in_edges(layer)) == 1
            ):
                branches[name] = ResidualBranch(layer, tuple(reversed(chain[:-1])), first=k == 0)
                break
    return branches


def _batch_stat_code(inference: Inference, order: list[str]) -> str:
    """A condition true when some BatchNorm of the model would see a 1x1 map (with a batch of one, in training)."""
    conditions: list[str] = []
    for name in order:
        node = inference.graph.nodes[name]
        if node.is_input or not node.spec.uses_batch_norm():  # type: ignore[union-attr]
            continue
        t = inference.types[name]
        for value in t.values() if isinstance(t, dict) else (t,):
            if value.grid is None:  # a vector: one value per channel in any batch of one
                return "True"
            h, w = value.grid
            condition = f"({_py(h)} == 1 and {_py(w)} == 1)"
            if condition not in conditions:
                conditions.append(condition)
    return " or ".join(conditions)


def _py(e: Expr) -> str:
    return e.to_python({"H": "H", "W": "W"})


def _acceptance_code(inference: Inference, image: str) -> str:
    """A Python condition that is true when the input must be rejected (wrong rank, channels or size).

    A symbol whose accepted sizes were solved exactly into "at least N" is tested as ``H < N``; anything else
    (divisibility, coupled constraints) as the constraints themselves.
    """
    parts = [f"{image}.ndim != 4", f"{image}.shape[1] != {inference.graph.spec.input.channels}"]
    acceptance = inference.acceptance
    simple = set()
    for symbol, sizes in acceptance.sizes.items():
        if sizes.unconstrained:
            simple.add(symbol)
        elif sizes.exact and not sizes.finite and sizes.period == 1 and sizes.start is not None:
            parts.append(f"{symbol} < {sizes.start}")
            simple.add(symbol)
    seen = set()
    for item in inference.constraints:
        c = item.constraint
        if len(c.symbols) == 1 and c.symbols <= simple:
            continue
        line = f"not ({c.to_python({'H': 'H', 'W': 'W'})})"
        if line not in seen:
            seen.add(line)
            parts.append(line)
    return " or ".join(parts)
