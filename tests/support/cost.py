"""The independent check of the static costs: measure a built model (parameters of every node's module, the bytes
of every node's output in a meta-device forward) and compare with :mod:`blockgraph.graph.cost`."""

from __future__ import annotations

import torch

from blockgraph.graph import cost


def measured(model: torch.nn.Module, height: int, width: int, batch: int = 1) -> tuple[dict, dict]:
    """(parameters per node and per shared module, output bytes per node) of ``model`` (built on the meta device),
    by counting its modules and running it in eval mode (where every node gives its static type: DeiT's head
    returns its two logits apart only in training)."""
    replica = model.eval()
    params = {name: sum(p.numel() for p in replica.get_submodule(name).parameters()) for name in replica.nodes}
    params.update({name: sum(p.numel() for p in replica.get_submodule(name).parameters())
                   for name in replica.shared_modules()})  # fmt: skip
    outputs: dict[str, int] = {}

    def hook(name: str):
        def record(module, inputs, output) -> None:
            values = output if isinstance(output, tuple) else (output,)
            outputs[name] = sum(v.numel() * v.element_size() for v in values)

        return record

    handles = [replica.get_submodule(n).register_forward_hook(hook(n)) for n in replica.nodes]
    channels = replica.spec.input.channels
    with torch.no_grad():
        replica(torch.empty(batch, channels, height, width, device="meta"))
    for handle in handles:
        handle.remove()
    return params, outputs


def assert_static_costs_match(model: torch.nn.Module, height: int, width: int, batch: int = 1) -> None:
    """Every node's (and shared module's) static parameter count and output bytes equal the measured ones."""
    params, outputs = measured(model, height, width, batch)
    static = cost.params(model.inference)
    counted = {**static.nodes, **static.shared}
    wrong = {n: (counted[n], c) for n, c in params.items() if counted[n] != c}
    assert not wrong, f"static != measured parameters (node: (static, measured)): {wrong}"
    expected = cost.activation_bytes(model.inference, height, width, batch)
    for name, keep in model.trimmed_tokens.items():  # its first tokens only: static bytes * keep / tokens
        t = model.inference.types[name]
        expected[name] = expected[name] * keep // t.shape({"H": height, "W": width}, batch)[1]
    wrong = {n: (expected[n], b) for n, b in outputs.items() if expected[n] != b}
    assert not wrong, f"static != measured output bytes (node: (static, measured)): {wrong}"
    assert set(outputs) == set(model.nodes)
