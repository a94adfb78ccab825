"""The benchmark helpers in bench/: the memory measure, timing on a device, results that survive partial runs, and
bench/deform_attn.py's arguments, refusals and measuring path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

from report import Store, cuda_table, goal, goal_line  # noqa: E402
from timing import interleaved_samples, peak_allocated  # noqa: E402


def test_peak_allocated_is_the_high_water_mark_of_live_tensors() -> None:
    def call() -> torch.Tensor:
        a = torch.ones(1000)  # 4000 bytes
        b = torch.ones(3000)  # 12000: 16000 live, the peak
        del a
        torch.ones(500)  # 2000, freed at once: 14000 at most
        return b

    assert peak_allocated(call) == 16000
    assert peak_allocated(lambda: torch.ones(10, 10) @ torch.ones(10, 10)) == 3 * 400  # two operands and the product


def test_interleaved_samples_alternate_the_order() -> None:
    calls: list[str] = []
    samples = interleaved_samples({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert [len(v) for v in samples.values()] == [3, 3]


def test_on_a_gpu_each_timed_call_is_between_two_synchronizations(monkeypatch) -> None:
    """A CUDA call returns before its kernels run: the time of a call is taken from a synchronized device to a
    synchronized device (torch.cuda.synchronize, stood in for here)."""
    events: list[str] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(f"sync {device}"))
    interleaved_samples({"a": lambda: events.append("a")}, rounds=2, warmup=1, device="cuda")
    assert events == ["a", "sync cuda", "a", "sync cuda", "sync cuda", "a", "sync cuda"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: --device cuda would run")
@pytest.mark.parametrize("script", ["models.py", "training.py"])
def test_device_cuda_without_a_gpu_exits_2_with_a_message(script: str, tmp_path) -> None:
    out = tmp_path / "table.md"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--device", "cuda", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and not out.exists()
    assert done.stderr.strip().splitlines() == [
        f"{script}: error: --device cuda: torch {torch.__version__} sees no CUDA device here "
        "(torch.cuda.is_available() is False); run without --device cuda to measure on the CPU"
    ]


def test_a_gpu_run_has_tables_of_its_own() -> None:
    """Rows measured on a GPU would replace the CPU's: --device cuda writes beside the CPU's table by default."""
    assert cuda_table("bench/results/models.md") == "bench/results/models-cuda.md"


def test_goal_cells_and_lines() -> None:
    assert goal(0.9, 0.9) == "✓"
    assert goal(1.08, 0.9) == "✗ (+20%)"
    assert goal(0.1502, 0.15) == "✗ (+0.1%)"
    line = goal_line("eager", {"a": 0.5, "b": 1.2, "c": 1.5}, 1.0, expected=["a", "b", "c", "d"])
    assert line == "- eager ≤ 1.00: 1/3; missed: c 1.50, b 1.20; not measured yet: d"


def test_a_partial_run_replaces_only_its_rows(tmp_path) -> None:
    out = tmp_path / "results" / "t.md"

    def render(store: Store) -> str:
        return "".join(f"{r['model']}={r['v']}\n" for r in store.rows("s"))

    first = Store(out, fresh=False, threads=2)
    first.put("s", "a", {"model": "a", "v": 1})
    first.put("s", "b", {"model": "b", "v": 2})
    first.save(render)
    second = Store(out, fresh=False, threads=2)  # as with --only b
    second.put("s", "b", {"model": "b", "v": 3})
    second.save(render)
    assert out.read_text() == "a=1\nb=3\n"
    data = json.loads(out.with_suffix(".json").read_text())
    assert [r["run"] for r in data["sections"]["s"].values()] == [first.run, second.run]
    assert list(data["runs"]) == [first.run, second.run] and first.run != second.run
    third = Store(out, fresh=True, threads=2)
    third.put("s", "c", {"model": "c", "v": 4})
    third.save(render)
    assert out.read_text() == "c=4\n"
    assert list(json.loads(out.with_suffix(".json").read_text())["runs"]) == [third.run]
    Store(out, fresh=False, threads=2).save(render)  # --render-only: same rows, no run of its own
    assert out.read_text() == "c=4\n"
    assert list(json.loads(out.with_suffix(".json").read_text())["runs"]) == [third.run]
    assert sorted(p.name for p in out.parent.iterdir()) == ["t.json", "t.md"]  # no temporary file left behind


def test_a_run_that_leaves_a_column_out_keeps_the_earlier_runs_with_its_provenance(tmp_path) -> None:
    out = tmp_path / "t.md"

    def render(store: Store) -> str:
        return "".join(f"{r['model']}={r['v']},{r.get('c')},{r.get('carried')}\n" for r in store.rows("s"))

    first = Store(out, fresh=False, threads=2)  # as with --compile
    first.put("s", "a", {"model": "a", "v": 1, "c": 10}, keep=["c"])
    first.save(render)
    second = Store(out, fresh=False, threads=2)  # without: c kept, said to come from the first run
    second.put("s", "a", {"model": "a", "v": 2}, keep=["c"])
    second.save(render)
    assert out.read_text() == f"a=2,10,{{'c': '{first.run}'}}\n"
    third = Store(out, fresh=False, threads=2)  # again without: still the first run's
    third.put("s", "a", {"model": "a", "v": 3}, keep=["c"])
    third.save(render)
    assert out.read_text() == f"a=3,10,{{'c': '{first.run}'}}\n"
    assert list(json.loads(out.with_suffix(".json").read_text())["runs"]) == [first.run, third.run]
    fourth = Store(out, fresh=False, threads=2)  # measured again: no longer carried; not kept unless asked
    fourth.put("s", "a", {"model": "a", "v": 4, "c": 40}, keep=["c"])
    fourth.put("s", "a", {"model": "a", "v": 5})
    fourth.save(render)
    assert out.read_text() == "a=5,None,None\n"
    assert list(json.loads(out.with_suffix(".json").read_text())["runs"]) == [fourth.run]


def test_saved_bytes_count_what_autograd_keeps_once_per_storage() -> None:
    """A linear layer keeps its input (for the weight's gradient), ReLU its output: 4x10 and 4x5 floats."""
    from training import saved_bytes

    model = torch.nn.Sequential(torch.nn.Linear(10, 5), torch.nn.ReLU())
    assert saved_bytes(model, torch.randn(4, 10)) == (40 + 20) * 4
    assert all(p.grad is None for p in model.parameters())  # the count leaves no gradient behind


def test_deform_attn_bench_arguments() -> None:
    """bench/deform_attn.py: the batch follows the device (DINO's 8 on CUDA); unknown variants are usage errors."""
    import deform_attn

    args = deform_attn.parse(["--device", "cuda", "--backends", "triton, torch"])
    assert (args.device, args.batch, args.backends) == ("cuda", 8, ["triton", "torch"])
    assert deform_attn.parse([]).batch == 2 and deform_attn.parse(["--batch", "3"]).batch == 3
    with pytest.raises(SystemExit) as exited:
        deform_attn.parse(["--backends", "reference,cuda"])
    assert exited.value.code == 2
    assert deform_attn.default_backends("cuda") == ["reference", "triton", "triton-deterministic", "torch"]
    fns = deform_attn.variants(["reference", "triton", "triton-deterministic"])
    assert [deterministic for _, deterministic in fns.values()] == [False, False, True]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--device", "cuda"], "--device cuda: no CUDA device here"),
        (["--backends", "triton"], "triton runs on CUDA tensors: add --device cuda"),
    ],
)
def test_deform_attn_bench_refuses_what_cannot_run_here(argv: list[str], message: str, capsys) -> None:
    """Exit status 2 and one line saying why, before measuring anything."""
    import deform_attn

    assert deform_attn.main(argv) == 2
    assert message in capsys.readouterr().err


def test_deform_attn_bench_measures_on_small_maps(monkeypatch: pytest.MonkeyPatch) -> None:
    """The measuring path of bench/deform_attn.py (CPU), on small maps: a row per variant, positive figures."""
    import deform_attn

    monkeypatch.setattr(deform_attn, "LEVELS", ((6, 5), (3, 3)))
    rows = deform_attn.measure("encoder", 1, ["reference", "torch"], batch=1)
    assert [row[:2] for row in rows] == [("encoder", "reference"), ("encoder", "torch")]
    assert all(fwd > 0 and both > 0 for _, _, fwd, both, _ in rows)


def test_an_isa_capped_run_has_tables_of_its_own_and_restarts_with_the_cap(monkeypatch) -> None:
    """--isa avx2 emulates an AVX2-only CPU: ATen, oneDNN and MKL capped through the environment (read when they
    load, so the run restarts with it), rows in a table of its own; the header names the CPU and the cap."""
    import argparse

    import report

    parser = argparse.ArgumentParser()
    report.common_args(parser, out="bench/results/kernels.md", repeats=7)
    native, capped = parser.parse_args([]), parser.parse_args(["--isa", "avx2"])
    assert report.table_path(native) == report.ROOT / "bench/results/kernels.md"
    assert report.table_path(capped) == report.ROOT / "bench/results/kernels-avx2.md"
    assert report.table_path(parser.parse_args(["--isa", "avx2", "--out", "x.md"])) == Path("x.md")
    assert report.environment(native) == report.STEADY_MALLOC
    assert report.environment(capped) == report.STEADY_MALLOC | report.ISA_CAPS["avx2"]
    assert report.ISA_CAPS["avx2"]["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    restarts = []
    monkeypatch.setattr(report.os, "execve", lambda exe, argv, env: restarts.append(env))
    for k, v in report.STEADY_MALLOC.items():
        monkeypatch.setenv(k, v)
    report.restart_with(native)
    assert restarts == []  # set already
    report.restart_with(capped)
    assert len(restarts) == 1 and all(restarts[0][k] == v for k, v in report.ISA_CAPS["avx2"].items())
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert report.cpu_description().endswith("capped: ONEDNN_MAX_CPU_ISA=AVX2")
    assert "logical CPUs" in report.cpu_description() and "torch's CPU kernels: " in report.cpu_description()
