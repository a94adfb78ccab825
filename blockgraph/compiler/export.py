"""ONNX export of a compiled model through ``torch.onnx.export`` (the dynamo exporter: ``torch.export`` traces the
generated forward, then the graph is translated to ONNX and optimized), written atomically.

The exporter is torch's default since 2.9 and the only one maintained: the TorchScript exporter (``dynamo=False``)
warns that it is deprecated, and it traces with concrete sizes, so a dynamic axis is only as sound as the model's
Python shape arithmetic happens to be. (It exports 3-8x faster here and as accurately at the traced size, but
given dynamic H/W for the deformable encoder it wrote a graph with the level sizes baked in, which fails in
onnxruntime at any other size.) ``torch.export`` instead reasons about symbolic sizes and refuses an axis the
model does not support for every size in its range. Multi-scale deformable attention exports as plain gathers
(``ms_deform_attn``'s ``"gather"`` backend is chosen automatically while exporting).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from blockgraph.errors import BlockgraphError, ExportError, Pos
from blockgraph.files import output_target, remove_stale

MIN_OPSET = 18
"""The dynamo exporter emits opset 18 or newer."""

AXES = {0: "batch", 2: "H", 3: "W"}
"""The input's dynamic axes, by index."""

TRACE_BATCH = 2
"""The batch of the example input when the batch axis is dynamic: a batch of 1 would be specialized (0/1 sizes)."""


@dataclass(frozen=True)
class Exported:
    """What was written: the file, its opset, and each graph input's and output's shape (a dim name for a dynamic
    axis, e.g. ``["batch", 1000]``)."""

    path: str
    opset: int
    inputs: dict[str, list[int | str]]
    outputs: dict[str, list[int | str]]
    bytes: int

    def format(self) -> str:
        def shapes(values: dict[str, list[int | str]]) -> str:
            return ", ".join(f"{k} [{', '.join(map(str, v))}]" for k, v in values.items())

        written = f"wrote {self.path} (ONNX opset {self.opset}, {self.bytes:,} bytes)"
        return f"{written}: {shapes(self.inputs)} -> {shapes(self.outputs)}"


def export_onnx(
    model: Any,
    path: str | os.PathLike[str],
    *,
    input_size: tuple[int, int] | None = None,
    batch: int | None = None,
    dynamic_size: bool = False,
    opset: int | None = None,
) -> Exported:
    """Export ``model`` (built by blockgraph) to an ONNX file, atomically.

    Args:
        model: a compiled blockgraph model; exported in eval mode (its mode is restored afterwards).
        path: the ``.onnx`` file to write. It appears complete or not at all (written in a temporary directory
            beside it, then renamed).
        input_size: ``(H, W)`` of the exported graph; default: the spec's input size. Must be an accepted size.
        batch: a fixed batch size; ``None`` (default) exports a dynamic batch axis named ``batch``.
        dynamic_size: also make H and W dynamic, over the sizes the spec accepts (those containing
            ``input_size``, when they are one arithmetic progression per axis: ``H >= 32``, ``H % 64 == 0``).
        opset: the ONNX opset (18 or newer); default: the exporter's.

    Raises:
        ShapeError: the model does not accept ``input_size``.
        ExportError: bad arguments, a size range the spec cannot give, the output cannot be written, or the
            exporter failed (or could not keep an axis dynamic).
    """
    spec = model.spec
    path = os.fspath(path)
    h, w = tuple(input_size) if input_size is not None else tuple(spec.input.size)
    model.inference.check(h, w, channels=spec.input.channels)  # ShapeError, with the accepted sizes
    _check_arguments(batch, opset)
    target = _output(path)
    axes: dict[int, Any] = {} if batch is not None else {0: torch.export.Dim("batch", min=1)}
    if dynamic_size:
        axes.update(_size_axes(model.inference.acceptance, h, w, spec.name))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    example = torch.randn(batch or TRACE_BATCH, spec.input.channels, h, w, generator=torch.Generator().manual_seed(0))
    training = model.training
    model.eval()
    try:
        program = _run_exporter(
            model, example.to(device), (axes,) if axes else None, spec.input.name, list(model.outputs), opset, path
        )
    finally:
        model.train(training)
    shape = program.model.graph.inputs[0].shape
    fixed = {AXES[a]: shape[a] for a in sorted(axes) if isinstance(shape[a], int)}
    if fixed:  # a fallback capture strategy may have specialized an axis
        raise ExportError(
            f"the exporter could not keep {' and '.join(fixed)} of '{spec.name}' dynamic: the graph fixes "
            + ", ".join(f"{k} = {v}" for k, v in fixed.items()),
            pos=Pos(path),
            hint="export a fixed batch with --batch N" if "batch" in fixed else "export a fixed size (--input HxW)",
        )
    _save(program, target)
    graph = program.model.graph
    return Exported(
        path=path,
        opset=program.model.opset_imports.get("", 0),
        inputs={v.name: _dims(v) for v in graph.inputs},
        outputs={v.name: _dims(v) for v in graph.outputs},
        bytes=os.path.getsize(path),
    )


def _check_arguments(batch: int | None, opset: int | None) -> None:
    where = Pos("<export>")
    if batch is not None and batch < 1:
        raise ExportError(f"batch {batch} must be at least 1", pos=where, hint="omit it for a dynamic batch")
    if opset is not None and opset < MIN_OPSET:
        raise ExportError(
            f"opset {opset} is too old for torch's ONNX exporter", pos=where, hint=f"use opset {MIN_OPSET} or newer"
        )
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(
            f"ONNX export needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed",
            pos=where,
            hint="pip install 'blockgraph[onnx]' (onnx, onnxscript; onnxruntime to run the graph)",
        )


def _size_axes(acceptance: Any, h: int, w: int, name: str) -> dict[int, Any]:
    """``torch.export`` dims for H (axis 2) and W (axis 3): the accepted sizes of the traced size's residue class,
    ``p * k + r`` for ``k >= k0`` (or ``>= minimum`` when ``p`` is 1)."""
    axes = {}
    for axis, symbol, value in ((2, "H", h), (3, "W", w)):
        sizes = acceptance[symbol]
        if acceptance.coupled or not sizes.exact or sizes.start is None or value < sizes.start:
            raise ExportError(
                f"'{name}' accepts {'; '.join(acceptance.describe())}: no open range of {symbol} around {value} "
                "that the exported graph could take",
                pos=Pos("<export>"),
                hint="export a fixed size (without --dynamic-size)",
            )
        p, r = sizes.period, value % sizes.period
        first = min(v for v in range(sizes.start, sizes.start + p) if v % p == r)  # value >= start: r is accepted
        if p == 1:
            axes[axis] = torch.export.Dim(symbol, min=first)
        else:
            k = torch.export.Dim(symbol.lower(), min=first // p)
            axes[axis] = p * k + r if r else p * k
    return axes


_STAGING = re.compile(r"\.blockgraph-export-\w{8}")
"""The temporary directories :func:`_save` writes in (``tempfile.mkdtemp``'s names)."""


def _save(program: Any, path: str) -> None:
    """Write into a temporary directory beside ``path``, then rename into place (an external-data file, for
    weights over 2 GB, first; the ``.onnx`` last), so no half-written file ever has the final name. Staging
    directories that a killed export left long ago beside it are removed first."""
    directory = os.path.dirname(path)
    remove_stale(directory, _STAGING)
    staging = tempfile.mkdtemp(prefix=".blockgraph-export-", dir=directory)
    try:
        program.save(os.path.join(staging, os.path.basename(path)))
        for name in sorted(os.listdir(staging), key=lambda n: n == os.path.basename(path)):
            os.replace(os.path.join(staging, name), os.path.join(directory, name))
    except OSError as e:
        raise ExportError(f"cannot write {path}: {e.strerror or e}", pos=Pos(path)) from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _output(path: str) -> str:
    """The file the export writes (links followed), checked before the export runs: ``path`` must be a regular file
    or a new name in a writable directory (:func:`~blockgraph.files.output_target`: not empty, not a directory, a
    device or a FIFO)."""
    try:
        target = output_target(path)
    except BlockgraphError as e:
        raise ExportError(e.message, pos=e.pos, hint=e.hint or "name a .onnx file") from e
    directory = os.path.dirname(target)
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write {path}: directory {directory} is not writable", pos=Pos(path))
    return target


def _run_exporter(
    model: Any, example: torch.Tensor, dynamic: Any, input_name: str, output_names: list[str], opset: int | None,
    path: str,
) -> Any:  # fmt: skip
    """``torch.onnx.export`` with its progress lines, internal warnings and logged errors (a capture strategy that
    failed before another one worked) kept off the console; its failures become an :class:`ExportError`
    (``BLOCKGRAPH_DEBUG=1`` shows everything and re-raises the original)."""
    debug = bool(os.environ.get("BLOCKGRAPH_DEBUG"))
    try:
        with contextlib.ExitStack() as quiet:
            if not debug:
                quiet.enter_context(warnings.catch_warnings())
                warnings.simplefilter("ignore")
                quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
                quiet.enter_context(_logging_disabled())
            return torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                dynamic_shapes=dynamic,
                input_names=[input_name],
                output_names=output_names,
                opset_version=opset,
                optimize=True,
                verbose=False,
            )
    except Exception as e:  # noqa: BLE001 - the exporter raises many types; all mean "cannot export"
        if debug:
            raise
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise ExportError(
            f"torch.onnx.export failed for '{model.spec.name}': {type(e).__name__}: {first}",
            pos=Pos(path),
            hint="try a fixed --batch, another --input size or --opset; BLOCKGRAPH_DEBUG=1 shows the exporter's trace",
        ) from e


@contextlib.contextmanager
def _logging_disabled() -> Iterator[None]:
    """Disable logging up to ERROR (torch logs the failures of the capture strategies it then recovers from)."""
    previous = logging.root.manager.disable
    logging.disable(max(previous, logging.ERROR))
    try:
        yield
    finally:
        logging.disable(previous)


def _dims(value: Any) -> list[int | str]:
    """An ONNX value's shape: ints, and the names of symbolic dims."""
    return [d if isinstance(d, int) else str(d) for d in value.shape]
