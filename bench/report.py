"""Benchmark results that survive partial runs: rows kept in a JSON file beside the markdown table they render to.

A run over some models (``--only``) replaces their rows and keeps the others, so a long benchmark can be taken in
pieces; every row names the run it comes from, and the table's header describes each of those runs (date, versions,
CPU, threads, load average). Both files are rewritten atomically after every model, so an interrupted run keeps what
it measured.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def common_args(parser: argparse.ArgumentParser, *, out: str, repeats: int, device: bool = False) -> None:
    """The options every model benchmark takes; with ``device``, ``--device cpu|cuda`` too (see :func:`start`)."""
    parser.add_argument("--only", metavar="PATTERN", help="models whose name matches these globs (comma-separated)")
    parser.add_argument(
        "--repeats", type=int, default=repeats, help=f"timed rounds per measurement (default {repeats})"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument(
        "--isa",
        choices=("native", *ISA_CAPS),
        default="native",
        help="instruction set of torch's CPU kernels: native (all this CPU has) or avx2 (ATen, oneDNN and MKL capped "
        "at AVX2: an AVX2-only CPU emulated on one with AVX-512; the table then defaults to NAME-avx2.md)",
    )
    if device:
        gpu_out = cuda_table(out)
        parser.add_argument(
            "--out", type=Path, help=f"markdown table (default {out}, with --device cuda {gpu_out}); rows in .json"
        )
        parser.add_argument(
            "--device",
            choices=("cpu", "cuda"),
            default="cpu",
            help="where the models run (default cpu); cuda: timed with torch.cuda.synchronize around each call, peak "
            "memory from torch.cuda.max_memory_allocated, float32 with TF32 off",
        )
        parser.set_defaults(tables={"cpu": ROOT / out, "cuda": ROOT / gpu_out})
    else:
        parser.add_argument("--out", type=Path, help=f"markdown table (default {out}); rows in .json")
        parser.set_defaults(tables={"cpu": ROOT / out})
    parser.add_argument("--fresh", action="store_true", help="drop the rows of earlier runs instead of updating them")
    parser.add_argument("--render-only", action="store_true", help="measure nothing; rewrite the table from the .json")
    parser.add_argument(
        "--default-malloc", action="store_true", help="keep glibc's adaptive malloc thresholds (see restart_with)"
    )


STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 34)}
"""glibc settings that keep freed activation memory in the process (see :func:`restart_with`)."""

ISA_CAPS = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}
"""``--isa``: the environment that caps the instruction set of torch's CPU kernels (ATen's vectorized ops, oneDNN's
convolutions and matrix multiplies, MKL's) below what the CPU has. ``avx2`` makes a CPU with AVX-512 run the kernels
an AVX2-only one would (the AMD EPYCs that expose no AVX-512): there oneDNN's matrix multiply, 2x faster than MKL's
with AVX-512 on an AMD CPU (MKL takes its AVX2 path on AMD), is about level with it, so measured kernel choices
differ. Our C++ kernels use AVX2 at most: the same under both. The libraries read the cap when they load: it is
set by restarting the process (:func:`restart_with`)."""


def cuda_table(out: str) -> str:
    """Where a benchmark's table goes by default when it runs on a GPU: beside the CPU's, ``-cuda`` added to its
    name (its rows would otherwise replace the CPU's)."""
    path = Path(out)
    return str(path.with_name(f"{path.stem}-cuda{path.suffix}"))


def start(args: argparse.Namespace) -> Store:
    """What every benchmark does first with its options (:func:`common_args`): check the device (``--device cuda``
    where torch sees no GPU: a message and exit status 2), restart with steady malloc thresholds
    (:func:`restart_with`), set the torch threads (and on a GPU, float32 without TF32), and open the store of its
    rows (by default the device's table)."""
    import torch

    device = getattr(args, "device", "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print(
            f"{Path(sys.argv[0]).name}: error: --device cuda: torch {torch.__version__} sees no CUDA device here "
            "(torch.cuda.is_available() is False); run without --device cuda to measure on the CPU",
            file=sys.stderr,
        )
        sys.exit(2)
    restart_with(args)
    torch.set_num_threads(args.threads)
    if device == "cuda":  # both sides of a ratio in float32 (cuDNN's convolutions take TF32 by default)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    return Store(table_path(args, device), fresh=args.fresh, threads=args.threads, device=device)


def table_path(args: argparse.Namespace, device: str = "cpu") -> Path:
    """The table a run writes: ``--out``, else the device's default, with ``-ISA`` added to its name under a capped
    ``--isa`` (its rows would otherwise replace the native ones)."""
    if args.out is not None:
        return Path(args.out)
    path = Path(args.tables[device])
    return path if args.isa == "native" else path.with_name(f"{path.stem}-{args.isa}{path.suffix}")


def environment(args: argparse.Namespace) -> dict[str, str]:
    """The variables a run needs in its environment: :data:`STEADY_MALLOC` (unless ``--default-malloc``) and the
    ``--isa`` cap (:data:`ISA_CAPS`)."""
    return ({} if args.default_malloc else dict(STEADY_MALLOC)) | ISA_CAPS.get(args.isa, {})


def restart_with(args: argparse.Namespace) -> None:
    """Restart this process with :func:`environment` (a no-op when it is set already).

    The ISA cap is read by the libraries when they load. The malloc thresholds (:data:`STEADY_MALLOC`): by default
    glibc serves each large block (an activation map) with a fresh ``mmap`` and returns it on ``free``, under a
    threshold that adapts to the process's history; every forward then page-faults its activations in again. Measured: timm's mobilevit_s at batch 8 spends 0.7 s of a 0.77 s forward in 320,000 page faults, and the
    same model takes 0.32 s or 0.75 s in one machine depending on what ran before it. With fixed thresholds the
    memory stays in the heap and is reused, so both models of a pair are timed on their kernels; the table states
    which allocator setting a run used.
    """
    wanted = environment(args)
    if all(os.environ.get(k) == v for k, v in wanted.items()):
        return
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **wanted})


def malloc_setting() -> str:
    """How this process's malloc is set, for the table."""
    if all(os.environ.get(k) == v for k, v in STEADY_MALLOC.items()):
        return "malloc " + " ".join(f"{k}={v}" for k, v in STEADY_MALLOC.items())
    return "glibc's default malloc thresholds"


def matches(name: str, only: str | None) -> bool:
    """Whether a model name is selected by ``--only`` (comma-separated globs; none selects everything)."""
    return only is None or any(fnmatch.fnmatch(name, p.strip()) for p in only.split(","))


Job = tuple[str, str, Callable[[], list[dict[str, Any]]]]
"""(section, model name, a call returning the model's rows)."""


def log(message: str) -> None:
    print(message, flush=True)


def first_line(error: BaseException) -> str:
    """An exception as one short line (type and first line of its message), for a table cell."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= 200 else text[:197] + "..."


def goal(value: float | None, limit: float) -> str:
    """A table cell saying whether a ratio meets its goal (``✓``) or by how much it misses it."""
    if value is None:
        return "—"
    over = value / limit - 1
    return "✓" if over <= 0 else f"✗ (+{over:.0%})" if over >= 0.01 else f"✗ (+{over:.1%})"


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_description() -> str:
    """The CPU, the instruction set it exposes, and the one torch's kernels use (with any cap :data:`ISA_CAPS` set):
    machines of one name differ (some AMD EPYCs expose AVX-512, others not), and kernel choices with them."""
    import torch

    info = _cpuinfo()
    name = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in info:
        name += f" (family {info['cpu family']}, model {info.get('model', '?')})"
    flags = set(info.get("flags", "").split())
    exposed = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2" if flags else "ISA unknown"
    capped = sorted({k for caps in ISA_CAPS.values() for k in caps} & set(os.environ))
    cap = f", capped: {' '.join(f'{k}={os.environ[k]}' for k in capped)}" if capped else ""
    return (
        f"{name}, {os.cpu_count()} logical CPUs, {exposed} exposed; torch's CPU kernels: "
        f"{torch.backends.cpu.get_cpu_capability()}{cap}"
    )


def _relative(path: str) -> str:
    try:
        return Path(path).resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return path


def _load() -> str:
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


class Store:
    """Rows by section and key, with the runs they come from; saved as JSON and rendered as markdown."""

    def __init__(self, out: Path, *, fresh: bool, threads: int, device: str = "cpu") -> None:
        self.out = out
        self.json = out.with_suffix(".json")
        self.data: dict[str, Any] = {"runs": {}, "sections": {}}
        if self.json.exists() and not fresh:
            self.data = json.loads(self.json.read_text())
        self.run = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        for n in itertools.count(2):  # two runs in one second (tests) keep their own rows apart
            if self.run not in self.data["runs"]:
                break
            self.run = f"{self.run.split(' #')[0]} #{n}"
        import torch

        from tests.support.timm_oracle import import_timm

        timm = import_timm()

        self.info = {
            "command": " ".join([".venv/bin/python", _relative(sys.argv[0]), *sys.argv[1:]]),
            "torch": torch.__version__,
            "timm": timm.__version__,
            "python": platform.python_version(),
            "cpu": cpu_description(),
            "threads": threads,
            "load_start": _load(),
            "malloc": malloc_setting(),
        }
        if device != "cpu":
            self.info["gpu"] = torch.cuda.get_device_name(device)

    def put(self, section: str, key: str, row: dict[str, Any], *, keep: Sequence[str] = ()) -> None:
        """Store ``row`` for ``key`` (replacing the earlier run's); the columns in ``keep`` that this run did not
        measure (``--compile`` left out) stay as the earlier row had them, with the run they come from in
        ``carried`` (column → run), so the table can say so."""
        rows = self.data["sections"].setdefault(section, {})
        new = {**row, "run": self.run}
        old = rows.get(key, {})
        carried = {c: old.get("carried", {}).get(c, old["run"]) for c in keep if c not in row and c in old}
        if carried:
            new |= {c: old[c] for c in carried} | {"carried": carried}
        rows[key] = new

    def rows(self, section: str) -> list[dict[str, Any]]:
        rows = self.data["sections"].get(section, {})
        return [rows[k] for k in sorted(rows)]

    def save(self, render: Callable[[Store], str]) -> None:
        """Write the JSON rows and the markdown that ``render`` makes of them (both atomically)."""
        self.data["runs"][self.run] = self.info | {"load_end": _load()}
        used = {
            run
            for section in self.data["sections"].values()
            for row in section.values()
            for run in (row["run"], *row.get("carried", {}).values())
        }
        self.data["runs"] = {k: v for k, v in self.data["runs"].items() if k in used}
        write_atomic(self.json, json.dumps(self.data, indent=1) + "\n")
        write_atomic(self.out, render(self))

    def run_jobs(self, jobs: Sequence[Job], render: Callable[[Store], str], *, keep: Sequence[str] = ()) -> None:
        """Run each job, store its rows (keyed by name, and batch where a row has one; ``keep``: see :meth:`put`)
        and save after each; a job that raises is reported and skipped, and the process exits with status 1 after
        the others have run."""
        started = time.perf_counter()
        failed = []
        if not jobs:  # --render-only: the table again, from the rows kept
            self.save(render)
        for i, (section, name, job) in enumerate(jobs, 1):
            log(f"[{i}/{len(jobs)}] {section} {name} ({time.perf_counter() - started:.0f} s so far)")
            try:
                rows = job()
            except Exception as e:  # noqa: BLE001 (one model's failure must not lose the others' rows)
                failed.append(f"{section} {name}: {first_line(e)}")
                log(f"  FAILED: {failed[-1]}")
                continue
            for row in rows:
                self.put(section, name + (f"/{row['batch']:04d}" if "batch" in row else ""), row, keep=keep)
            self.save(render)
        log(f"wrote {self.out} (rows in {self.json.name}); total {time.perf_counter() - started:.0f} s")
        if failed:
            sys.exit("failed:\n" + "\n".join(failed))

    def runs_markdown(self) -> str:
        """One line per run that contributed rows."""
        lines = []
        for when, run in self.data["runs"].items():
            gpu = f"GPU {run['gpu']}; " if "gpu" in run else ""
            lines.append(
                f"- run `{when}`: `{run['command']}`; torch {run['torch']}, timm {run['timm']}, Python {run['python']}; "
                f"{run['cpu']}; {gpu}{run['threads']} torch threads; {run.get('malloc', 'malloc not recorded')}; load average (1/5/15 min) {run['load_start']} at "
                f"start, {run.get('load_end', 'n/a')} at end"
            )
        return "\n".join(lines)


Column = tuple[str, str, Callable[[dict[str, Any]], object]]
"""A table column: header, alignment (``l`` or ``r``), and the cell of a row."""


def table(columns: Sequence[Column], rows: Iterable[dict[str, Any]]) -> str:
    """A markdown table of ``rows``, one line each."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |"]
    lines.append("| " + " | ".join("---:" if a == "r" else "---" for _, a, _ in columns) + " |")
    lines += ["| " + " | ".join(str(cell(r)).replace("|", "\\|") for _, _, cell in columns) + " |" for r in rows]
    return "\n".join(lines)


def goal_line(what: str, ratios: dict[str, float], limit: float, expected: Iterable[str] = ()) -> str:
    """A markdown bullet: how many ratios meet ``ratio <= limit``, the ones that miss (worst first), and the
    ``expected`` names that have no measurement yet."""
    missed = sorted(((v, k) for k, v in ratios.items() if v > limit), reverse=True)
    text = f"- {what} ≤ {limit:.2f}: {len(ratios) - len(missed)}/{len(ratios)}"
    text += "; missed: " + ", ".join(f"{k} {v:.2f}" for v, k in missed) if missed else ""
    absent = [name for name in expected if name not in ratios]
    return text + (f"; not measured yet: {', '.join(absent)}" if absent else "")


def ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1e3:.1f}"


def ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or not b else f"{a / b:.3f}"
