"""What a model costs, from the spec alone: the parameters of every node (each block's ``params`` rule, plain
integer arithmetic) and the bytes of every node's output for an input size and batch (its static output type).
No torch, no tensors: a spec with ten million blocks or a billion channels is priced in milliseconds."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from blockgraph.graph.infer import Inference
from blockgraph.spec.plugins import custom_code


@dataclass(frozen=True)
class Params:
    """Parameter counts per node and per shared module (``None`` where a custom block has no ``params`` rule)."""

    nodes: dict[str, int | None]
    shared: dict[str, int | None]

    @property
    def unknown(self) -> list[str]:
        return [name for name, n in {**self.shared, **self.nodes}.items() if n is None]

    @property
    def total(self) -> int:
        """The sum of the known counts (every shared module once)."""
        return sum(n for n in (*self.shared.values(), *self.nodes.values()) if n is not None)


def params(inference: Inference) -> Params:
    """Every node's and shared module's parameter count from its block's rule."""
    graph = inference.graph
    shared = {name: block_params(inference, name) for name in graph.shared}
    nodes, built = {}, set()
    for node in graph:
        if node.is_input:
            continue
        # the parts of several `use`s of one shared block: one module, counted at its first use
        nodes[node.name] = 0 if node.module_name in built else block_params(inference, node.name)
        built.add(node.module_name)
    return Params(nodes, shared)


def block_params(inference: Inference, name: str) -> int | None:
    """The parameter count of one node's or shared module's module by its block's ``params`` rule (None: the rule
    does not know).

    Raises:
        BlockError: a custom block's rule raised.
    """
    graph = inference.graph
    owner = graph.shared.get(name) or graph.nodes[name]
    inputs = [] if name in graph.shared else inference.inputs(name)
    with custom_code(owner.spec, name, graph.pos(owner.path), "its params() rule"):  # type: ignore[arg-type]
        return owner.spec.params(*inputs)  # type: ignore[union-attr]


def activation_bytes(
    inference: Inference, height: int, width: int, batch: int = 1, element_size: int = 4
) -> dict[str, int]:
    """The bytes of every node's output (all ports of a multi-output node) for one forward at ``height x width``."""
    env = {"H": height, "W": width}
    out = {}
    for node in inference.graph:
        if node.is_input:
            continue
        value: Any = inference.types[node.name]
        values = value.values() if isinstance(value, Mapping) else (value,)
        out[node.name] = sum(math.prod(t.shape(env, batch)) for t in values) * element_size
    return out
