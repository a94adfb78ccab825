"""Building a model from its spec vs timm building its twin; ``cli.py validate`` vs a meta-device forward.

Build (each spec with a timm twin; bench/twins.py): ``blockgraph.build_model(spec)`` (the YAML read, expanded,
checked and compiled into an fp32 CPU module, random init, with its default parameter budget check) vs
``timm.create_model(name, pretrained=False)``, in one process, ``--threads`` torch threads: median of ``--repeats``
interleaved rounds after one warm-up round (medians; the ratios of the fastest rounds are shown too: on a busy
machine they are the less disturbed estimate).

Validate: the wall time of the process ``python cli.py validate specs/NAME.yaml`` (static shapes at the native size;
it never imports torch) vs a process that imports torch and timm, builds the twin on the meta device and runs a
forward at the native size (what a tool without static shapes would do to check one); median of
``--process-repeats`` interleaved rounds after one warm-up round of each. Both are the same interpreter, started
the same way.

Rows are kept in ``OUT.json`` beside the table, and a run updates only the rows it measures (``--only``). Usage:

    .venv/bin/python bench/builder.py [--only PATTERN] [--repeats 7] [--process-repeats 5] [--threads 2]
        [--out bench/results/builder.md] [--fresh] [--render-only]
"""

from __future__ import annotations

import statistics
import sys
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402
from report import Column, Store, common_args, goal, goal_line, log, ms, ratio, restart_with, table, table_path  # noqa: E402
from timing import interleaved_samples, process, python  # noqa: E402
from twins import Reference, twins  # noqa: E402

import blockgraph as bg  # noqa: E402
from tests.support.timm_oracle import create_timm  # noqa: E402

BUILD_GOAL = 1.0
VALIDATE_GOAL = 0.15
"""Issue 8: build time ours / timm, and validate process time / meta-forward process time, at most these."""


def meta_forward_code(ref: Reference) -> str:
    """The reference process: import torch and timm, build the twin on the meta device, one forward."""
    return (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); import torch\n"
        "from tests.support.timm_oracle import create_timm\n"  # import timm (with the CPU torchvision workaround)
        f"m = create_timm({ref.timm!r}, device='meta')\n"
        f"m(torch.empty(1, {ref.channels}, {ref.size[0]}, {ref.size[1]}, device='meta'))\n"
    )


def measure(ref: Reference, repeats: int, process_repeats: int) -> list[dict[str, Any]]:
    builds = {"ours": partial(bg.build_model, ref.path), "timm": partial(create_timm, ref.timm)}
    validate = process([sys.executable, ROOT / "cli.py", "validate", ref.path], cwd=ROOT)
    meta = process(python(meta_forward_code(ref)), cwd=ROOT)
    samples = interleaved_samples(builds, rounds=repeats, warmup=1)
    samples |= interleaved_samples({"validate": validate, "meta": meta}, rounds=process_repeats, warmup=1)
    row: dict[str, Any] = {"model": ref.name}
    for key, name in (("ours", "build_ours"), ("timm", "build_timm"), ("validate", "validate"), ("meta", "meta")):
        row |= {f"{name}_s": statistics.median(samples[key]), f"{name}_min_s": min(samples[key])}
    build, timm, validate_s, meta_s = row["build_ours_s"], row["build_timm_s"], row["validate_s"], row["meta_s"]
    log(
        f"  build ours {ms(build)} ms, timm {ms(timm)} ms ({ratio(build, timm)}); "
        f"validate {ms(validate_s)} ms, meta forward {ms(meta_s)} ms ({ratio(validate_s, meta_s)})"
    )
    return [row]


COLUMNS: list[Column] = [
    ("model", "l", lambda r: r["model"]),
    ("build ours ms", "r", lambda r: ms(r["build_ours_s"])),
    ("timm.create_model ms", "r", lambda r: ms(r["build_timm_s"])),
    ("ours / timm", "r", lambda r: ratio(r["build_ours_s"], r["build_timm_s"])),
    ("goal", "l", lambda r: goal(r["build_ours_s"] / r["build_timm_s"], BUILD_GOAL)),
    ("fastest ours / timm", "r", lambda r: ratio(r["build_ours_min_s"], r["build_timm_min_s"])),
    ("validate process ms", "r", lambda r: ms(r["validate_s"])),
    ("meta forward process ms", "r", lambda r: ms(r["meta_s"])),
    ("validate / meta", "r", lambda r: ratio(r["validate_s"], r["meta_s"])),
    ("goal", "l", lambda r: goal(r["validate_s"] / r["meta_s"], VALIDATE_GOAL)),
    ("fastest validate / meta", "r", lambda r: ratio(r["validate_min_s"], r["meta_min_s"])),
]


def render(store: Store) -> str:
    rows = store.rows("builder")
    expected = [r.name for r in twins()]
    return (
        "\n".join(
            [
                "# Builder: blockgraph vs timm (build time, validate process time)",
                "",
                "Written by `bench/builder.py` (its docstring has the method); reproduce with",
                "`.venv/bin/python bench/builder.py`, or some models with `--only PATTERN`.",
                "Ratios are ours / reference, measured in the same run; lower is better.",
                "",
                store.runs_markdown(),
                "",
                "## Goals (issue 8)",
                "",
                goal_line(
                    "build ours / timm.create_model",
                    {r["model"]: r["build_ours_s"] / r["build_timm_s"] for r in rows},
                    BUILD_GOAL,
                    expected,
                ),
                goal_line(
                    "validate process / meta-forward process",
                    {r["model"]: r["validate_s"] / r["meta_s"] for r in rows},
                    VALIDATE_GOAL,
                    expected,
                ),
                "",
                "## Per twin",
                "",
                table(COLUMNS, rows),
            ]
        )
        + "\n"
    )


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(parser, out="bench/results/builder.md", repeats=7)
    parser.add_argument("--process-repeats", type=int, default=5, help="timed rounds of each process (default 5)")
    args = parser.parse_args()
    restart_with(args)
    torch.set_num_threads(args.threads)
    store = Store(table_path(args), fresh=args.fresh, threads=args.threads)
    chosen = [] if args.render_only else twins(args.only)
    log(f"{len(chosen)} twins, {args.repeats} build rounds, {args.process_repeats} process rounds")
    store.run_jobs(
        [("builder", r.name, partial(measure, r, args.repeats, args.process_repeats)) for r in chosen], render
    )


if __name__ == "__main__":
    main()
