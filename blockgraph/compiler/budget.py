"""Resource budgets, checked before any memory is allocated: a meta-device replica of the model (modules and tensors
without storage) gives the exact parameter count and the activation sizes of a forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blockgraph.compiler.codegen import compile_model
from blockgraph.errors import BudgetError
from blockgraph.graph.infer import Inference

DEFAULT_MAX_PARAMS = 2_000_000_000


@dataclass(frozen=True)
class Estimate:
    """What a model would cost: parameters, and the bytes of every node's output for one forward."""

    params: int
    activation_bytes: int
    largest: list[tuple[str, int]]
    """The nodes with the most parameters, largest first."""


def estimate(
    inference: Inference, input_size: tuple[int, int], batch: int = 1, dtype=torch.float32, activations: bool = True
) -> Estimate:
    """Build a meta-device replica, count its parameters, and (with ``activations``) run a meta forward summing
    every node's output (else ``activation_bytes`` is 0)."""
    replica = compile_model(inference, device="meta", dtype=dtype)
    params = sum(p.numel() for p in replica.parameters())
    per_node = [(n, sum(p.numel() for p in replica.get_submodule(n).parameters())) for n in replica.nodes]
    largest = sorted(per_node, key=lambda item: -item[1])[:3]
    total = 0
    if not activations:
        return Estimate(params, 0, largest)

    def count(module, inputs, output) -> None:
        nonlocal total
        outputs = output if isinstance(output, tuple) else (output,)
        total += sum(o.numel() * o.element_size() for o in outputs if isinstance(o, torch.Tensor))

    hooks = [replica.get_submodule(n).register_forward_hook(count) for n in replica.nodes]
    with torch.no_grad():
        replica(torch.empty(batch, inference.graph.spec.input.channels, *input_size, device="meta", dtype=dtype))
    for hook in hooks:
        hook.remove()
    return Estimate(params, total, largest)


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
    spec = inference.graph.spec
    where = inference.graph.pos(())
    result = estimate(inference, input_size, batch, activations=max_activation_bytes is not None)
    biggest = ", ".join(f"{n} ({c:,})" for n, c in result.largest)
    if max_params is not None and result.params > max_params:
        raise BudgetError(
            f"'{spec.name}' would have {result.params:,} parameters, over the limit of {int(max_params):,}",
            pos=where,
            hint=f"largest nodes: {biggest}; reduce the widths/depths, or raise --max-params",
        )
    if max_activation_bytes is not None and result.activation_bytes > max_activation_bytes:
        h, w = input_size
        raise BudgetError(
            f"'{spec.name}' would hold {result.activation_bytes / 2**20:,.1f} MiB of activations for a batch of {batch} "
            f"at {h}x{w}, over the limit of {max_activation_bytes / 2**20:,.1f} MiB",
            pos=where,
            hint="use a smaller input or batch, or raise --max-activation-bytes",
        )
    return result
