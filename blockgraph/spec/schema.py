"""The spec language's pydantic models, the block registry, and translation of validation errors.

A block type is a subclass of :class:`BlockSpec` whose ``op`` field is a one-value ``Literal``; registering it (the
:func:`register` decorator) adds it to the discriminated union that stage and model ``blocks`` lists accept. The
models for stages and the model itself are built from the registry on demand, so a block registered by user code
is accepted exactly like a built-in one.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import re
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PositiveInt,
    Tag,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from blockgraph.errors import MAX_REPORTED, BlockgraphError, Pos, SpecError, excerpt, more_errors, raise_all
from blockgraph.spec import patterns
from blockgraph.spec.expand import Expanded, SourceMap

if TYPE_CHECKING:
    from blockgraph.graph.infer import InferContext
    from blockgraph.types import TensorType

Name = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=64)]
"""A node, stage, shared-module or output name: a Python-style identifier."""
BlockName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[0-9]+)?$", max_length=64)]
"""A block's name; ``depth: N`` names its repetitions ``name.0`` ... ``name.N-1``."""
MAX_SIZE = 1_000_000
"""The largest input height, width or channel count a spec or a command may ask for (and the largest batch): past
it, no model here could allocate one activation."""
Size = Annotated[int, Field(gt=0, le=MAX_SIZE)]
"""An input's height, width or channel count: 1 to :data:`MAX_SIZE`."""
Ref = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$", max_length=256)]
"""A reference to a node (``stage2.blocks``), a node's output port, or a model input."""


class SpecModel(BaseModel):
    """Base of every spec model: unknown keys rejected, values immutable; field docstrings become descriptions
    when something reads them (:func:`describe_fields`)."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, protected_namespaces=(), allow_inf_nan=False
    )


_DESCRIBED: set[type[BaseModel]] = set()


def _attribute_docstrings(cls: type) -> dict[str, str]:
    """``{field: docstring}`` for the string literals that follow annotated assignments in the body of ``cls``."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):  # made at run time (create_model), or no source file
        return {}
    body = ast.parse(textwrap.dedent(source)).body
    if not body or not isinstance(body[0], ast.ClassDef):
        return {}
    statements = body[0].body
    docs = {}
    for stmt, after in zip(statements, statements[1:], strict=False):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


def describe_fields() -> None:
    """Give every spec model's fields without a description their docstring (the string under the field), for the
    generated docs, the JSON Schema and error hints.

    Done when first needed rather than at import (pydantic's ``use_attribute_docstrings``): reading and parsing the
    source of every block class is about 100 ms, a fifth of a ``validate`` process that never shows them.
    """
    pending, stack = [], [SpecModel]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls not in _DESCRIBED:
            pending.append(cls)
    if not pending:
        return
    docs: dict[type, dict[str, str]] = {}
    for cls in pending:
        for name, info in cls.model_fields.items():
            if info.description:
                continue
            # The nearest class that declares the field with a docstring (a subclass may redeclare a default only).
            for owner in (c for c in cls.__mro__ if name in getattr(c, "__annotations__", {})):
                if owner not in docs:
                    docs[owner] = _attribute_docstrings(owner)
                if name in docs[owner]:
                    info.description = docs[owner][name]
                    break
    # A model's schema embeds the schemas of the models in its fields: rebuild those first.
    done: set[type] = set()

    def rebuild(cls: type[BaseModel]) -> None:
        if cls in done:
            return
        done.add(cls)
        for info in cls.model_fields.values():
            for inner in _models_in(info.annotation):
                rebuild(inner)
        cls.model_rebuild(force=True)

    for cls in pending:
        rebuild(cls)
    _DESCRIBED.update(pending)
    _CACHE.clear()  # the unions of block types are made again from the rebuilt members


def _models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    """The spec models named anywhere in a field's type (``list[RenameRule] | None`` → RenameRule)."""
    if isinstance(annotation, type) and issubclass(annotation, SpecModel):
        yield annotation
    for arg in get_args(annotation):
        yield from _models_in(arg)


@dataclass(frozen=True)
class Shared:
    """Marks a field as a reference, by name, to a shared module of one of ``ops``."""

    ops: tuple[str, ...]


def shared_ref(*ops: str) -> Any:
    """The type of a field that names a shared module (``cpe: shared_ref("conv_pos_enc")``)."""
    return Annotated[str, Shared(ops), Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.]*$")]


def shared_refs(*ops: str) -> Any:
    """The type of a field that names several shared modules, one per input (``cpes: [stage2.cpe, stage3.cpe]``)."""
    name = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.]*$")]
    return Annotated[list[name], Shared(ops), Field(min_length=1)]  # type: ignore[valid-type]


class BlockSpec(SpecModel):
    """Base of every block's params model.

    A subclass declares ``op: Literal["its_name"]``, its parameters as fields, and implements:

    * ``infer(ctx, *inputs) -> TensorType``: the shape rule (pure Python, no torch), and
    * ``build(ctx, *inputs) -> nn.Module``: the module, given the inputs' static types.

    Shared modules (declared under ``shared:``) implement ``build(ctx)`` from their params alone; users reach them
    through ``ctx.shared(field)`` in ``infer``, and receive them as keyword arguments in ``forward``.
    """

    op: str
    name: BlockName | None = None
    """The node's name; state_dict keys and error messages use it. Defaults to the op."""
    from_: Ref | list[Ref] | None = Field(default=None, alias="from")
    """Where the inputs come from: node names (``stage2.to_map``), ``node.port``, or a model input. Defaults to the
    previous block."""

    arity: ClassVar[int | None] = 1
    """How many inputs the block takes (None: any number, at least one)."""
    needs_size: ClassVar[bool] = False
    """Whether ``forward`` takes the token grid ``(h, w)`` of each input, passed after the inputs (see
    :meth:`takes_size`)."""
    batch_norm: ClassVar[bool] = False
    """Whether the module normalizes with batch statistics (BatchNorm) at its output's grid: in training, a batch of
    one image whose map there is 1x1 (or a vector) leaves one value per channel, which BatchNorm cannot normalize;
    the compiled forward rejects that case with a ShapeError naming the node. A block whose fields decide it
    overrides :meth:`uses_batch_norm` instead."""
    classifiers: ClassVar[tuple[str, ...]] = ()
    """For a classifier head: the attribute names of its module's final classifier(s) (``nn.Linear``, or
    ``nn.Identity`` for 0 classes), whose width is its ``num_classes`` field; its module's forward takes
    ``pre_logits`` (stop before them). The model's ``get_classifier``, ``reset_classifier`` and ``forward_head``
    use them (a ``classifier`` op is a classifier of its own)."""
    no_weight_decay: ClassVar[tuple[str, ...]] = ()
    """Regular expressions over the names of the module's parameters (``token``, ``attn\\.relative_position_bias_table``)
    that an optimizer should not decay: the model's ``no_weight_decay()`` gathers them (timm's convention: tokens,
    position embeddings, relative-position tables, level embeddings)."""
    dropout_rate_field: ClassVar[str | None] = None
    """For a dropout block: the field holding its rate (what ``create_model(drop_rate=...)`` sets in front of a
    classifier)."""
    is_classifier: ClassVar[bool] = False
    """Whether the block *is* a model's classifier (its module is the ``nn.Linear``, or the identity for 0 classes:
    the ``classifier`` op), rather than a head block holding :attr:`classifiers`."""
    takes_masks: ClassVar[bool] = False
    """Whether the block reads a padding mask (a model input of ``kind: mask``, type ``mask[H, W]``) among its
    inputs, which may then be None at run time (an optional mask the caller left out); other blocks are refused
    one statically."""
    takes_act: ClassVar[bool] = False
    """Whether the module's forward takes ``act=`` (an activation module) and returns ``act(its output)``: the
    compiler passes it the activation node that alone reads this node's output (one whose :meth:`fusable` holds), so
    that an inference kernel may apply it in its epilogue (a convolution's or a linear layer's)."""
    takes_residual: ClassVar[bool] = False
    """Whether the module's forward takes ``residual=`` and ``scale=`` (a tensor to add, per-channel factors) and
    returns ``residual + scale * its output``: the compiler passes them for a residual branch that ends in this node,
    then only blocks that :meth:`passes_residual_branch`, then an add that :meth:`joins_residual` (in eager
    inference, oneDNN's epilogue adds the residual, the scale folded into the weights)."""
    trims_tokens: ClassVar[bool] = False
    """Whether ``build`` honours ``ctx.keep_tokens``: a module that returns only the first ``keep_tokens`` tokens of
    its output. The compiler asks for it when every reader of the node reads only those (:meth:`reads_tokens`), so
    that work whose result nothing reads is not done (ViT's last block computes the cls token alone); the node's
    static type still describes the full output. Such a module's forward takes ``full=True`` to compute every
    token all the same (``forward_features`` returns them)."""

    def fusable(self) -> bool:
        """Whether the block is an activation that may ride along the call of the node it reads, when that one
        :attr:`takes_act` and nothing else reads it (the ``act`` op, but for a kind with parameters)."""
        return False

    def passes_residual_branch(self) -> bool:
        """Whether the block may lie between a layer that :attr:`takes_residual` and the add of a residual branch:
        in eval, a per-channel scale of its input (``layer_scale``: ``gamma``) or the identity (dropout, drop path)."""
        return False

    def joins_residual(self, inputs: int) -> bool:
        """Whether the block, with this many inputs, is the plain sum of two of one type (a residual's add)."""
        return False

    def takes_size(self, *inputs: TensorType) -> bool:
        """Whether ``forward`` takes the token grid ``(h, w)`` of each input, for these inputs: the class's
        :attr:`needs_size` by default; a block whose module needs the grid for some inputs only (an einops pattern
        whose lengths come from the grid, attention whose keys are reduced on the map) decides here. The compiler asks
        this, never the class attribute."""
        return type(self).needs_size

    def output_ports(self) -> tuple[str, ...] | None:
        """Names of the outputs of a multi-output block (``forward`` returns a tuple in this order); None for a
        block with one output. Others read a port as ``from: node.port``."""
        return None

    def pools_globally(self) -> bool:
        """Whether the block pools a map or tokens into one vector (a global pool): ``reset_classifier(0, "")``
        takes it out of a head."""
        return False

    def uses_batch_norm(self) -> bool:
        """Whether this block's module normalizes with batch statistics at its output (see :attr:`batch_norm`, the
        default); what the compiler asks."""
        return self.batch_norm

    def reads_tokens(self, x: TensorType) -> int | None:
        """How many leading tokens of its one input ``x`` the block reads (a head on the cls token: 1), or None, the
        default: all of them, or unknown. A count at most ``x.extra`` lets a block before it that ``trims_tokens``
        compute those tokens only."""
        return None

    def infer(self, ctx: InferContext, *inputs: TensorType) -> TensorType | dict[str, TensorType]:
        raise NotImplementedError(f"{type(self).__name__} has no shape rule")

    def build(self, ctx: Any, *inputs: TensorType) -> Any:
        raise NotImplementedError(f"{type(self).__name__} has no module")

    def params(self, *inputs: TensorType) -> int | None:
        """How many parameters the module ``build`` makes for these inputs has (shared modules count where they are
        declared), in plain arithmetic (``blockgraph.blocks.count``), so that budgets and ``validate`` know a
        model's size before any tensor exists. ``None`` (the default for a custom block): unknown, and the budget
        check builds this one block on the meta device to count it."""
        return None

    @classmethod
    def op_name(cls) -> str:
        """The op this class is registered under: the one value of its ``op: Literal[...]``."""
        annotation = cls.model_fields["op"].annotation
        values = get_args(annotation) if get_origin(annotation) is Literal else ()
        if len(values) != 1 or not isinstance(values[0], str):
            raise TypeError(f"{cls.__name__}.op must be annotated Literal['op_name'] (one string)")
        return values[0]

    def fields(self, *exclude: str) -> dict[str, Any]:
        """The block's parameters by name (not ``op``, ``name``, ``from``, references to shared modules, nor
        ``exclude``): its module is built with keyword arguments named as the fields."""
        skip = {"op", "name", "from_", *self.shared_fields(), *exclude}
        return {k: getattr(self, k) for k in type(self).model_fields if k not in skip}

    @classmethod
    def shared_fields(cls) -> dict[str, Shared]:
        """The fields that name shared modules, with the ops each accepts."""
        return {
            name: meta for name, info in cls.model_fields.items() for meta in info.metadata if isinstance(meta, Shared)
        }


_REGISTRY: dict[str, type[BlockSpec]] = {}
_CACHE: dict[str, Any] = {}


def register(cls: type[BlockSpec]) -> type[BlockSpec]:
    """Class decorator: make a block type usable from specs under its ``op`` name."""
    op = cls.op_name()
    if not re.fullmatch(r"[a-z][a-z0-9_]*", op):
        raise TypeError(f"op name {op!r} must be snake_case")
    existing = _REGISTRY.get(op)
    if existing is not None and (existing.__module__, existing.__qualname__) != (cls.__module__, cls.__qualname__):
        raise TypeError(
            f"op '{op}' is already registered by {existing.__module__}.{existing.__qualname__}, not by "
            f"{cls.__module__}.{cls.__qualname__}: rename one of the ops, or import the module under one name only"
        )
    _REGISTRY[op] = cls
    _CACHE.clear()
    return cls


def unregister(op: str) -> None:
    """Remove a block type (for tests and plugin reloading); unknown ops are ignored."""
    if _REGISTRY.pop(op, None) is not None:
        _CACHE.clear()


def registered() -> dict[str, type[BlockSpec]]:
    """The block types registered now, by op name (a copy); :func:`blockgraph.spec.plugins.registry` loads the
    installed plugins first."""
    return dict(sorted(_REGISTRY.items()))


class CompositeBase(BlockSpec):
    """A block made of blocks: a use of a block defined in the spec (``define:``), or one written inline.

    Its blocks run as a sub-graph: the first reads the block's inputs, each later one the block before it unless its
    ``from:`` names others (the sub-graph's blocks and ``inputs``, by their local names). Its value is its
    ``output`` (default: the last block), or several named ``outputs``. Its blocks' modules nest under its name
    (``stage1.blocks.0.mlp.fc1``); its shape and parameter count are those of its parts.
    """

    op: Literal["block"]
    define: str | None = None
    """The defined block this is a use of (set when a use is expanded; none for a block written inline)."""
    args: dict[str, Any] = {}
    """The use's parameter values, for the record (they are already substituted into ``blocks``)."""
    inputs: list[Name] = Field(default=["x"], min_length=1)
    """The local names of the block's inputs, as its blocks read them (``from: x``)."""
    output: Ref | None = None
    """The block (local name) whose value is this block's value; default: the last block."""
    outputs: dict[Name, Ref] = {}
    """Several named outputs instead of ``output``: ``{port: block}``; others read them as ``from: NAME.port``."""

    arity: ClassVar[int | None] = None

    def output_ports(self) -> tuple[str, ...] | None:
        return tuple(self.outputs) or None

    @property
    def label(self) -> str:
        """What the block is, for people: the defined block's name, or ``block``."""
        return self.define or self.op

    if TYPE_CHECKING:
        blocks: list[BlockSpec]


@register
class UseSpec(BlockSpec):
    """A shared block made of blocks (a defined block declared under ``shared:``), applied here: its blocks run on
    this node's inputs with the weights of the shared declaration, one set for every ``use`` of it (weight tying, as
    in recurrent or Siamese networks). Its parts are nodes named under this one (``a.mlp``); their modules live under
    the shared name (``mixer.mlp.fc1.weight``, once in the state_dict). Every use must give the parts the same input
    types."""

    op: Literal["use"]
    module: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.]*$")]
    """The shared block to apply: a name under ``shared:`` (of the path, the stage, or the model, looked up in that
    order) whose op is a block defined in the spec."""

    arity: ClassVar[int | None] = None


# ------------------------------------------------------------------------------------------------- fixed spec models


class InputSpec(SpecModel):
    """A model input: an image batch ``[B, channels, H, W]``, or a padding mask ``[B, H, W]`` (booleans, True where
    the image is padding, at the image's size: a detection batch's images padded to one size)."""

    name: Name = "image"
    """The input's name: the generated ``forward``'s argument, and a reference blocks can read (``from: image``)."""
    kind: Literal["image", "mask"] = "image"
    """`image`, or `mask`: a padding mask of the image (only blocks that take one may read it)."""
    channels: Size = 3
    """Channels of the image."""
    size: tuple[Size, Size] = (224, 224)
    """The default (H, W): what `build` reports shapes for, and what `validate` checks when given no size (an
    image's; a mask has the image's size)."""
    optional: bool = False
    """A mask the caller may leave out (`forward(image)`, or `mask=None`): then nothing is padding."""
    memory_format: Literal["contiguous", "channels_last", "channels_last_training", "auto"] = "contiguous"
    """How the model lays the image out in memory: `channels_last` copies it on entry to channels-last (NHWC) memory
    (unless it already is), which convolutions, pools and norms keep: the same values (the kernels differ in their
    summation order only), and on the CPU faster kernels for some convolutional families (PoolFormer and MobileViT
    choose it; timm's `train.py --channels-last` does the same to a timm model). `channels_last_training` does so in
    training mode only (`model.train()`), and takes the image as given in eval mode: for a family whose training
    step gains from it but whose inference does not. `auto` does so in training mode, and in eager inference lays
    the image out as measured faster for its shape on this machine: the first call of each shape (batch, size, dtype,
    device) times the whole forward on the image in NCHW and in channels-last memory, and keeps the faster, as the
    kernels are chosen (`blockgraph.ops.autotune`; NCHW unless channels-last is 3% faster; `BLOCKGRAPH_AUTOTUNE=0`
    takes NCHW without measuring, and so does a model with forward hooks, which would see the timed calls). For a
    family whose best layout depends on the batch (InceptionNeXt: channels-last 0.13 faster at batch 8, 0.10 slower
    at batch 1). A graph torch.compile traces for inference on the CPU lays it out channels-last (it cannot time
    candidates; its convolution ops read packed weights on such maps). Other paths (autograd, export, TorchScript)
    take the image as given."""

    @model_validator(mode="after")
    def _optional_mask(self) -> InputSpec:
        if self.optional and self.kind != "mask":
            raise ValueError("only a mask input can be optional (`kind: mask`)")
        if self.memory_format != "contiguous" and self.kind != "image":
            raise ValueError("only an image input has a memory format (`kind: image`)")
        return self


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataSpec(SpecModel):
    """How the model's images are prepared (timm's data config): what ``pretrained_cfg`` reports and
    ``timm.data.resolve_data_config(model=...)`` reads. The input size is the input's."""

    interpolation: Literal["bicubic", "bilinear", "nearest"] = "bicubic"
    """Resampling when an image is resized."""
    crop_pct: Annotated[float, Field(gt=0, le=1)] = 0.875
    """The center crop's share of the resized image (eval)."""
    crop_mode: Literal["center", "squash", "border"] = "center"
    """How an image is cropped to the input size (eval)."""
    mean: tuple[float, ...] = IMAGENET_MEAN
    """Per-channel mean subtracted from the [0, 1] image."""
    std: tuple[Annotated[float, Field(gt=0)], ...] = IMAGENET_STD
    """Per-channel standard deviation the image is divided by."""
    test_input_size: tuple[PositiveInt, PositiveInt] | None = None
    """A larger (H, W) for evaluation, if the model is tested at one."""


class OutputSpec(SpecModel):
    """A named model output."""

    from_: Ref = Field(alias="from")
    """The node (or ``node.port``) whose value is returned."""
    stride: PositiveInt | None = None
    """For a feature map: its stride relative to the input; checked against the inferred shape."""


def _rename_pattern(pattern: str) -> str:
    try:
        patterns.check(pattern)
    except patterns.UnsafePatternError as e:
        raise ValueError(f"rename pattern {excerpt(pattern)} is refused: {e}") from None
    return pattern


RenamePattern = Annotated[str, AfterValidator(_rename_pattern)]
"""A regular expression matched in linear time (:mod:`blockgraph.spec.patterns`)."""


class RenameRule(SpecModel):
    """One key-rename rule: ``from`` (a regular expression) → ``to`` (its replacement, ``\\1`` for groups)."""

    from_: RenamePattern = Field(alias="from")
    """A regular expression searched in each twin key (one where the next character always decides what it does,
    so that matching is fast on any key)."""
    to: str
    """The replacement (``re.sub`` syntax: ``\\1`` for the first group), applied once."""


class TwinSpec(SpecModel):
    """The model with the same weights (a timm model, or an official checkpoint's layout), and how its state_dict
    keys map onto ours."""

    timm: str | None = None
    """timm's model name (``timm.create_model(name)``); none for a twin outside timm."""
    rename: list[
        Annotated[
            Annotated[tuple[RenamePattern, str], Tag("pair")] | Annotated[RenameRule, Tag("rule")],
            Discriminator(lambda rule: "rule" if isinstance(rule, dict | RenameRule) else "pair"),
        ]
    ] = []
    """Rules ``[pattern, replacement]`` (or ``{from: ..., to: ...}``, which ``for:`` templates can generate) applied
    to each twin key; the first rule that matches wins."""

    def rules(self) -> list[tuple[str, str]]:
        """The rules as ``(pattern, replacement)`` pairs."""
        return [(r.from_, r.to) if isinstance(r, RenameRule) else r for r in self.rename]


class StageBase(SpecModel):
    """A stage: blocks run in order (unless ``from:`` says otherwise), with shared modules of its own; then,
    optionally, parallel ``paths`` at one scale and the ``merge`` block that joins them."""

    name: Name
    """The stage's name: its blocks are named ``<stage>.<block>`` (``stage2.blocks.3``)."""


class PathBase(SpecModel):
    """One of a stage's parallel paths: its own blocks and shared modules, reading the stage's blocks."""

    name: Name
    """The path's name: its blocks are named ``<stage>.<path>.<block>``."""


class ModelBase(SpecModel):
    """A whole model spec, after expansion."""

    name: Name
    """The model's name (the compiled module's class is named after it)."""
    description: str = ""
    """One line about the model, for people."""
    variant: str | None = None
    """The variant (of ``variants:``) this spec builds; the caller's choice (``--variant``) wins."""
    input: InputSpec = InputSpec()
    """The model input (the image), when it is the only one."""
    inputs: dict[Name, InputSpec] = {}
    """Several named inputs, in the order `forward` takes them: one image and padding masks
    (`{image: {channels: 3, size: [800, 1333]}, mask: {kind: mask, optional: true}}`); instead of `input`."""
    variables: dict[str, Any] = {}
    """The variables as resolved (kept for the record)."""
    outputs: dict[Name, OutputSpec | Ref] = {}
    """Named outputs (``logits: head``); the default forward returns these."""
    features: dict[Name, OutputSpec] = {}
    """Named feature maps, with strides (``stage1: {from: stage1.to_map, stride: 4}``), for dense prediction."""
    twin: TwinSpec | None = None
    """The model with the same weights, and how its state_dict keys map onto ours (for loading its weights)."""
    data: DataSpec = DataSpec()
    """How images are prepared for the model (``pretrained_cfg``: interpolation, crop, mean, std)."""
    default_outputs: list[Name] | None = None
    """Which of ``outputs`` (or ``features``) ``forward`` returns when the caller names none; default: every
    output, or, with no outputs, every feature."""

    @model_validator(mode="before")
    @classmethod
    def _the_image_of_inputs(cls, data: Any) -> Any:
        """With ``inputs:``, ``input`` is its image (named after its key)."""
        if not (isinstance(data, dict) and isinstance(data.get("inputs"), dict) and data["inputs"]):
            return data
        if "input" in data:
            raise ValueError("give `input:` (one image) or `inputs:` (several inputs), not both")
        entries = data["inputs"]
        images = [k for k, v in entries.items() if not (isinstance(v, dict) and v.get("kind") == "mask")]
        if len(images) != 1:
            raise ValueError(
                f"`inputs:` needs exactly one image (an entry without `kind: mask`), got {len(images)}"
                + (f": {', '.join(map(str, images))}" if images else "")
            )
        image = entries[images[0]]
        return {**data, "input": {**image, "name": images[0]} if isinstance(image, dict) else image}

    @field_validator("inputs")
    @classmethod
    def _named_by_their_keys(cls, value: dict[str, InputSpec]) -> dict[str, InputSpec]:
        for key, spec in value.items():
            if "name" in spec.model_fields_set and spec.name != key:
                raise ValueError(f"input '{key}' is named by its key; remove `name: {spec.name}`")
        return {key: spec.model_copy(update={"name": key}) for key, spec in value.items()}

    def input_specs(self) -> dict[str, InputSpec]:
        """Every input by name, in the order ``forward`` takes them (the image first)."""
        if not self.inputs:
            return {self.input.name: self.input}
        return {self.input.name: self.input, **{k: v for k, v in self.inputs.items() if k != self.input.name}}

    def output_specs(self) -> dict[str, OutputSpec]:
        """``outputs`` with the short form (a bare reference) expanded."""
        return {
            k: v if isinstance(v, OutputSpec) else OutputSpec.model_validate({"from": v})
            for k, v in self.outputs.items()
        }

    if TYPE_CHECKING:
        shared: dict[str, BlockSpec]
        stages: list[Any]
        blocks: list[BlockSpec]


def model_types() -> tuple[type[ModelBase], type[StageBase]]:
    """The ModelSpec and StageSpec classes for the blocks registered now (cached until the registry changes)."""
    if "model" not in _CACHE:
        if not _REGISTRY:
            raise RuntimeError("no block types are registered (import blockgraph.blocks first)")
        composite = create_model(
            "CompositeSpec",
            __base__=CompositeBase,
            blocks=(list["Block"], Field(min_length=1, description="The blocks of the sub-graph.")),  # type: ignore[name-defined,maybe-unrecognized-str-typeform]  # noqa: F821 (resolved below)
        )
        members = (*(_REGISTRY[op] for op in sorted(_REGISTRY)), composite)
        block = Annotated[Union[members], Field(discriminator="op")]  # noqa: UP007 (a runtime tuple of members)
        composite.model_rebuild(_types_namespace={"Block": block})
        path = create_model(
            "PathSpec",
            __base__=PathBase,
            shared=(dict[Name, block], Field(default={}, description="Shared modules of this path, by name.")),
            blocks=(list[block], Field(default=[], description="The path's blocks; the first reads the stage's last.")),
        )
        stage = create_model(
            "StageSpec",
            __base__=StageBase,
            shared=(dict[Name, block], Field(default={}, description="Shared modules of this stage, by name.")),
            blocks=(list[block], Field(default=[], description="The stage's blocks.")),
            paths=(list[path], Field(default=[], description="Parallel paths at one scale.")),  # type: ignore[valid-type]
            merge=(block | None, Field(default=None, description="Joins the paths (reads each path's last block).")),
        )
        model = create_model(
            "ModelSpec",
            __base__=ModelBase,
            shared=(dict[Name, block], Field(default={}, description="Shared modules used by several blocks.")),
            stages=(list[stage], Field(default=[], description="The stages, in order.")),  # type: ignore[valid-type]
            blocks=(list[block], Field(default=[], description="Blocks after the stages (heads).")),
        )
        _CACHE["model"], _CACHE["stage"], _CACHE["path"] = model, stage, path
    return _CACHE["model"], _CACHE["stage"]


def path_type() -> type[PathBase]:
    """The PathSpec class for the blocks registered now (see :func:`model_types`)."""
    model_types()
    return _CACHE["path"]


# ----------------------------------------------------------------------------------------------------------- parsing


@dataclass
class ParsedSpec:
    """A validated spec with the map back to its source."""

    model: ModelBase
    source: SourceMap
    expanded: Expanded


def parse(expanded: Expanded) -> ParsedSpec:
    """Validate expanded spec data against the registered models.

    Raises:
        SpecError: (or an MultiError of them) one per invalid value, each at its file:line:col.
    """
    model_cls, _ = model_types()
    clashes: list[BlockgraphError] = [
        SpecError(
            f"defined block '{name}' has the name of a registered op",
            pos=pos,
            hint=f"rename it: `op: {name}` means the registered op ({_REGISTRY[name].__module__})",
        )
        for name, pos in expanded.defined.items()
        if name in _REGISTRY
    ]
    raise_all(clashes)
    try:
        model = model_cls.model_validate(expanded.data)
    except ValidationError as e:
        raise_all(_translate(e, expanded))
    return ParsedSpec(model, expanded.source, expanded)


_FIXED: dict[tuple[str, ...], type[BaseModel]] = {
    ("input",): InputSpec,
    ("twin",): TwinSpec,
}


def _value_at(data: Any, path: Sequence[Any]) -> Any:
    """The value at ``path`` of plain spec data, or None when the path does not exist."""
    node = data
    for part in path:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def _model_at(data: Any, path: Sequence[Any]) -> type[BaseModel] | None:
    """The spec model that validates the mapping at ``path`` of ``data`` (for "did you mean" on its keys)."""
    node = _value_at(data, path)
    if node is None:
        return None
    if isinstance(node, dict) and isinstance(node.get("op"), str) and node["op"] in _REGISTRY:
        return _REGISTRY[node["op"]]
    shape = tuple("#" if isinstance(p, int) else p for p in path)
    if len(shape) == 2 and shape[0] == "stages":
        return model_types()[1]
    if len(shape) == 4 and shape[0] == "stages" and shape[2] == "paths":
        return path_type()
    if len(shape) == 2 and shape[0] in ("outputs", "features"):
        return OutputSpec
    if shape == ():
        return model_types()[0]
    return _FIXED.get(tuple(path))


def _keys_of(model: type[BaseModel]) -> list[str]:
    return [info.alias or name for name, info in model.model_fields.items()]


def _translate(error: ValidationError, expanded: Expanded) -> list[BlockgraphError]:
    source, data = expanded.source, expanded.data
    out: list[BlockgraphError] = []
    seen: set[tuple[str, tuple[Any, ...]]] = set()
    items = error.errors(include_url=False)
    for index, item in enumerate(items):
        if len(out) >= MAX_REPORTED:  # (each costs a "did you mean" search: report the first ones, fast)
            out.append(more_errors(len(items) - index, out[0]))
            break
        loc, kind = tuple(item["loc"]), item["type"]
        path = source.resolve(loc)
        # A union member's errors repeat the loc with the tag inside ('constrained-str', 'list[...]'): the key is
        # the last part of the loc that the data has (an unknown or a missing key is only in the loc).
        only_in_loc = kind in ("extra_forbidden", "missing") or not path
        key = loc[-1] if loc and only_in_loc else (path[-1] if path else None)
        if (kind, path if kind != "extra_forbidden" else loc) in seen:
            continue
        seen.add((kind, path if kind != "extra_forbidden" else loc))
        where = _describe_owner(data, path)
        owner_name = _owner(data, path)[0]
        if kind == "extra_forbidden":
            owner = _model_at(data, path[:-1] if path and path[-1] == key else path)
            keys = _keys_of(owner) if owner else []
            close = difflib.get_close_matches(str(key), keys, n=1)
            hint = f"did you mean '{close[0]}'?" if close else (f"allowed keys: {', '.join(keys)}" if keys else None)
            pos = source.key(path) if path and path[-1] == key else source.value(path)
            out.append(SpecError(f"unknown key {excerpt(key)}{where}", pos=pos, node=owner_name, hint=hint))
        elif kind == "union_tag_invalid":
            tag = item.get("ctx", {}).get("tag")
            ops = sorted([*_REGISTRY, *expanded.defined])
            close = difflib.get_close_matches(str(tag), ops, n=3)
            hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else f"known ops: {', '.join(ops)}"
            inside = f" in block '{owner_name}'" if owner_name else ""
            out.append(
                SpecError(
                    f"unknown op {excerpt(tag)}{inside}", pos=source.value(path + ("op",)), node=owner_name, hint=hint
                )
            )
        elif kind == "union_tag_not_found":
            hint = f"every block names its type, e.g. `op: {sorted(_REGISTRY)[0]}`; see `blockgraph list --ops`"
            out.append(SpecError(f"this block has no `op:`{where}", pos=source.value(path), hint=hint))
        elif kind == "missing":
            owner, op = _model_at(data, path), _op_at(data, path)
            description = _field_doc(owner, str(key)) if owner else None
            hint = f"add `{key}: ...`" + (f" ({description})" if description else "")
            of_op = f" (op '{op}')" if op else ""
            out.append(
                SpecError(
                    f"missing required key '{key}'{of_op}{where}", pos=source.value(path), node=owner_name, hint=hint
                )
            )
        else:
            value = item.get("input")
            shown = excerpt(value) if not isinstance(value, dict | list) else type(value).__name__
            message = item["msg"][0].lower() + item["msg"][1:]
            field = f"'{key}'" if isinstance(key, str) else f"item {key}"
            out.append(
                SpecError(
                    f"{field}{where}: {message} (got {shown})",
                    pos=source.value(path),
                    node=owner_name,
                    hint=_type_hint(kind),
                )
            )
    return out or [SpecError(str(error), pos=Pos(source.file))]


def _op_at(data: Any, path: Sequence[Any]) -> str | None:
    node = _value_at(data, path)
    return node.get("op") if isinstance(node, dict) and isinstance(node.get("op"), str) else None


def _describe_owner(data: Any, path: Sequence[Any]) -> str:
    """`` in block 'stage1.blocks.0' (serial_block)`` for a path inside a block (the innermost, for a block inside
    a block defined in the spec: ``'stage1.blocks.0.mlp.fc1' (linear)``), else ``""``."""
    name, op = _owner(data, path)
    return f" in block '{name}' ({op})" if name is not None else ""


def _owner(data: Any, path: Sequence[Any]) -> tuple[str | None, str | None]:
    """The full name and op of the innermost block a path is inside, or ``(None, None)``."""
    node, names, block = data, [], None
    for i, part in enumerate(path):
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            break
        if isinstance(node, dict) and "op" in node and i > 0:
            block = node
            names.append(str(node.get("name") or node.get("op")))
        elif len(path) > 1 and path[0] == "stages" and i == 1 and isinstance(node, dict):
            names.append(str(node.get("name")))
    if block is None:
        return None, None
    return ".".join(names), block.get("op")


def _field_doc(model: type[BaseModel], key: str) -> str | None:
    describe_fields()
    for name, info in model.model_fields.items():
        if key in (name, info.alias):
            return info.description
    return None


def _type_hint(kind: str) -> str | None:
    return {
        "int_parsing": "write a whole number (an expression must be `${...}`)",
        "int_from_float": "write a whole number",
        "greater_than": "use a positive value",
        "string_pattern_mismatch": "names are identifiers: letters, digits and '_', not starting with a digit",
        "string_type": "write text: a name, or a reference such as `from: stage1.block`",
        "finite_number": "write a finite number (.inf and .nan are not sizes, rates or ratios)",
        "less_than_equal": "use a smaller value",
        "less_than": "use a smaller value",
        "greater_than_equal": "use a larger value",
        "literal_error": None,
    }.get(kind)
