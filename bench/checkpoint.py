"""Checkpoints: what checking the sha256 of every tensor costs, when writing and when loading.

For each reference model (default: coat_lite_small), a checkpoint is written to a temporary directory, then, in one
process, ``--threads`` torch threads, median of ``--repeats`` interleaved rounds after one warm-up round:

- read: ``blockgraph.compiler.checkpoint.read`` (``torch.load`` with ``weights_only=True``, every field and digest
  checked) vs ``torch.load`` of the same file alone;
- load: ``blockgraph.load`` (read, the model built from the embedded spec while the tensors' digests are checked,
  the weights loaded) vs ``blockgraph.build_model`` of the same spec (the model alone, randomly initialized);
- save: ``blockgraph.compiler.checkpoint.save`` (digests, an fsynced atomic write) vs ``torch.save`` of the
  state_dict to a path;
- digests: the sha256 of every tensor alone (hashlib, several threads).

Rows are kept in ``OUT.json`` beside the table, and a run updates only the rows it measures (``--only``). Usage:

    .venv/bin/python bench/checkpoint.py [--only PATTERN] [--repeats 15] [--threads 2]
        [--out bench/results/checkpoint.md] [--fresh] [--render-only]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402
from report import Column, Job, Store, common_args, log, matches, ms, ratio, restart_with, table, table_path  # noqa: E402
from timing import interleaved_samples  # noqa: E402

import blockgraph as bg  # noqa: E402
from blockgraph.compiler import checkpoint  # noqa: E402

MODELS = ["coat_lite_small"]


def measure(name: str, repeats: int) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = bg.create_model(name)
    with tempfile.TemporaryDirectory() as tmp:
        path, plain = Path(tmp) / f"{name}.pt", Path(tmp) / "state_dict.pt"
        checkpoint.save(model, path)
        state = torch.load(path, weights_only=True)["state_dict"]
        calls = {
            "torch_load": lambda: torch.load(path, map_location="cpu", weights_only=True),
            "read": lambda: checkpoint.read(path),
            "digests": lambda: checkpoint._digests(state),
            "build": lambda: bg.build_model(name),
            "load": lambda: bg.load(path),
            "torch_save": lambda: torch.save(state, plain),
            "save": lambda: checkpoint.save(model, path),
        }
        times = interleaved_samples(calls, rounds=repeats, warmup=1)
        size = path.stat().st_size
    row = {k: statistics.median(v) for k, v in times.items()}
    return [{"model": name, "mb": size / 1e6, **row}]


def render(store: Store) -> str:
    columns: list[Column] = [
        ("model", "l", lambda r: r["model"]),
        ("file MB", "r", lambda r: f"{r['mb']:.1f}"),
        ("read ms", "r", lambda r: ms(r["read"])),
        ("torch.load ms", "r", lambda r: ms(r["torch_load"])),
        ("read / torch.load", "r", lambda r: ratio(r["read"], r["torch_load"])),
        ("digests ms", "r", lambda r: ms(r["digests"])),
        ("load ms", "r", lambda r: ms(r["load"])),
        ("build_model ms", "r", lambda r: ms(r["build"])),
        ("load / build_model", "r", lambda r: ratio(r["load"], r["build"])),
        ("save ms", "r", lambda r: ms(r["save"])),
        ("torch.save ms", "r", lambda r: ms(r["torch_save"])),
        ("save / torch.save", "r", lambda r: ratio(r["save"], r["torch_save"])),
    ]
    return "\n".join(
        [
            "# Checkpoints: the cost of a sha256 for every tensor",
            "",
            "Written by `bench/checkpoint.py` (its docstring has the method); reproduce with",
            "`.venv/bin/python bench/checkpoint.py`. Medians; ratios are ours / reference, measured in the same run.",
            "",
            store.runs_markdown(),
            "",
            table(columns, store.rows("checkpoint")),
            "",
        ]
    )


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(parser, out="bench/results/checkpoint.md", repeats=15)
    args = parser.parse_args()
    restart_with(args)
    torch.set_num_threads(args.threads)
    store = Store(table_path(args), fresh=args.fresh, threads=args.threads)
    names = (
        []
        if args.render_only
        else [n for n in (MODELS if args.only is None else bg.list_models()) if matches(n, args.only)]
    )
    jobs: list[Job] = [("checkpoint", name, partial(measure, name, args.repeats)) for name in names]
    log(f"{len(jobs)} models, {args.repeats} rounds, {args.threads} threads")
    store.run_jobs(jobs, render)


if __name__ == "__main__":
    main()
