"""Static shape inference: every node's output type as expressions of the input size, and the sizes accepted.

Each block's shape rule (``BlockSpec.infer``) receives an :class:`InferContext`, its inputs' types, and returns its
output type; it reports what it needs of the input size through ``ctx.require*`` (kept as constraints, checked
for a concrete size or solved into the set of accepted sizes) and what is wrong through ``ctx.fail``. Nothing here
knows about particular ops.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

from blockgraph.errors import BlockgraphError, Pos, ShapeError, raise_all
from blockgraph.graph.build import Graph, Node
from blockgraph.spec.plugins import custom_code
from blockgraph.spec.schema import BlockSpec
from blockgraph.types import Acceptance, Constraint, Expr, TensorType, solve

SYMBOLS = ("H", "W")


@dataclass(frozen=True)
class NodeConstraint:
    """A condition on the input size that one node needs, with what to say when it fails."""

    constraint: Constraint
    node: str
    message: str
    pos: Pos
    hint: str | None = None


@dataclass
class Inference:
    """The result of :func:`infer`: types per node, constraints, and the accepted input sizes."""

    graph: Graph
    types: dict[str, TensorType]
    constraints: list[NodeConstraint]
    acceptance: Acceptance

    def check(self, height: int, width: int, channels: int | None = None) -> None:
        """Check one concrete input size.

        Raises:
            ShapeError: (one per failing node) naming the node, the condition and the sizes that would work.
        """
        spec = self.graph.spec
        errors: list[BlockgraphError] = []
        if channels is not None and channels != spec.input.channels:
            errors.append(
                ShapeError(
                    f"the input has {channels} channels, the model takes {spec.input.channels}",
                    pos=self.graph.pos(("input", "channels")),
                    node=spec.input.name,
                    hint=f"pass an input of shape {spec.input.channels}x{height}x{width}, or change `input.channels`",
                )
            )
        env = {"H": height, "W": width}
        failing: dict[tuple[str, int, int, str], list[NodeConstraint]] = {}
        nodes_seen: set[str] = set()
        for item in self.constraints:
            if item.constraint.holds(env) or item.node in nodes_seen:
                continue
            nodes_seen.add(item.node)
            # Repeated blocks fail alike: one error per place in the spec and condition, naming the first node.
            where = (item.pos.file, item.pos.line, item.pos.column, str(item.constraint))  # not the repetition
            failing.setdefault(where, []).append(item)
        for items in failing.values():
            item = items[0]
            value = item.constraint.expr.evaluate(env)
            more = len(items) - 1
            others = f" (and {more} more block{'s' if more > 1 else ''} from this line)" if more else ""
            errors.append(
                ShapeError(
                    f"input {height}x{width}: {item.message} ({item.constraint} does not hold: "
                    f"{item.constraint.expr} = {value}){others}",
                    pos=item.pos,
                    node=item.node,
                    hint=self.accepted_hint(height, width, item.hint),
                )
            )
        raise_all(errors)

    def accepted_hint(self, height: int, width: int, extra: str | None = None) -> str:
        parts = [extra] if extra else []
        parts.append(f"this model accepts {self.acceptance.text()}")
        suggestions = []
        for symbol, value in zip(SYMBOLS, (height, width), strict=True):
            size_set = self.acceptance.sizes.get(symbol)
            if size_set is not None and not size_set.contains(value):
                below, above = size_set.nearest(value)
                options = [str(v) for v in (below, above) if v is not None]
                if options:
                    suggestions.append(f"{symbol} = {' or '.join(options)}")
        if suggestions:
            parts.append("nearest: " + ", ".join(suggestions))
        return "; ".join(parts)

    def shape(self, node: str, height: int, width: int, batch: int = 1) -> tuple[int, ...]:
        return self.types[node].shape({"H": height, "W": width}, batch=batch)

    def inputs(self, node: str) -> list[TensorType]:
        """The types a node receives, in ``from`` order (a port's type where an edge reads one)."""
        return [_port(self.graph, edge, self.types[edge.src]) for edge in self.graph.in_edges(node)]


class InferContext:
    """What a shape rule sees: its node, its spec position, and ways to fail or to require."""

    def __init__(self, graph: Graph, node: Node, sink: list[NodeConstraint], owner: str | None = None):
        self.graph = graph
        self.node = node
        self.spec: BlockSpec = node.spec  # type: ignore[assignment]
        self._sink = sink
        self._label = node.name if owner is None else owner

    # -- positions

    def pos(self, field_name: str | None = None) -> Pos:
        """The position of one of the block's fields (or of the block)."""
        path = self.node.path + ((field_name,) if field_name else ())
        if field_name and path not in self.graph.source.values:
            path = self.node.path + ("op",)
        return self.graph.pos(path)

    # -- failing

    def fail(self, message: str, *, field: str | None = None, hint: str | None = None) -> NoReturn:
        """Stop: the block cannot take these inputs."""
        raise ShapeError(message, pos=self.pos(field), node=self._label, hint=hint)

    def expect(
        self,
        x: TensorType,
        *,
        layout: Literal["image", "tokens", "vector"] | tuple[str, ...] | None = None,
        channels: int | None = None,
        extra: int | None = None,
        field: str | None = None,
        what: str = "input",
    ) -> None:
        """Check an input's layout, channel count and extra-token count, failing with a standard message."""
        layouts = (layout,) if isinstance(layout, str) else layout
        op = self.spec.op
        if layouts is not None and x.layout not in layouts:
            self.fail(
                f"op '{op}' takes {' or '.join(layouts)} as its {what}, got {x.layout} {x}",
                field="from",
                hint=_layout_hint(x.layout, layouts),
            )
        if channels is not None and x.channels != channels:
            self.fail(
                f"{what} has {x.channels} channels but `{field or 'dim'}` is {channels}",
                field=field or "dim",
                hint=f"set `{field or 'dim'}: {x.channels}`, or feed it a block with {channels} channels",
            )
        if extra is not None and x.extra != extra:
            self.fail(
                f"op '{op}' expects {extra} extra token(s) (cls) in its {what}, got {x.extra}",
                field="from",
                hint="insert or remove the cls token before this block (insert_cls_token / remove_cls_token)",
            )

    def divides(self, total: int, parts: int, *, field: str, what: str, of: str = "dim") -> None:
        """Fail unless ``parts`` divides ``total`` (heads into a width, groups into channels), hinting the counts
        that would."""
        if total % parts:
            divisors = [d for d in range(1, min(total, 64) + 1) if total % d == 0]
            self.fail(
                f"{of} {total} is not divisible by {field} {parts}",
                field=field,
                hint=f"{what} counts that divide {total}: {', '.join(map(str, divisors))}",
            )

    # -- constraints on the input size

    def require(
        self,
        constraint: Constraint,
        message: str,
        *,
        field: str | None = None,
        hint: str | None = None,
    ) -> None:
        """Record that the input size must satisfy ``constraint`` (fails now if it can never hold)."""
        if not constraint.expr.symbols:
            if not constraint.holds({}):
                self.fail(f"{message} ({constraint} never holds)", field=field, hint=hint)
            return
        self._sink.append(NodeConstraint(constraint, self._label, message, self.pos(field), hint))

    def positive(self, size: Expr, what: str, *, field: str | None = None) -> Expr:
        """Require ``size >= 1`` (a map that is not empty) and return it."""
        self.require(Constraint.ge(size, 1), f"{what} would be empty", field=field)
        return size

    def conv_out(
        self, size: Expr, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1, *, field: str | None = None
    ) -> Expr:
        """Output size of a convolution or pooling along one axis: ``(size + 2p - d(k-1) - 1)//s + 1``, required to be
        at least 1."""
        effective = dilation * (kernel - 1) + 1
        self.require(
            Constraint.ge(size + 2 * padding, effective),
            f"the map ({size}) is smaller than the kernel window {effective}",
            field=field,
        )
        return (size + 2 * padding - effective) // stride + 1

    def conv2d(
        self, x: TensorType, kernel: int, stride: int = 1, padding: int | None = None, *, field: str | None = None
    ) -> tuple[Expr, Expr]:
        """The output grid of a square convolution on ``x``'s grid (padding default: ``(kernel - 1) // 2``)."""
        assert x.grid is not None
        pad = (kernel - 1) // 2 if padding is None else padding
        return (
            self.conv_out(x.grid[0], kernel, stride, pad, field=field),
            self.conv_out(x.grid[1], kernel, stride, pad, field=field),
        )

    # -- shared modules

    def shared(self, field_name: str) -> SharedCall:
        """The shared module named by one of the block's fields, to apply its shape rule to a type."""
        qualified = self.node.shared[field_name]
        assert isinstance(qualified, str), f"field '{field_name}' names several shared modules: use shared_list()"
        return SharedCall(self, qualified)

    def shared_list(self, field_name: str) -> list[SharedCall]:
        """The shared modules named by a list field, in order."""
        qualified = self.node.shared[field_name]
        return [SharedCall(self, q) for q in ([qualified] if isinstance(qualified, str) else qualified)]


def _layout_hint(found: str, wanted: tuple[str, ...]) -> str | None:
    if found == "image" and "tokens" in wanted:
        return "put a map_to_tokens block (or a patch embedding) before it"
    if found == "tokens" and "image" in wanted:
        return "put a tokens_to_map block before it (remove_cls_token first if the tokens carry a cls token)"
    return None


@dataclass
class SharedCall:
    """A shared module seen from one of its users' shape rules."""

    user: InferContext
    name: str

    @property
    def spec(self) -> BlockSpec:
        return self.user.graph.shared[self.name].spec

    def infer(self, *inputs: TensorType) -> TensorType:
        shared = self.user.graph.shared[self.name]
        node = Node(self.name, shared.spec, shared.path, index=-1)
        ctx = InferContext(self.user.graph, node, self.user._sink, owner=f"{self.user._label}' via shared '{self.name}")
        try:
            with custom_code(shared.spec, self.name, ctx.pos(), "its shape rule"):
                return shared.spec.infer(ctx, *inputs)
        except ShapeError as e:
            e.hint = (e.hint + "; " if e.hint else "") + f"the shared module is used by block '{self.user.node.name}'"
            raise


def infer(graph: Graph) -> Inference:
    """Infer every node's output type, symbolic in the input size (H, W).

    Raises:
        ShapeError: a block's rule rejects its inputs (channel mismatch, wrong layout, a size that can never work).
    """
    spec = graph.spec
    types: dict[str, TensorType] = {}
    sink: list[NodeConstraint] = []
    h, w = Expr.sym("H"), Expr.sym("W")
    declared = spec.input_specs()
    for node in graph:
        if node.is_input:
            given = declared[node.name]
            types[node.name] = TensorType.mask(h, w) if given.kind == "mask" else TensorType.image(given.channels, h, w)
            node.meta["type"] = types[node.name]
            continue
        inputs = [_port(graph, edge, types[edge.src]) for edge in graph.in_edges(node.name)]
        ctx = InferContext(graph, node, sink)
        if any(t.layout == "mask" for t in inputs) and not type(node.spec).takes_masks:
            ctx.fail(
                f"op '{node.op}' does not take a padding mask",
                field="from",
                hint="a mask input goes to a block that reads one (`deformable_encoder`: `from: [..., mask]`)",
            )
        with custom_code(node.spec, node.name, ctx.pos(), "its shape rule"):  # type: ignore[arg-type]
            result = node.spec.infer(ctx, *inputs)  # type: ignore[union-attr]
            ports = node.spec.output_ports()  # type: ignore[union-attr]
            if ports is not None and not (isinstance(result, Mapping) and tuple(result) == ports):
                found = f"ports {list(result)}" if isinstance(result, Mapping) else type(result).__name__
                raise TypeError(f"the shape rule returned {found}, but output_ports() is {list(ports)}")
        types[node.name] = result
        node.meta["type"] = result
    acceptance = solve([c.constraint for c in sink], SYMBOLS)
    inference = Inference(graph, types, sink, acceptance)
    _check_tied(graph, inference)
    _check_outputs(graph, inference)
    return inference


def _check_tied(graph: Graph, inference: Inference) -> None:
    """The parts of every ``use`` of one shared block call one module: they must receive inputs of the same layout,
    channels and extra tokens (the module was built for those); the sizes may differ (a head shared by the levels of
    a feature pyramid)."""

    def kind(t: TensorType) -> tuple[Any, ...]:
        return (t.layout, t.channels, t.extra, len(t.levels))

    first: dict[str, str] = {}
    errors: list[BlockgraphError] = []
    for node in graph:
        if node.module is None:
            continue
        other = first.setdefault(node.module, node.name)
        got, expected = inference.inputs(node.name), inference.inputs(other)
        if other != node.name and list(map(kind, got)) != list(map(kind, expected)):
            errors.append(
                ShapeError(
                    f"the shared block's part '{node.module}' gets {', '.join(map(str, got))} here but "
                    f"{', '.join(map(str, expected))} in '{other}': one module cannot take both",
                    pos=graph.pos(node.path),
                    node=node.name,
                    hint="every `use` of a shared block must give it inputs of the same channels and layout",
                )
            )
    raise_all(errors)


def _port(graph: Graph, edge: Any, value: Any) -> TensorType:
    """What ``edge`` reads of its source's ``value``: all of it, or the output port it names."""
    if edge.out is None:
        return value
    if isinstance(value, Mapping) and edge.out in value:
        return value[edge.out]
    src = graph.nodes[edge.src]
    ports = ", ".join(value) if isinstance(value, Mapping) else "none (it has a single output)"
    dst = graph.nodes[edge.dst]
    raise ShapeError(
        f"'{edge.src}' has no output port '{edge.out}'",
        pos=graph.pos(dst.path + ("from",)),
        node=dst.name,
        hint=f"output ports of '{src.name}' ({src.op}): {ports}",
    )


def _check_outputs(graph: Graph, inference: Inference) -> None:
    errors: list[BlockgraphError] = []
    for out in (*graph.outputs.values(), *graph.features.values()):
        value = inference.types[out.node]
        ports = list(value) if isinstance(value, Mapping) else []
        if out.port is None and ports:
            message = (
                f"'{out.node}' has several outputs; name one of them: {', '.join(f'{out.node}.{p}' for p in ports)}"
            )
        elif out.port is not None and out.port not in ports:
            message = f"'{out.node}' has no output port '{out.port}'"
        else:
            continue
        errors.append(
            ShapeError(
                message,
                pos=graph.pos(out.path + ("from",)),
                node=out.name,
                hint=f"ports of '{out.node}': {', '.join(ports) or 'none (it has a single output)'}",
            )
        )
    raise_all(errors)
    for out in graph.features.values():
        t = inference.types[out.node]
        if isinstance(t, Mapping):
            t = t[out.port]
        if t.layout not in ("image", "tokens"):
            errors.append(
                ShapeError(
                    f"feature '{out.name}' must be a map, but '{out.node}' gives {t}",
                    pos=graph.pos(out.path + ("from",)),
                    node=out.node,
                )
            )
            continue
        stride = t.stride()
        if out.spec.stride is not None and stride != out.spec.stride:
            errors.append(
                ShapeError(
                    f"feature '{out.name}' declares stride {out.spec.stride}, but '{out.node}' has stride "
                    f"{stride if stride is not None else 'that is not an integer'} ({t})",
                    pos=graph.pos(out.path + ("stride",)),
                    node=out.node,
                    hint=f"write `stride: {stride}`" if stride else None,
                )
            )
    raise_all(errors)
