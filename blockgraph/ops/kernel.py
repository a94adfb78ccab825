"""When an op may run a fast kernel instead of its plain reference, and how fast kernels keep what they derive from
a layer's weights.

Each op of this package (``linear``, ``conv_bn``, CoaT's attention, ...) is one function with one contract: its
plain reference is ordinary differentiable torch code, used for training, ``torch.compile`` and export; its fast
kernels compute the same values (up to float rounding: a different summation order) with fewer passes over
memory, and each is tested against the reference. The layers call the op and never choose.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from blockgraph.ops.ms_deform_attn import exporting

PLAIN_DEVICES = frozenset({"meta"})
"""Device types on which the ops run their plain references only: a meta tensor has no values, so a fast kernel
gains nothing there (and the autotuner has nothing to time). Every other device may run the eager inference kernels;
each op keeps a kernel that only some devices have (oneDNN's, on the CPU) to those."""


def eager_inference(x: Tensor) -> bool:
    """Whether an op may run its eager inference kernels on ``x``: nothing records gradients (they have no
    derivative formula), torch runs eagerly (not compiling: inductor fuses by itself; not tracing or exporting:
    exported graphs keep standard ops), on a device that computes (not one of :data:`PLAIN_DEVICES`). (False in
    TorchScript: the plain paths.)"""
    if torch.jit.is_scripting():
        return False
    return not (
        torch.is_grad_enabled()
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or symbolic_tracing()
        or exporting()
        or x.device.type in PLAIN_DEVICES
    )


def compiled_inference() -> bool:
    """Whether torch.compile is tracing a graph for inference (no gradients recorded, not for export): a graph that
    may call an op's eager inference kernels as opaque ops of their own (``blockgraph::linear_inference``, ...),
    which run when the graph runs, eagerly."""
    return torch.compiler.is_compiling() and not (torch.is_grad_enabled() or exporting())


def compiled_training(x: Tensor) -> bool:
    """Whether torch.compile traces a training graph (gradients recorded) on the CPU, not for export (an exported
    graph keeps standard ops): a graph whose ops may carry backward formulas of ours (``blockgraph::depthwise_conv2d``,
    ``blockgraph::linear_training``), traced into the compiled backward graph."""
    return (
        torch.compiler.is_compiling()
        and torch.is_grad_enabled()
        and not exporting()
        and not symbolic_tracing()
        and x.device.type == "cpu"
    )


def eager_training(x: Tensor) -> bool:
    """Whether an op may run its eager training kernels (custom autograd formulas, CPU-only C++ kernels) on ``x``:
    autograd records (grad mode on), torch runs eagerly (not compiling, tracing or exporting: those see the plain ops,
    which they differentiate themselves), on the CPU. (False in TorchScript.)"""
    if torch.jit.is_scripting() or not torch.is_grad_enabled():
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or symbolic_tracing() or exporting():
        return False
    return x.device.type == "cpu"  # (read last: a proxy's device is no string)


def as_autocast_runs(fn: Callable[..., Tensor], tensors: tuple[Tensor | None, ...], *args: Any) -> Tensor:
    """``fn(*tensors, *args)`` as CPU autocast runs an op of its lower-precision list: within autocast the floating
    tensors other than float64 cast to its dtype (the casts recorded: gradients reach the originals), then ``fn``
    with autocast off; outside autocast ``fn`` as given. For an autograd Function or custom op, whose inputs
    autocast does not cast."""
    if not torch.is_autocast_enabled("cpu"):
        return fn(*tensors, *args)
    cast = tuple(t if t is None else t.to(autocast_dtype(t)) for t in tensors)
    with torch.autocast("cpu", enabled=False):
        return fn(*cast, *args)


def autocasting(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (False for a device type autocast does not know, such as meta,
    where ``torch.is_autocast_enabled`` raises)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def autocast_dtype(t: Tensor) -> torch.dtype:
    """The dtype :func:`as_autocast_runs` gives ``t``: CPU autocast's for a floating tensor other than float64 while
    autocast is on, else ``t``'s own."""
    if torch.is_autocast_enabled("cpu") and t.is_floating_point() and t.dtype != torch.float64:
        return torch.get_autocast_dtype("cpu")
    return t.dtype


def symbolic_tracing() -> bool:
    """Whether ``torch.fx`` is tracing symbolically: values are proxies, which no Python branch may read; the
    ops take their plain reference paths, and blocks the decisions of the size the model is built for. (False
    in TorchScript, which resolves the branch while compiling.)"""
    if torch.jit.is_scripting():
        return False
    return is_fx_symbolic_tracing()


def in_place(act: nn.Module, y: Tensor) -> Tensor:
    """``act(y)``, overwriting ``y`` where the activation has an in-place form (for eager inference kernels)."""
    if isinstance(act, nn.ReLU):
        return F.relu_(y)
    if isinstance(act, nn.SiLU):
        return F.silu(y, inplace=True)
    if isinstance(act, nn.Hardswish):
        return F.hardswish(y, inplace=True)
    return act(y)


def stamp(*tensors: Tensor | None) -> tuple:
    """What identifies the current values of tensors: version counter (in-place changes), storage, dtype, device."""
    return tuple(None if t is None else (t._version, t.data_ptr(), t.dtype, t.device) for t in tensors)


def remember(owner: nn.Module, attr: str, key: tuple, make: Callable[[], Any]) -> Any:
    """``make()``, kept on ``owner`` (a plain attribute: not a buffer, not in the state_dict) until ``key`` changes."""
    cached = owner.__dict__.get(attr)
    if cached is not None and cached[0] == key:
        return cached[1]
    value = make()
    owner.__dict__[attr] = (key, value)
    return value


def residual_training(
    product: Callable[[Tensor, Tensor | None], Tensor],
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor,
    scale: Tensor | None,
    samples: Tensor | None,
) -> Tensor:
    """``residual + samples * scale * product(weight, bias)`` in a training step, the tail of a residual branch
    (a layer, its layer scale, drop path, the add) in one pass over the output where running it as written makes three:
    the scale (per output channel, ``[C_out]``) folded into the weight's rows and the bias (weight-sized ops, recorded:
    the scale's gradient is the weight's gradient times the weight, summed per row, plus the bias's times the bias,
    where the layer-scale module reduces over every position of the output), the per-sample factors ``samples``
    (a drop path's mask scaled by ``1 / keep``, ``[B, 1, ...]``) and the add in one ``addcmul``. The same values up
    to float rounding (a different order of the products)."""
    if scale is not None:
        weight = weight * scale.view(-1, *(1,) * (weight.dim() - 1))
        bias = None if bias is None else bias * scale
    y = product(weight, bias)
    return residual + y if samples is None else torch.addcmul(residual, y, samples)


_FOLDING = {"enabled": True}


@contextlib.contextmanager
def folding(enable: bool) -> Iterator[None]:
    """Within it, a training step's residual branches fold (``True``, the default: :func:`residual_training`) or run
    each module as written (``False``: for benchmarks of the fold, ``bench/training.py --folds``)."""
    before = _FOLDING["enabled"]
    _FOLDING["enabled"] = enable
    try:
        yield
    finally:
        _FOLDING["enabled"] = before


def training_fold(x: Tensor) -> bool:
    """Whether a residual branch whose layer reads ``x`` may fold (:func:`residual_training`): an eager training step
    (:func:`eager_training`) with folding on (:func:`folding`)."""
    return bool(_FOLDING["enabled"]) and eager_training(x)
