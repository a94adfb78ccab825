"""What a compiled model costs, node by node: the table of ``model.summary()`` and the counts of ``model.macs()``."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from blockgraph.types import describe_value

if TYPE_CHECKING:
    from blockgraph.compiler.model import BlockgraphModel


def count_macs(model: BlockgraphModel, input_size: tuple[int, int] | None = None, batch: int = 1) -> dict[str, int]:
    """Multiply-accumulates per node (and ``"total"``) for one forward of a batch at ``input_size`` (default: the
    spec's; a :class:`ShapeError` if not accepted), counted by ``torch.utils.flop_counter`` on the model's own
    forward in eval mode with every parameter and buffer replaced by a meta tensor like it (no memory, no compute;
    the modes of its modules are restored). A node's count includes the shared modules it calls; a shared module's
    own entry is the sum over its users. Only matrix products and convolutions count (torch's convention)."""
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
    root, graph = type(model).__name__, model.inference.graph
    out = {name: sum(counts.get(f"{root}.{name}", {}).values()) // 2 for name in model.shared_modules()}
    calls = Counter(graph.nodes[name].module_name for name in model.nodes)  # the parts of `use`s share modules
    for name in model.nodes:
        module = graph.nodes[name].module_name
        out[name] = sum(counts.get(f"{root}.{module}", {}).values()) // 2 // calls[module]
    out["total"] = counter.get_total_flops() // 2
    return out


def describe(
    model: BlockgraphModel, input_size: tuple[int, int] | None = None, batch: int = 1, macs: bool = True
) -> dict[str, Any]:
    """The model at ``input_size`` (default: the spec's) as plain data: ``name``, ``params``, ``macs``, ``input``,
    ``outputs`` (their shapes), ``accepts`` (the input sizes), ``nodes`` (``name``, ``op``, ``inputs``, ``shape``,
    ``type``, ``params``, ``macs``, and ``computed_tokens`` where only the leading tokens are computed) and
    ``shared`` modules (``name``, ``op``, ``users``, ``params``, ``macs``). MACs: see :func:`count_macs`;
    ``macs=False`` leaves them None."""
    graph, types = model.inference.graph, model.inference.types
    h, w = input_size or model.spec.input.size
    env = {"H": h, "W": w}
    counts = count_macs(model, (h, w), batch) if macs else {}
    nodes, built = [], set()
    for name in model.nodes:
        text, shape = describe_value(types[name], env, batch=batch)
        module = graph.nodes[name].module_name  # the parts of `use`s of one shared block: counted at the first
        params = 0 if module in built else _params(model, module)
        built.add(module)
        inputs = [e.src if e.out is None else f"{e.src}.{e.out}" for e in graph.in_edges(name)]
        nodes.append({"name": name, "op": graph.nodes[name].op, "inputs": inputs, "shape": shape, "type": text,
                      "params": params, "macs": counts.get(name)})  # fmt: skip
        if name in model.trimmed_tokens:  # computes its first tokens only (all its readers read): their count
            nodes[-1]["computed_tokens"] = model.trimmed_tokens[name]
    shared = [{"name": name, "op": graph.shared[name].spec.op, "users": list(graph.shared[name].users),
               "params": _params(model, name), "macs": counts.get(name)}
              for name in model.shared_modules()]  # fmt: skip
    outputs = {key: list(t.shape(env, batch=batch)) for key, t in model.output_types().items()}
    return {"name": model.spec.name, "params": sum(p.numel() for p in model.parameters()), "macs": counts.get("total"),
            "input": [batch, model.spec.input.channels, h, w], "outputs": outputs,
            "accepts": model.inference.acceptance.describe(), "nodes": nodes, "shared": shared}  # fmt: skip


def table(model: BlockgraphModel, input_size: tuple[int, int] | None = None, batch: int = 1, macs: bool = True) -> str:
    """:func:`describe` as a table: a row per node (and per output port), per shared module, then the totals."""
    data = describe(model, input_size, batch, macs)
    rows = [[s["name"], f"{s['op']} (shared)", "", "", f"{s['params']:,}", _number(s["macs"])] for s in data["shared"]]
    for node in data["nodes"]:
        ports = {"": (node["type"], node["shape"])} if isinstance(node["type"], str) else {
            f"{p}: ": (text, node["shape"][p]) for p, text in node["type"].items()}  # fmt: skip
        for i, (label, (text, shape)) in enumerate(ports.items()):
            concrete = _shape(shape)
            if "computed_tokens" in node:  # computed: the first k tokens only
                concrete = f"{_shape([batch, node['computed_tokens'], shape[2]])} (of {shape[1]} tokens)"
            first = [node["name"], node["op"], f"{node['params']:,}", _number(node["macs"])] if i == 0 else [""] * 4
            rows.append([*first[:2], f"{label}{text}", concrete, *first[2:]])
    _, _, h, w = data["input"]
    header = ["node", "op", "type", f"shape @ {batch}x{h}x{w}", "params", "MACs"]
    totals = f"{data['params']:,} parameters"
    if data["macs"] is not None:
        totals += f", {data['macs']:,} MACs ({data['macs'] / 1e9:.2f} G) at {batch}x{h}x{w}"
    totals += f", outputs: {', '.join(model.outputs)}"
    return f"{format_table(header, rows, right={4, 5})}\n\n{model.spec.name}: {totals}"


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


def _params(model: nn.Module, name: str) -> int:
    return sum(p.numel() for p in model.get_submodule(name).parameters())


def _number(value: int | None) -> str:
    return "" if value is None else f"{value:,}"


def _shape(shape: Any) -> str:
    return "x".join(str(d) for d in shape) if shape else ""
