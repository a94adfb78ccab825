"""Resource budgets, checked before anything is allocated: parameters from the blocks' counting rules and
activation bytes from the static output types (:mod:`blockgraph.graph.cost`); no tensor is made, except that a
custom block without a ``params`` rule is built alone on the meta device to be counted."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from blockgraph.errors import BudgetError, Pos, excerpt
from blockgraph.graph import cost
from blockgraph.graph.infer import Inference
from blockgraph.spec.schema import MAX_SIZE

DEFAULT_MAX_PARAMS = 2_000_000_000


@dataclass(frozen=True)
class Estimate:
    """What a model would cost: parameters, and the bytes of every node's output for one forward."""

    params: int
    activation_bytes: int
    largest: list[tuple[str, int]]
    """The nodes with the most parameters, largest first (three at most)."""
    widest: tuple[str, int] | None = None
    """The node with the largest output, and its bytes."""


def estimate(inference: Inference, input_size: tuple[int, int], batch: int = 1, element_size: int = 4) -> Estimate:
    """Count the parameters and the activation bytes (every node's output, ``element_size`` bytes an element) of
    one forward of a batch at ``input_size``."""
    counts = cost.params(inference)
    nodes = dict(counts.nodes)
    shared = dict(counts.shared)
    if counts.unknown:
        _measure(inference, nodes, shared)
    total = sum(nodes.values()) + sum(shared.values())  # type: ignore[arg-type]
    largest = sorted({**shared, **nodes}.items(), key=lambda item: -item[1])[:3]  # type: ignore[operator]
    outputs = cost.activation_bytes(inference, *input_size, batch=batch, element_size=element_size)
    widest = max(outputs.items(), key=lambda item: item[1], default=None)
    return Estimate(total, sum(outputs.values()), largest, widest)  # type: ignore[arg-type]


def _measure(inference: Inference, nodes: dict[str, int | None], shared: dict[str, int | None]) -> None:
    """Count the blocks that have no ``params`` rule by building each alone on the meta device."""
    from blockgraph.compiler.check import build_alone

    for counts in (shared, nodes):
        for name in [n for n, c in counts.items() if c is None]:
            counts[name] = sum(p.numel() for p in build_alone(inference, name).parameters())


def check(
    inference: Inference,
    input_size: tuple[int, int],
    *,
    max_params: float | None = DEFAULT_MAX_PARAMS,
    max_activation_bytes: float | None = None,
    batch: int = 1,
) -> Estimate:
    """Refuse a model over budget before it allocates anything.

    Raises:
        BudgetError: the parameter count or the activation bytes exceed their limit.
    """
    graph = inference.graph
    check_limits(max_params=max_params, max_activation_bytes=max_activation_bytes, batch=batch)
    result = estimate(inference, input_size, batch)
    if max_params is not None and result.params > max_params:
        node, count = result.largest[0]
        others = ", ".join(f"{n} ({c:,})" for n, c in result.largest[1:])
        raise BudgetError(
            f"'{graph.spec.name}' would have {result.params:,} parameters, over the limit of {int(max_params):,}; "
            f"the largest node has {count:,}",
            pos=_pos(graph, node),
            node=node,
            hint=f"{'next largest: ' + others + '; ' if others else ''}reduce the widths or depths, or raise "
            "--max-params (max_params=)",
        )
    if max_activation_bytes is not None and result.activation_bytes > max_activation_bytes:
        h, w = input_size
        node, size = result.widest  # type: ignore[misc]
        raise BudgetError(
            f"'{graph.spec.name}' would hold {_mib(result.activation_bytes)} of activations for a batch of {batch} at "
            f"{h}x{w}, over the limit of {_mib(max_activation_bytes)}; the largest output is this node's "
            f"({_mib(size)})",
            pos=_pos(graph, node),
            node=node,
            hint="use a smaller input or batch, or raise --max-activation-bytes",
        )
    return result


def check_limits(*, max_params: float | None = None, max_activation_bytes: float | None = None, batch: int = 1) -> None:
    """Refuse budgets that are not numbers above zero (``nan`` would turn a limit off: every comparison with it is
    false) and a batch that is not a whole number from 1 to :data:`~blockgraph.spec.schema.MAX_SIZE`.

    Raises:
        BudgetError: naming the argument (and its command-line flag).
    """
    where = Pos("<arguments>")
    for name, value in (("max_params", max_params), ("max_activation_bytes", max_activation_bytes)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            flag = "--" + name.replace("_", "-")
            raise BudgetError(
                f"{name} must be a number above zero, got {excerpt(value)}",
                pos=where,
                hint=f"e.g. {flag} 1e9 ({name}=1e9); None (no {flag}) for no limit",
            )
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= MAX_SIZE:
        raise BudgetError(
            f"batch must be a whole number from 1 to {MAX_SIZE:,}, got {excerpt(batch)}",
            pos=where,
            hint="e.g. --batch 8 (batch=8)",
        )


def _pos(graph: Any, name: str) -> Pos:
    owner = graph.shared.get(name) or graph.nodes[name]
    return graph.pos(owner.path)


def _mib(size: float) -> str:
    return f"{size / 2**20:,.1f} MiB"
