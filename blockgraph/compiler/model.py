"""The module class compiled models derive from: spec, feature info, summary, generated code."""

from __future__ import annotations

from typing import Any

from torch import nn

from blockgraph.errors import ShapeError
from blockgraph.graph.infer import Inference
from blockgraph.spec.schema import ModelBase
from blockgraph.types import TensorType


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


class FeatureInfo(list):
    """The declared feature maps, timm style: a list of dicts (``name``, ``module``: the node that produces it,
    ``num_chs``, ``reduction``: its stride, ``index``), one per feature the spec declares, and ``out_indices``, the
    ones ``forward`` returns (all, unless the model was built with ``out_indices``).

    ``channels()``, ``reduction()`` and ``module_name()`` give the values of the returned features, in order (or,
    with ``idx``, of the features at those indices), like timm's ``FeatureInfo``.
    """

    def __init__(self, info: list[dict[str, Any]], out_indices: Any):
        super().__init__(info)
        self.out_indices: tuple[int, ...] = tuple(out_indices)

    def get(self, key: str, idx: int | list[int] | tuple[int, ...] | None = None) -> Any:
        """The value of ``key`` for each returned feature (``idx=None``), for the feature at ``idx``, or for each
        feature at the indices in ``idx``."""
        if idx is None:
            return [self[i][key] for i in self.out_indices]
        if isinstance(idx, list | tuple):
            return [self[i][key] for i in idx]
        return self[idx][key]

    def channels(self, idx: int | list[int] | tuple[int, ...] | None = None) -> Any:
        return self.get("num_chs", idx)

    def reduction(self, idx: int | list[int] | tuple[int, ...] | None = None) -> Any:
        return self.get("reduction", idx)

    def module_name(self, idx: int | list[int] | tuple[int, ...] | None = None) -> Any:
        return self.get("module", idx)


class BlockgraphModel(nn.Module):
    """Base of compiled models. Each compiled model gets its own subclass whose ``forward`` is generated code.

    Attributes:
        spec: the validated spec (:class:`~blockgraph.spec.schema.ModelBase`).
        feature_info: one dict per declared feature map: ``name``, ``module`` (node), ``num_chs``, ``reduction``,
            ``index``; a :class:`FeatureInfo` (``.channels()``, ``.reduction()``, ``.module_name()``, ``.out_indices``).
        code: the source of the generated ``forward``.
        outputs: the outputs ``forward`` returns, in order.
        trimmed_tokens: nodes that compute only their first k tokens, because every reader reads only those (ViT's
            last block, read by a head on the cls token): ``{node: k}``. A node that is returned (``outputs=``) is
            never trimmed.
    """

    spec: ModelBase
    feature_info: FeatureInfo
    code: str
    outputs: list[str]
    trimmed_tokens: dict[str, int]

    def _setup(
        self,
        inference: Inference,
        chosen: list[tuple[str, str, str | None]],
        returns: str,
        order: list[str],
        code: str,
        trimmed: dict[str, int],
    ) -> None:
        graph = inference.graph
        self.spec = graph.spec
        self.code = code
        self.trimmed_tokens = trimmed
        self.outputs = [name for name, _, _ in chosen]
        self.returns = returns
        self.nodes = [n for n in order if not graph.nodes[n].is_input]
        info = []
        for index, (key, out) in enumerate(graph.features.items()):
            t = inference.types[out.node]
            t = t[out.port] if out.port is not None else t
            info.append(
                {"name": key, "module": out.node, "num_chs": t.channels, "reduction": t.stride(), "index": index}
            )
        names = list(graph.features)
        selected = [names.index(n) for n in self.outputs] if returns == "list" else range(len(names))
        self.feature_info = FeatureInfo(info, selected)
        self._inference = inference

    @property
    def inference(self) -> Inference:
        """The static analysis this model was compiled from (types, constraints, accepted sizes)."""
        return self._inference

    def _reject(self, x: Any) -> None:
        """Raise a :class:`ShapeError` explaining why ``forward`` cannot take ``x`` (called only on failure)."""
        spec = self.spec
        shape = tuple(x.shape)
        if x.ndim != 4:
            raise ShapeError(
                f"'{spec.name}' takes a 4-d image batch [B, {spec.input.channels}, H, W], got shape {list(shape)}",
                node=spec.input.name,
                hint="add a batch dimension with x.unsqueeze(0)" if x.ndim == 3 else None,
            )
        self._inference.check(shape[2], shape[3], channels=shape[1])
        raise ShapeError(f"input of shape {list(shape)} rejected", node=spec.input.name)  # pragma: no cover

    def _reject_single(self, x: Any) -> None:
        """Raise the :class:`ShapeError` of a training batch of one image whose map is 1x1 at a BatchNorm."""
        graph = self._inference.graph
        h, w = x.shape[-2], x.shape[-1]
        for name in self.nodes:
            node = graph.nodes[name]
            t = self._inference.types[name]
            values = t.values() if isinstance(t, dict) else (t,)
            if type(node.spec).batch_norm and any(v.shape({"H": h, "W": w}, 1)[2:] == (1, 1) for v in values):
                raise ShapeError(
                    f"in training, a batch of one {h}x{w} image leaves node '{name}' ({node.op}) a 1x1 map: its "
                    "BatchNorm would see one value per channel and cannot compute batch statistics",
                    pos=graph.pos(node.path),
                    node=name,
                    hint="train with a batch of 2 or more or with larger images, or call model.eval()",
                )
        raise ShapeError(f"input of shape {list(x.shape)} rejected in training", node=self.spec.input.name)

    def shared_modules(self) -> list[str]:
        """Qualified names of the shared modules this model uses."""
        graph = self._inference.graph
        names: set[str] = set()
        for n in self.nodes:
            for q in graph.nodes[n].shared.values():
                names.update([q] if isinstance(q, str) else q)
        return sorted(names)

    def macs(self, input_size: tuple[int, int] | None = None, batch: int = 1) -> dict[str, int]:
        """Multiply-accumulates per node (and ``"total"``) for one forward at ``input_size``, counted by
        ``torch.utils.flop_counter`` on a meta-device replica (no memory, no compute). A node's count includes the
        shared modules it calls; a shared module's own entry is the sum over its users. Only matrix products and
        convolutions count (torch's convention): norms, activations, pooling and resizing are free."""
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        from blockgraph.compiler.codegen import compile_model

        h, w = input_size or self.spec.input.size
        self._inference.check(h, w)
        replica = compile_model(self._inference, outputs=self.outputs if self.returns != "tensor" else None,
                                features_only=self.returns == "list", device="meta").eval()  # fmt: skip
        counter = FlopCounterMode(display=False, depth=None)
        with counter, torch.no_grad():
            replica(torch.empty(batch, self.spec.input.channels, h, w, device="meta"))
        counts = counter.get_flop_counts()
        root = type(replica).__name__
        out = {}
        for name in [*self.shared_modules(), *self.nodes]:
            out[name] = sum(counts.get(f"{root}.{name}", {}).values()) // 2
        out["total"] = counter.get_total_flops() // 2
        return out

    def node_types(self) -> dict[str, TensorType | dict[str, TensorType]]:
        return {n: self._inference.types[n] for n in self.nodes}

    def summary(self, input_size: tuple[int, int] | None = None, batch: int = 1, macs: bool = True) -> str:
        """A table of every node: name, op, output type (symbolic) and shape at ``input_size``, parameters, and
        multiply-accumulates (see :meth:`macs`)."""
        graph = self._inference.graph
        h, w = input_size or self.spec.input.size
        counts = self.macs((h, w), batch) if macs else {}
        rows = []
        for qualified in self.shared_modules():
            module = self.get_submodule(qualified)
            rows.append(
                [
                    qualified,
                    f"{graph.shared[qualified].spec.op} (shared)",
                    "",
                    "",
                    _params(module),
                    _macs(counts, qualified),
                ]
            )
        for name in self.nodes:
            node = graph.nodes[name]
            t = self._inference.types[name]
            types = {"": t} if isinstance(t, TensorType) else {f"{p}: ": pt for p, pt in t.items()}
            for i, (label, pt) in enumerate(types.items()):
                shape = pt.shape({"H": h, "W": w}, batch=batch)
                concrete = _shape(shape)
                if name in self.trimmed_tokens:  # computed: the first k tokens only
                    concrete = f"{_shape((batch, self.trimmed_tokens[name], shape[2]))} (of {shape[1]} tokens)"
                params = _params(self.get_submodule(name)) if i == 0 else ""
                first = i == 0
                rows.append([name if first else "", node.op if first else "", f"{label}{pt}", concrete, params,
                             _macs(counts, name) if first else ""])  # fmt: skip
        total = sum(p.numel() for p in self.parameters())
        header = ["node", "op", "type", f"shape @ {batch}x{h}x{w}", "params", "MACs"]
        table = format_table(header, rows, right={4, 5})
        totals = f"{total:,} parameters"
        if counts:
            totals += f", {counts['total']:,} MACs ({counts['total'] / 1e9:.2f} G) at {batch}x{h}x{w}"
        return f"{table}\n\n{self.spec.name}: {totals}, outputs: {', '.join(self.outputs)}"


def _params(module: nn.Module) -> str:
    return f"{sum(p.numel() for p in module.parameters()):,}"


def _macs(counts: dict[str, int], name: str) -> str:
    return f"{counts[name]:,}" if name in counts else ""


def _shape(shape: Any) -> str:
    return "x".join(str(d) for d in shape) if shape else ""
