"""Compile an analysed spec into an ``nn.Module``: each node's module, built by its block (``BlockSpec.build``) and
installed under the node's dotted name (``stage1.blocks.0`` → ``model.stage1.blocks[0]``), and the generated
``forward`` (:mod:`blockgraph.compiler.codegen`). Shared modules are installed once under their qualified name and
handed to their users as keyword arguments.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from torch import nn

from blockgraph.blocks.base import BuildContext
from blockgraph.compiler.codegen import generate
from blockgraph.compiler.model import BlockgraphModel, empty
from blockgraph.errors import BlockgraphError, BudgetError
from blockgraph.pipeline import Analysis


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
        with _sized(qualified, shared.spec.op, graph.pos(shared.path)):
            modules[qualified] = shared.spec.build(BuildContext(qualified, device, dtype))
    input_size = tuple(analysis.spec.input.size)
    for name in model.nodes:
        node = graph.nodes[name]
        with _sized(name, node.op, graph.pos(node.path)):
            ctx = BuildContext(name, device, dtype, keep_tokens=program.trimmed.get(name), input_size=input_size)
            modules[name] = node.spec.build(ctx, *analysis.inference.inputs(name))  # type: ignore[union-attr]
    _install(model, modules)
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
