"""What a compiled model costs, node by node: the table of ``model.summary()`` and the counts of ``model.macs()``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from blockgraph.types import TensorType

if TYPE_CHECKING:
    from blockgraph.compiler.model import BlockgraphModel


def count_macs(model: BlockgraphModel, input_size: tuple[int, int] | None = None, batch: int = 1) -> dict[str, int]:
    """Multiply-accumulates per node (and ``"total"``) for one forward of a batch at ``input_size`` (default: the
    spec's), counted by ``torch.utils.flop_counter`` on the model's own forward in eval mode, with every parameter
    and buffer replaced by a meta tensor like it (no memory, no compute; the model's modes are restored).

    A node's count includes the shared modules it calls; a shared module's own entry is the sum over its users.
    Only matrix products and convolutions count (torch's convention): norms, activations, pooling and resizing are
    free.

    Raises:
        ShapeError: the model does not take ``input_size``.
    """
    h, w = input_size or model.spec.input.size
    model.inference.check(h, w)
    meta = {name: torch.empty_like(t, device="meta") for name, t in [*model.named_parameters(), *model.named_buffers()]}
    dtype = next((t.dtype for t in meta.values() if t.is_floating_point()), None)
    image = torch.empty(batch, model.spec.input.channels, h, w, device="meta", dtype=dtype)
    modes = {m: m.training for m in model.modules()}
    counter = FlopCounterMode(display=False, depth=None)
    try:
        with counter, torch.no_grad():
            torch.func.functional_call(model.eval(), meta, (image,))
    finally:
        for m, training in modes.items():
            m.training = training
    counts = counter.get_flop_counts()
    root = type(model).__name__
    out = {
        name: sum(counts.get(f"{root}.{name}", {}).values()) // 2 for name in [*model.shared_modules(), *model.nodes]
    }
    out["total"] = counter.get_total_flops() // 2
    return out


def table(model: BlockgraphModel, input_size: tuple[int, int] | None = None, batch: int = 1, macs: bool = True) -> str:
    """A table of every node: name, op, output type (symbolic) and shape at ``input_size`` (default: the spec's),
    parameters, and multiply-accumulates (see :func:`count_macs`; ``macs=False`` leaves them out); then the totals."""
    graph = model.inference.graph
    h, w = input_size or model.spec.input.size
    counts = count_macs(model, (h, w), batch) if macs else {}
    rows = []
    for qualified in model.shared_modules():
        op = f"{graph.shared[qualified].spec.op} (shared)"
        rows.append([qualified, op, "", "", _params(model.get_submodule(qualified)), _macs(counts, qualified)])
    for name in model.nodes:
        node = graph.nodes[name]
        t = model.inference.types[name]
        types = {"": t} if isinstance(t, TensorType) else {f"{p}: ": pt for p, pt in t.items()}
        for i, (label, pt) in enumerate(types.items()):
            shape = pt.shape({"H": h, "W": w}, batch=batch)
            concrete = _shape(shape)
            if name in model.trimmed_tokens:  # computed: the first k tokens only
                concrete = f"{_shape((batch, model.trimmed_tokens[name], shape[2]))} (of {shape[1]} tokens)"
            params = _params(model.get_submodule(name)) if i == 0 else ""
            first = i == 0
            rows.append([name if first else "", node.op if first else "", f"{label}{pt}", concrete, params,
                         _macs(counts, name) if first else ""])  # fmt: skip
    total = sum(p.numel() for p in model.parameters())
    header = ["node", "op", "type", f"shape @ {batch}x{h}x{w}", "params", "MACs"]
    totals = f"{total:,} parameters"
    if counts:
        totals += f", {counts['total']:,} MACs ({counts['total'] / 1e9:.2f} G) at {batch}x{h}x{w}"
    return f"{format_table(header, rows, right={4, 5})}\n\n{model.spec.name}: {totals}, outputs: {', '.join(model.outputs)}"


def format_table(header: list[str], rows: list[list[str]], right: set[int] | None = None) -> str:
    """A plain-text table with aligned columns (``right``: indices of right-aligned columns)."""
    right = right or set()
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            str(c).rjust(widths[i]) if i in right else str(c).ljust(widths[i]) for i, c in enumerate(cells)
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def _params(module: nn.Module) -> str:
    return f"{sum(p.numel() for p in module.parameters()):,}"


def _macs(counts: dict[str, int], name: str) -> str:
    return f"{counts[name]:,}" if name in counts else ""


def _shape(shape: Any) -> str:
    return "x".join(str(d) for d in shape) if shape else ""
