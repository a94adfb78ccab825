"""Training steps: each reference model with a timm twin against the twin, same weights, one process.

A step is what a training loop runs: forward in train mode with drop path on (``drop_path_rate`` 0.1 on both
sides), a cross-entropy loss on random labels, backward, and an AdamW step. Timed as the other benchmarks are: the
two models' steps interleaved (ours, twin, twin, ours, ...) for ``--repeats`` rounds after 2 warm-up rounds,
medians, ``--threads`` torch threads, fixed glibc malloc thresholds; at each batch of ``--batches`` (default 8):

- fp32 eager: ours / twin;
- bf16: the same step under ``torch.autocast("cpu", dtype=torch.bfloat16)`` on both sides;
- saved for backward: the bytes of the tensors autograd keeps between forward and backward (distinct storages,
  counted with ``torch.autograd.graph.saved_tensors_hooks``): the activation memory of training, deterministic;
- with ``--compile``: both models under ``torch.compile`` (inductor, default mode), the compiled steps interleaved.

``--checkpointing`` adds, for CoaT-Lite Small and the deformable hybrid, the step time and saved bytes with
``set_grad_checkpointing(True)`` against without (each block recomputed in the backward pass). ``--folds`` adds, for
ConvNeXt-atto, InceptionNeXt-T, PoolFormer-S12 and Swin-T, the step time and saved bytes with the residual branches
folded (the default: a layer scale folded into the layer's weights, the drop path and the add one pass) against
each module run as written (``blockgraph.ops.kernel.folding(False)``), interleaved. ``--deformable BATCH``
adds the specs with multi-scale deformable attention (no twin): the absolute step time (the outputs' mean square as
the loss) and the share of the step spent in the attention core, forward and backward, from torch.profiler.

On a GPU (``--device cuda``; the table is then bench/results/training-cuda.md): the same steps with models, inputs
and labels on the GPU, float32 with TF32 off, bf16 under ``torch.autocast("cuda", dtype=torch.bfloat16)``, each
timed step between two ``torch.cuda.synchronize``; the deformable core's share is of the GPU's kernel time. Without a
GPU, ``--device cuda`` exits with status 2 and says so. Usage:

    .venv/bin/python bench/training.py [--only PATTERN] [--batches 8] [--repeats 7] [--compile] [--no-bf16] [--checkpointing] [--folds]
        [--device cpu|cuda] [--out bench/results/training.md] [--fresh] [--render-only]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402, N812 (the usual name)
from report import Column, Job, Store, common_args, log, ms, ratio, start, table  # noqa: E402
from timing import interleaved_samples  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402
from twins import Reference, references, twins  # noqa: E402

import blockgraph as bg  # noqa: E402
from blockgraph.ops import ms_deform_attn_backend  # noqa: E402
from blockgraph.ops.kernel import folding  # noqa: E402
from tests.support.timm_oracle import create_timm, set_fused  # noqa: E402

DROP_PATH = 0.1
CHECKPOINTED = ("coat_lite_small", "coat_lite_small_deformable")
DEFORMABLE = ("coat_lite_small_deformable", "deformable_encoder")
FOLDED = ("convnext_atto", "inception_next_tiny", "poolformer_s12", "swin_tiny_patch4_window7_224")


def _models(ref: Reference, device: str, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module, float]:
    """Ours and the twin in train mode with drop path on (off on both sides for a spec without a ``drop_path``
    variable: every twin's spec has one), ours holding the twin's weights, on ``device``; and the drop path rate
    used."""
    set_fused(True)
    torch.manual_seed(seed)
    rate = DROP_PATH if "drop_path" in bg.analyze(ref.path).spec.variables else 0.0
    twin = create_timm(ref.timm, drop_path_rate=rate).train()
    ours = bg.create_model(ref.name, drop_path_rate=rate).train()  # (0: accepted by a spec without the variable)
    bg.load_timm_state_dict(ours, twin.state_dict())
    return ours.to(device), twin.to(device), rate


def _loss(out: Any, y: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy of the logits (DeiT's distilled head returns a pair in training: their mean); for a model
    without a classifier (``y`` None, or maps as a dict or list), the outputs' mean square."""
    if y is None or isinstance(out, dict | list):
        return sum(t.float().square().mean() for t in tree_leaves(out))
    logits = (out[0] + out[1]) / 2 if isinstance(out, tuple) else out
    return F.cross_entropy(logits.float(), y)


def _step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor | None, bf16: bool
) -> None:
    opt.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = _loss(model(x), y)
    loss.backward()
    opt.step()


@contextlib.contextmanager
def _counting_saved(total: list[int]) -> Iterator[None]:
    seen: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def saved_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for backward in one training forward (parameters included:
    the same on both sides)."""
    total = [0]
    with _counting_saved(total):
        out = model(x)
    labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    _loss(out, labels).backward()  # (the loss's own tensors are not counted)
    model.zero_grad(set_to_none=True)
    return total[0]


def _timed(calls: dict[str, Callable[[], object]], repeats: int, device: str) -> dict[str, float]:
    samples = interleaved_samples(calls, rounds=repeats, device=device)
    return {k: statistics.median(v) for k, v in samples.items()}


def _labels(batch: int, device: str) -> torch.Tensor:
    return torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(1)).to(device)


def measure(
    ref: Reference,
    batches: list[int],
    repeats: int,
    compiled: bool,
    device: str,
    bf16s: tuple[bool, ...] = (False, True),
) -> list[dict[str, Any]]:
    ours, twin, rate = _models(ref, device)
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in (("ours", ours), ("twin", twin))}
    models = {"ours": ours, "twin": twin}
    rows = []
    for batch in batches:
        x, y = ref.input(batch, device=device), _labels(batch, device)
        row: dict[str, Any] = {"model": ref.name, "batch": batch, "drop_path": rate}
        for bf16 in bf16s:
            calls = {k: partial(_step, models[k], opts[k], x, y, bf16) for k in models}
            t = _timed(calls, repeats, device)
            row |= {f"{k}{'_bf16' if bf16 else ''}_s": v for k, v in t.items()}
        row |= {f"{k}_saved": saved_bytes(m, x) for k, m in models.items()}
        if compiled:
            fns = {k: torch.compile(m) for k, m in models.items()}
            calls = {k: partial(_step, fns[k], opts[k], x, y, False) for k in fns}
            for call in calls.values():
                call()  # compile (the backward graph too)
            t = _timed(calls, repeats, device)
            row |= {f"{k}_compiled_s": v for k, v in t.items()}
            torch._dynamo.reset()
        rows.append(row)
        log(
            f"  {ref.name} batch {batch}: eager {ratio(row['ours_s'], row['twin_s'])}, bf16 "
            f"{ratio(row.get('ours_bf16_s'), row.get('twin_bf16_s'))}, saved {ratio(row['ours_saved'], row['twin_saved'])}"
            + (f", compiled {ratio(row['ours_compiled_s'], row['twin_compiled_s'])}" if compiled else "")
        )
    return rows


def _switched(
    model: Any,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    switch: Callable[[Any, bool], Any],
    on: bool,
) -> None:
    with switch(model, on):
        _step(model, opt, x, y, False)


def _two_settings(
    ref: Reference, batches: list[int], repeats: int, device: str, switch: Callable[[Any, bool], Any],
    settings: dict[str, bool],
) -> list[dict[str, Any]]:  # fmt: skip
    """Step time and saved bytes of one model in two settings, ``switch(model, on)`` a context that puts it in one
    (``settings``: each row key's prefix -> ``on``), the two steps interleaved."""
    torch.manual_seed(0)
    model = bg.create_model(ref.name, drop_path_rate=DROP_PATH).train().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    (a, on_a), (b, on_b) = settings.items()
    rows = []
    for batch in batches:
        x, y = ref.input(batch, device=device), _labels(batch, device)
        t = _timed({k: partial(_switched, model, opt, x, y, switch, on) for k, on in settings.items()}, repeats, device)
        saved = {}
        for k, on in settings.items():
            with switch(model, on):
                saved[k] = saved_bytes(model, x)
        rows.append({"model": ref.name, "batch": batch, f"{a}_s": t[a], f"{b}_s": t[b], f"{a}_saved": saved[a],
                     f"{b}_saved": saved[b]})  # fmt: skip
        log(f"  {ref.name} batch {batch}: {b} / {a}: time {ratio(t[b], t[a])}, saved {ratio(saved[b], saved[a])}")
    return rows


@contextlib.contextmanager
def _checkpointed(model: Any, on: bool) -> Iterator[None]:
    model.set_grad_checkpointing(on)
    try:
        yield
    finally:
        model.set_grad_checkpointing(False)


def checkpointing(ref: Reference, batches: list[int], repeats: int, device: str) -> list[dict[str, Any]]:
    """Step time and saved bytes with grad checkpointing off and on."""
    return _two_settings(ref, batches, repeats, device, _checkpointed, {"plain": False, "ckpt": True})


def folds(ref: Reference, batches: list[int], repeats: int, device: str) -> list[dict[str, Any]]:
    """Step time and saved bytes with the residual branches run as written (``blockgraph.ops.kernel.folding(False)``)
    and folded (the default)."""
    return _two_settings(
        ref, batches, repeats, device, lambda model, on: folding(on), {"written": False, "folded": True}
    )


def deformable(ref: Reference, batch: int, repeats: int, device: str) -> list[dict[str, Any]]:
    """A training step of a model with multi-scale deformable attention (no twin): its absolute time, and the
    share of the step's time spent in the attention core, forward and backward (torch.profiler: the self time of the
    core's ops, over every op's; CPU time on the CPU, the GPU's kernel time on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = bg.create_model(ref.name).train().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = ref.input(batch, device=device)
    t = _timed({"step": partial(_step, model, opt, x, None, False)}, repeats, device)["step"]
    gpu = device != "cpu"
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if gpu else [])]) as prof:
        _step(model, opt, x, None, False)
    events = prof.key_averages()
    own, whole = ("self_device_time_total", "device_time_total") if gpu else ("self_cpu_time_total", "cpu_time_total")
    total = sum(getattr(e, own) for e in events)  # the step's time, each op counted once
    # the core's calls, children included: the C++ op (its autograd node runs in the backward pass), or the pure
    # PyTorch backend's autograd Function
    forward = sum(getattr(e, whole) for e in events if e.key in ("blockgraph_msda::forward", "_Gather"))
    backward = sum(
        getattr(e, whole)
        for e in events
        if e.key in ("GeneratedBackwardFor_blockgraph_msda_forward_defaultBackward", "_GatherBackward")
    )
    backend = ms_deform_attn_backend(torch.empty(0, device=device))
    row = {"model": ref.name, "batch": batch, "step_s": t, "core_forward": forward / total,
           "core_backward": backward / total, "backend": backend}  # fmt: skip
    log(
        f"  {ref.name} batch {batch}: step {ms(t)} ms, core forward {forward / total:.1%}, backward {backward / total:.1%}"
    )
    return [row]


def _mb(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:,.0f}"


TRAIN_COLUMNS: list[Column] = [
    ("model", "l", lambda r: r["model"]),
    ("batch", "r", lambda r: r["batch"]),
    ("drop path", "r", lambda r: r.get("drop_path", DROP_PATH)),
    ("ours ms", "r", lambda r: ms(r["ours_s"])),
    ("twin ms", "r", lambda r: ms(r["twin_s"])),
    ("fp32 ours / twin", "r", lambda r: ratio(r["ours_s"], r["twin_s"])),
    ("bf16 ours / twin", "r", lambda r: _kept(r, "bf16")),
    ("compiled ours / twin", "r", lambda r: _kept(r, "compiled")),
    ("saved MiB ours", "r", lambda r: _mb(r["ours_saved"])),
    ("saved MiB twin", "r", lambda r: _mb(r["twin_saved"])),
    ("saved ours / twin", "r", lambda r: ratio(r["ours_saved"], r["twin_saved"])),
]
KEPT = ("ours_bf16_s", "twin_bf16_s", "ours_compiled_s", "twin_compiled_s")
"""Columns a run that leaves them out (no ``--compile``, ``--no-bf16``) keeps from the row's earlier run."""


def _kept(row: dict[str, Any], column: str) -> str:
    """The ours / twin ratio of a bf16 or compiled column, marked † when it comes from an earlier run."""
    cell = ratio(row.get(f"ours_{column}_s"), row.get(f"twin_{column}_s"))
    return f"{cell} †" if f"ours_{column}_s" in row.get("carried", {}) else cell


def _kept_note(rows: list[dict[str, Any]]) -> list[str]:
    runs = sorted({run for r in rows for run in r.get("carried", {}).values()})
    if not runs:
        return []
    named = ", ".join(f"`{run}`" for run in runs)
    return ["", f"† kept from the row's earlier run ({named}): the later run did not measure that column."]


def _setting_columns(a: str, b: str, headers: tuple[str, ...]) -> list[Column]:
    """The columns of :func:`_two_settings`' rows (keys ``a``, ``b``): model, batch, then under ``headers`` each
    setting's step, b's time over a's, each setting's saved bytes, b's over a's."""
    return [
        ("model", "l", lambda r: r["model"]),
        ("batch", "r", lambda r: r["batch"]),
        *zip(
            headers,
            "rrrrrr",
            (
                lambda r: ms(r[f"{a}_s"]),
                lambda r: ms(r[f"{b}_s"]),
                lambda r: ratio(r[f"{b}_s"], r[f"{a}_s"]),
                lambda r: _mb(r[f"{a}_saved"]),
                lambda r: _mb(r[f"{b}_saved"]),
                lambda r: ratio(r[f"{b}_saved"], r[f"{a}_saved"]),
            ),
            strict=True,
        ),
    ]


CKPT_COLUMNS = _setting_columns(
    "plain", "ckpt", ("step ms", "checkpointed ms", "time checkpointed / plain", "saved MiB", "saved MiB checkpointed",
                      "saved checkpointed / plain"),
)  # fmt: skip
FOLD_COLUMNS = _setting_columns(
    "written", "folded", ("as written ms", "folded ms", "time folded / as written", "saved MiB as written",
                          "saved MiB folded", "saved folded / as written"),
)  # fmt: skip


DEFORMABLE_COLUMNS: list[Column] = [
    ("model", "l", lambda r: r["model"]),
    ("batch", "r", lambda r: r["batch"]),
    ("core backend", "l", lambda r: r["backend"]),
    ("step ms", "r", lambda r: ms(r["step_s"])),
    ("attention core, forward", "r", lambda r: f"{r['core_forward']:.1%}"),
    ("attention core, backward", "r", lambda r: f"{r['core_backward']:.1%}"),
]


def render(store: Store) -> str:
    parts = [
        "# Training steps: blockgraph vs timm",
        "",
        "Written by `bench/training.py` (its docstring has the method). A step: forward in train mode (drop path "
        f"{DROP_PATH}), cross-entropy, backward, AdamW. Ratios are ours / twin in the same process; lower is better.",
        "",
        store.runs_markdown(),
        "",
        "## Steps",
        "",
        table(TRAIN_COLUMNS, store.rows("train")),
        *_kept_note(store.rows("train")),
    ]
    if store.rows("checkpointing"):
        parts += ["", "## Grad checkpointing", "", table(CKPT_COLUMNS, store.rows("checkpointing"))]
    if store.rows("folds"):
        parts += ["", "## Residual branches folded (layer scale in the weights, drop path and add in one pass)", "",
                  table(FOLD_COLUMNS, store.rows("folds"))]  # fmt: skip
    if store.rows("deformable"):
        parts += ["", "## Deformable attention (no twin): absolute step time, share of the step in the core", "",
                  table(DEFORMABLE_COLUMNS, store.rows("deformable"))]  # fmt: skip
    return "\n".join(parts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(parser, out="bench/results/training.md", repeats=7, device=True)
    parser.add_argument("--batches", default="8", help="batch sizes (default 8)")
    parser.add_argument("--compile", action="store_true", help="also compiled steps (inductor; minutes per model)")
    parser.add_argument(
        "--no-bf16",
        action="store_true",
        help="no bf16 column (emulated, far slower, on a CPU without bf16 instructions, as under --isa avx2)",
    )
    parser.add_argument("--checkpointing", action="store_true", help="grad checkpointing rows (CoaT-Lite S, hybrid)")
    parser.add_argument("--folds", action="store_true", help="residual branches folded vs as written (4 models)")
    parser.add_argument("--deformable", type=int, metavar="BATCH", help="rows of the deformable specs at this batch")
    args = parser.parse_args()
    store = start(args)
    batches = [int(b) for b in args.batches.split(",")]
    bf16s = (False,) if args.no_bf16 else (False, True)
    jobs: list[Job] = []
    if not args.render_only:
        jobs += [
            ("train", r.name, partial(measure, r, batches, args.repeats, args.compile, args.device, bf16s))
            for r in twins(args.only)
        ]
        if args.checkpointing:
            jobs += [
                ("checkpointing", r.name, partial(checkpointing, r, batches, args.repeats, args.device))
                for r in references()
                if r.name in CHECKPOINTED
            ]
        if args.folds:
            jobs += [
                ("folds", r.name, partial(folds, r, batches, args.repeats, args.device))
                for r in references()
                if r.name in FOLDED
            ]
        if args.deformable:
            jobs += [
                ("deformable", r.name, partial(deformable, r, args.deformable, args.repeats, args.device))
                for r in references()
                if r.name in DEFORMABLE
            ]
    store.run_jobs(jobs, render, keep=KEPT)


if __name__ == "__main__":
    main()
