"""Build-time checks of blocks against their own rules: a module's parameter count against the block's ``params``
rule, and its output shapes against its shape rule (``infer``).

:func:`~blockgraph.compiler.model.compile_model` checks the custom blocks (:func:`check_custom_blocks`): a rule
that is off shows at build, as an error naming the node, rather than as a wrong budget or a shape error deep in the
forward. Built-in blocks are not checked at build (speed); the test suite checks every node and shared module of
every reference spec (:func:`check_blocks`).

Each block is built alone on the meta device (no memory, no init) and called, in eval mode, on meta tensors of its
input types at the spec's input size, batch 2, exactly as the generated forward calls it: the inputs, then the
``(h, w)`` grid of each input when the block ``takes_size``, then its shared modules (built on meta too) as keyword
arguments. So a custom block's module must run on the meta device (no ``.item()``, no shapes that depend on values).
Only the ``BlockSpec`` API is used (``build``, ``params``, ``output_ports``, ``takes_size``, the shared fields):
nothing here knows about particular ops.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from blockgraph.blocks import BuildContext
from blockgraph.errors import BlockError, BlockgraphError, raise_all
from blockgraph.graph.cost import block_params
from blockgraph.graph.infer import Inference
from blockgraph.spec.plugins import custom_code, is_builtin

BATCH = 2
"""The batch of the meta tensors a block is called on (2: a batch dimension the rule cannot confuse with 1)."""


def check_custom_blocks(inference: Inference, names: Iterable[str]) -> None:
    """:func:`check_blocks` for the blocks among ``names`` (nodes and shared modules) whose class is defined
    outside blockgraph: what :func:`~blockgraph.compiler.model.compile_model` runs."""
    custom = [name for name in names if not is_builtin(type(_owner(inference, name).spec))]
    if custom:
        check_blocks(inference, custom)


def check_blocks(inference: Inference, names: Iterable[str] | None = None) -> int:
    """Check that the modules of blocks agree with their rules: parameter counts with ``params`` (where the rule
    gives a number) and, for nodes, output shapes with the shape rule at the spec's input size.

    Args:
        inference: the analysed spec.
        names: the nodes and shared modules to check, by name (default: every one of the graph).

    Returns:
        How many blocks were checked.

    Raises:
        BlockError: (one per block's place in the spec) a count or a shape differs from the rule, or a custom
            block's code raised.
    """
    graph = inference.graph
    names = list(names) if names is not None else [*graph.shared, *(n.name for n in graph if not n.is_input)]
    shared: dict[str, nn.Module] = {}

    def shared_module(name: str) -> nn.Module:
        if name not in shared:
            shared[name] = build_alone(inference, name)
        return shared[name]

    errors: list[BlockgraphError] = []
    failed: set[tuple[str, int, int]] = set()  # the places in the spec already reported (a repeated block fails once)
    for name in names:
        pos = graph.pos(_owner(inference, name).path)
        if (pos.file, pos.line, pos.column) in failed:
            continue
        try:
            module = shared_module(name) if name in graph.shared else build_alone(inference, name)
            _check_params(inference, name, module)
            if name not in graph.shared:
                _check_shapes(inference, name, module, shared_module)
        except BlockgraphError as e:
            failed.add((pos.file, pos.line, pos.column))
            errors.extend(e.errors)
    raise_all(errors)
    return len(names)


def build_alone(inference: Inference, name: str) -> nn.Module:
    """One node's or shared module's module, built alone on the meta device as the compiler builds it (and under
    ``torch.device("meta")``, for a block that ignores ``ctx.device``), in eval mode: the mode the static types
    describe (a distilled head returns its two logits only in training).

    Raises:
        BlockError: a custom block's ``build`` raised.
    """
    graph = inference.graph
    owner = _owner(inference, name)
    if name in graph.shared:
        ctx, inputs = BuildContext(name, device="meta"), []
    else:
        ctx = BuildContext(name, device="meta", input_size=tuple(graph.spec.input.size))  # type: ignore[arg-type]
        inputs = inference.inputs(name)
    # The device context too: a block that ignores ``ctx.device`` still makes its tensors on meta.
    with custom_code(owner.spec, name, graph.pos(owner.path), "its build()"), torch.device("meta"):
        return owner.spec.build(ctx, *inputs).eval()


def _owner(inference: Inference, name: str) -> Any:
    graph = inference.graph
    return graph.shared.get(name) or graph.nodes[name]


def _label(inference: Inference, name: str) -> str:
    kind = "shared module" if name in inference.graph.shared else "node"
    return f"{kind} '{name}' ({_owner(inference, name).spec.op})"


def _check_params(inference: Inference, name: str, module: nn.Module) -> None:
    rule = block_params(inference, name)
    if rule is None:
        return
    count = sum(p.numel() for p in module.parameters())
    if count != rule:
        owner = _owner(inference, name)
        raise BlockError(
            f"{_label(inference, name)}: params() says {rule:,} parameters, the module has {count:,}",
            pos=inference.graph.pos(owner.path),
            node=name,
            hint=f"fix the params() rule of op '{owner.spec.op}' or its module ({type(module).__qualname__}): "
            "budgets, `validate` and summaries count with the rule",
        )


def _check_shapes(inference: Inference, name: str, module: nn.Module, shared: Any) -> None:
    graph = inference.graph
    node = graph.nodes[name]
    h, w = graph.spec.input.size
    env = {"H": h, "W": w}
    types = inference.inputs(name)
    args: list[Any] = [
        torch.empty(t.shape(env, batch=BATCH), device="meta", dtype=torch.bool if t.layout == "mask" else None)
        for t in types
    ]
    if node.spec.takes_size(*types):  # type: ignore[union-attr]
        args += [(t.grid[0].evaluate(env), t.grid[1].evaluate(env)) for t in types]  # type: ignore[index]
    kwargs = {
        field: shared(q) if isinstance(q, str) else tuple(shared(x) for x in q) for field, q in node.shared.items()
    }
    pos = graph.pos(node.path)
    what = "its module's forward (called on meta tensors of its input types)"
    with custom_code(node.spec, name, pos, what), torch.device("meta"):  # type: ignore[arg-type]
        value = module(*args, **kwargs)
    expected: Any = inference.types[name]  # a TensorType, or one per output port
    ports = node.spec.output_ports()  # type: ignore[union-attr]
    if ports is None:
        pairs = [("output ", _shape(expected.shape(env, batch=BATCH)), value)]
    elif isinstance(value, tuple | list) and len(value) == len(ports):
        shapes = [_shape(expected[p].shape(env, batch=BATCH)) for p in ports]
        pairs = [(f"output '{p}' ", s, v) for p, s, v in zip(ports, shapes, value, strict=True)]
    else:
        pairs = [("outputs ", f"a tuple of {len(ports)} ({', '.join(ports)})", value)]
    for what, want, v in pairs:
        got = _shape(v.shape) if isinstance(v, torch.Tensor) else f"a {type(v).__name__}"
        if got != want:
            raise BlockError(
                f"{_label(inference, name)}: the shape rule says {what}{want}, the module returns {got} (at input "
                f"{h}x{w}, batch {BATCH})",
                pos=pos,
                node=name,
                hint=f"fix the shape rule (infer) of op '{node.spec.op}' or its module "  # type: ignore[union-attr]
                f"({type(module).__qualname__}): the compiled forward and every static check rely on the rule",
            )


def _shape(shape: Iterable[int]) -> str:
    return "x".join(map(str, shape))
