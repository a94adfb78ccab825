"""Every reference model against its timm twin, same weights, one process: eager latency and peak memory, and
``torch.compile(fullgraph=True)`` success, compile time and compiled latency.

Eager (each spec with a timm twin; bench/twins.py): fp32 on the CPU, ``--threads`` torch threads, each batch size of
``--batches`` at the twin's native size (timm's ``pretrained_cfg["input_size"]``). timm's weights are loaded into
ours (BatchNorm statistics randomized) and the outputs compared (max abs diff) before any timing. Latency: median
of ``--repeats`` interleaved rounds (ours, timm, timm, ours, ...) under ``torch.no_grad()``, after 2 warm-up rounds;
the ratio of the fastest rounds is shown too (on a busy machine it is the less disturbed estimate).
Peak memory: the most tensor memory allocated at any moment during one forward, above what was allocated before it
(its output included), from torch.profiler's allocation events (bench/timing.py: ``peak_allocated``); deterministic.

Compile (every spec in specs/, families and specs without a twin included, and every twin): graph breaks counted by
``torch._dynamo.explain``; then ``torch.compile(model, fullgraph=True, dynamic=False)`` (inductor, default mode),
whose first call at each batch size of ``--compile-batches`` is the compile time (one recompilation per batch size;
a static shape each); its output is compared with the eager model's; compiled latency is the median of interleaved
rounds of compiled ours and compiled twin (ABBA), then eager ours is timed on its own. Every compile is cold: each
first call runs in ``torch._inductor.utils.fresh_cache()`` (an empty cache folder, in-memory caches cleared), and a
tiny warm-up compile first pays the process's one-time costs (imports, compile workers).

On a GPU (``--device cuda``; the table is then bench/results/models-cuda.md): the same measurements with every model
and input on the GPU, float32 with TF32 off, each timed call between two ``torch.cuda.synchronize`` (its kernels
run after it returns), and peak memory from ``torch.cuda.max_memory_allocated`` over one forward (bench/timing.py).
Without a GPU, ``--device cuda`` exits with status 2 and says so.

Rows are kept in ``OUT.json`` beside the table, and a run updates only the rows it measures: take the benchmark in
pieces with ``--only`` (comma-separated globs on spec names). Usage:

    .venv/bin/python bench/models.py [--only PATTERN] [--no-compile | --compile-only] [--batches 1,8]
        [--compile-batches 1,8] [--repeats 15] [--threads 2] [--device cpu|cuda] [--out bench/results/models.md]
        [--fresh] [--render-only]
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402
import torch._dynamo  # noqa: E402
from report import Column, Job, Store, common_args, first_line, goal, goal_line, log, ms, ratio, start, table  # noqa: E402
from timing import interleaved, interleaved_samples, peak_allocated, synchronizer  # noqa: E402
from torch._inductor.utils import fresh_cache  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402
from twins import Reference, pair, references, twins  # noqa: E402

import blockgraph as bg  # noqa: E402

EAGER_GOALS = {1: 1.00, 8: 0.90}
"""Issue 8: eager latency ours / timm at most this, per batch size."""
MATCH = 1e-4
"""Outputs further apart than this (max abs diff) are flagged: the timing would not compare the same computation."""


def max_diff(a: object, b: object) -> float:
    """Largest absolute difference between two outputs (tensors, or lists / dicts of them)."""
    pairs = list(zip(tree_leaves(a), tree_leaves(b), strict=True))
    return max((x - y).abs().max().item() for x, y in pairs)


def eager(ref: Reference, batches: list[int], repeats: int, device: str) -> list[dict[str, Any]]:
    ours, twin = pair(ref, device=device)
    rows = []
    for batch in batches:
        x = ref.input(batch, device=device)
        with torch.no_grad():
            diff = max_diff(ours(x), twin(x))
            calls: dict[str, Callable[[], object]] = {"ours": partial(ours, x), "timm": partial(twin, x)}
            samples = interleaved_samples(calls, rounds=repeats, device=device)
            peak = {k: peak_allocated(fn, device) for k, fn in calls.items()}
        t = {k: statistics.median(v) for k, v in samples.items()}
        row = {"model": ref.name, "input": "x".join(map(str, ref.size)), "batch": batch, "diff": diff}
        row |= {
            "ours_s": t["ours"],
            "timm_s": t["timm"],
            "ours_min_s": min(samples["ours"]),
            "timm_min_s": min(samples["timm"]),
        }
        rows.append(row | {"ours_bytes": peak["ours"], "timm_bytes": peak["timm"]})
        log(
            f"  eager {ref.name} batch {batch}: diff {diff:.1e}, ours {ms(t['ours'])} ms, timm {ms(t['timm'])} ms, "
            f"ratio {ratio(t['ours'], t['timm'])}; peak {peak['ours'] / 1e6:.1f} / {peak['timm'] / 1e6:.1f} MB"
        )
    return rows


def explain(model: torch.nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Dynamo's graph count and graph breaks for one forward (the first break's reason)."""
    try:
        with torch.no_grad():
            found = torch._dynamo.explain(model)(x)
    except Exception as e:  # noqa: BLE001 (a spec that dynamo cannot trace is a result, not a crash)
        return {"graphs": None, "breaks": None, "reason": first_line(e)}
    finally:
        torch._dynamo.reset()
    reasons = [str(b.reason).splitlines()[0] for b in found.break_reasons]
    return {"graphs": found.graph_count, "breaks": found.graph_break_count, "reason": reasons[0] if reasons else ""}


def warm_up_inductor(device: str) -> None:
    """Compile a tiny function once, so that the process's one-time costs are not charged to the first model."""
    began = time.perf_counter()
    with fresh_cache():
        x = torch.randn(8, 8, device=device)
        torch.compile(lambda x: torch.nn.functional.gelu(x @ x).softmax(-1), fullgraph=True)(x)
        synchronizer(device)()
    torch._dynamo.reset()
    log(f"inductor warm-up: {time.perf_counter() - began:.1f} s")


def compiled(ref: Reference, batches: list[int], repeats: int, device: str) -> list[dict[str, Any]]:
    torch._dynamo.reset()
    if ref.is_twin:
        ours, twin = pair(ref, device=device)
        models = {"ours": ours, "twin": twin}
    else:
        models = {"ours": bg.build_model(ref.path, device=device).eval()}
    traced = {k: explain(m, ref.input(batches[0], device=device)) for k, m in models.items()}
    fns = {k: torch.compile(m, fullgraph=True, dynamic=False) for k, m in models.items()}
    errors: dict[str, str] = {}
    sync = synchronizer(device)
    rows = []
    for batch in batches:
        x = ref.input(batch, device=device)
        row: dict[str, Any] = {"model": ref.name, "timm": ref.timm if ref.is_twin else None, "batch": batch}
        for key, fn in fns.items():
            row[key] = dict(traced[key])
            if key in errors:
                row[key]["error"] = errors[key]
                continue
            began = time.perf_counter()
            try:
                with torch.no_grad(), fresh_cache():
                    out = fn(x)
                    sync()
            except Exception as e:  # noqa: BLE001 (recorded in the table)
                errors[key] = row[key]["error"] = first_line(e)
                log(f"  compile {ref.name} {key} batch {batch}: FAILED {errors[key]}")
                continue
            row[key]["compile_s"] = time.perf_counter() - began
            with torch.no_grad():
                row[key]["diff"] = max_diff(out, models[key](x))
        calls: dict[str, Callable[[], object]] = {k: partial(fn, x) for k, fn in fns.items() if k not in errors}
        with torch.no_grad():
            # ours and the twin alone in the rounds (ABBA): a third call in the rotation would sit next to one of
            # them more often than to the other (coat_mini read 1.04 that way, 0.99-1.00 in pairs)
            t = interleaved(calls, rounds=repeats, device=device)
            eager = interleaved({"eager": partial(models["ours"], x)}, rounds=repeats, device=device)
        for key in fns:
            row[key]["s"] = t.get(key)
        row["eager_s"] = t["eager"] = eager["eager"]
        rows.append(row)
        twin_part = f", twin {ms(row['twin'].get('s'))} ms" if "twin" in row else ""
        log(
            f"  compile {ref.name} batch {batch}: graphs/breaks {traced['ours']['graphs']}/{traced['ours']['breaks']},"
            f" compile {row['ours'].get('compile_s', float('nan')):.1f} s, ours {ms(row['ours'].get('s'))} ms"
            f"{twin_part}, eager {ms(t['eager'])} ms"
        )
    return rows


def _eager_goals(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for batch, limit in EAGER_GOALS.items():
        ratios = {r["model"]: r["ours_s"] / r["timm_s"] for r in rows if r["batch"] == batch}
        if ratios:
            lines.append(goal_line(f"eager ours / timm, batch {batch}", ratios, limit, [r.name for r in twins()]))
    return lines


def _compile_goals(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    specs = {r["model"] for r in rows}
    failed = sorted({r["model"] for r in rows if "error" in r["ours"] or r["ours"]["breaks"] != 0})
    absent = [r.name for r in references() if r.name not in specs]
    lines = [
        f"- torch.compile(fullgraph=True) with no graph break: {len(specs) - len(failed)}/{len(specs)} specs"
        + (f"; failing: {', '.join(failed)}" if failed else "")
        + (f"; not measured yet: {', '.join(absent)}" if absent else "")
    ]
    ratios = {
        f"{r['model']} b{r['batch']}": r["ours"]["s"] / r["twin"]["s"]
        for r in rows
        if r["ours"].get("s") and r.get("twin", {}).get("s")
    }
    if ratios:
        lines.append(goal_line("compiled ours / compiled twin", ratios, 1.0))
    return lines


EAGER_COLUMNS: list[Column] = [
    ("model", "l", lambda r: r["model"]),
    ("input", "l", lambda r: r["input"]),
    ("batch", "r", lambda r: r["batch"]),
    ("max abs diff", "r", lambda r: f"{r['diff']:.1e}" + (" ✗" if r["diff"] > MATCH else "")),
    ("ours ms", "r", lambda r: ms(r["ours_s"])),
    ("timm ms", "r", lambda r: ms(r["timm_s"])),
    ("ours / timm", "r", lambda r: ratio(r["ours_s"], r["timm_s"])),
    ("goal", "l", lambda r: goal(r["ours_s"] / r["timm_s"], EAGER_GOALS.get(r["batch"], 1.0))),
    ("fastest ours / fastest timm", "r", lambda r: ratio(r.get("ours_min_s"), r.get("timm_min_s"))),
    ("peak MB ours", "r", lambda r: f"{r['ours_bytes'] / 1e6:.1f}"),
    ("peak MB timm", "r", lambda r: f"{r['timm_bytes'] / 1e6:.1f}"),
    ("peak ours / timm", "r", lambda r: ratio(r["ours_bytes"], r["timm_bytes"])),
]


def _compiled_columns(side: str, notes: dict[str, int]) -> list[Column]:
    """The columns of one side (ours or twin) of a compile row; errors and break reasons become numbered notes."""

    def graphs(r: dict[str, Any]) -> str:
        m = r[side]
        text = "?" if m["graphs"] is None else f"{m['graphs']} / {m['breaks']}"
        note = m.get("error") or (m["reason"] if m["breaks"] or m["graphs"] is None else "")
        return text + (f" [{notes.setdefault(note, len(notes) + 1)}]" if note else "")

    def get(fn: Callable[[dict[str, Any]], str]) -> Callable[[dict[str, Any]], str]:
        return lambda r: fn(r[side]) if side in r else "—"

    return [
        (f"{side} graphs / breaks", "l", lambda r: graphs(r) if side in r else "—"),
        (f"{side} compile s", "r", get(lambda m: "fails" if "error" in m else f"{m['compile_s']:.1f}")),
        (f"{side} ms", "r", get(lambda m: ms(m.get("s")))),
        (f"{side} max abs diff", "r", get(lambda m: f"{m['diff']:.1e}" if "diff" in m else "—")),
    ]


def render(store: Store) -> str:
    eager_rows, compile_rows = store.rows("eager"), store.rows("compile")
    parts = [
        "# Models: blockgraph vs timm (eager, memory, torch.compile)",
        "",
        "Written by `bench/models.py` (its docstring has the method); reproduce everything with",
        "`.venv/bin/python bench/models.py`, or a part with `--only PATTERN`, `--no-compile`, `--compile-only`.",
        "Ratios are ours / reference, measured in the same process; lower is better.",
        "",
        store.runs_markdown(),
        "",
        "## Goals (issue 8)",
        "",
        *_eager_goals(eager_rows),
        *_compile_goals(compile_rows),
    ]
    if eager_rows:
        parts += ["", "## Eager: fp32, same weights, interleaved medians", "", table(EAGER_COLUMNS, eager_rows)]
    if compile_rows:
        notes: dict[str, int] = {}
        columns: list[Column] = [
            ("spec", "l", lambda r: r["model"]),
            ("twin", "l", lambda r: r["timm"] or "—"),
            ("batch", "r", lambda r: r["batch"]),
            *_compiled_columns("ours", notes),
            *_compiled_columns("twin", notes),
            ("ours / twin", "r", lambda r: ratio(r["ours"].get("s"), r.get("twin", {}).get("s"))),
            ("ours eager ms", "r", lambda r: ms(r["eager_s"])),
            ("ours compiled / eager", "r", lambda r: ratio(r["ours"].get("s"), r["eager_s"])),
        ]
        parts += ["", "## torch.compile(fullgraph=True, dynamic=False), inductor", "", table(columns, compile_rows)]
        parts += ["", "max abs diff: the compiled model's output vs its eager output.", ""]
        parts += [f"{i}. {note}" for note, i in notes.items()]
    return "\n".join(parts) + "\n"


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(parser, out="bench/results/models.md", repeats=15, device=True)
    parser.add_argument("--batches", default="1,8", help="eager batch sizes (default 1,8)")
    parser.add_argument("--compile-batches", help="compiled batch sizes (default: --batches)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--no-compile", action="store_true", help="eager only")
    which.add_argument("--compile-only", action="store_true", help="torch.compile only")
    args = parser.parse_args()
    store = start(args)
    batches = [int(b) for b in args.batches.split(",")]
    compile_batches = [int(b) for b in (args.compile_batches or args.batches).split(",")]
    jobs: list[Job] = []
    if args.render_only:
        args.no_compile = args.compile_only = True
    if not args.compile_only:
        jobs += [("eager", r.name, partial(eager, r, batches, args.repeats, args.device)) for r in twins(args.only)]
    if not args.no_compile:
        jobs += [
            ("compile", r.name, partial(compiled, r, compile_batches, args.repeats, args.device))
            for r in references(args.only)
        ]
    on = "" if args.device == "cpu" else f", on {args.device}"
    log(
        f"eager batches {batches}, compiled batches {compile_batches}, {args.repeats} rounds, {args.threads} threads{on}"
    )
    if not args.no_compile:
        warm_up_inductor(args.device)
    store.run_jobs(jobs, render)


if __name__ == "__main__":
    main()
