"""examples/train_ddp.py: two CPU ranks (gloo, loopback) train exactly as one process on the combined batch.

Each rank's gradients after every backward (DDP has averaged them; FSDP2 has reduce-scattered them, gathered here)
equal the gradients of a single process, without any process group, on the whole global batch with the mean loss;
both ranks end with the same weights, and rank 0's checkpoint holds them.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import blockgraph as bg
from tests.conftest import ROOT

WORLD = 2
TOL = 1e-6


def load_example() -> Any:
    spec = importlib.util.spec_from_file_location("train_ddp", ROOT / "examples" / "train_ddp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def full_grads(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient, whole (an FSDP shard is gathered: every rank must call this)."""
    out = {}
    for name, p in net.named_parameters():
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        out[name.removeprefix("module.")] = grad.detach().clone()
    return out


def full_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if dist.is_initialized():
        options = StateDictOptions(full_state_dict=True)  # (cpu_offload would keep it on rank 0 only)
        return {k.removeprefix("module."): v for k, v in get_model_state_dict(net, options=options).items()}
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def run(argv: list[str]) -> dict[str, Any]:
    """Train with the example's own loop, recording the gradients of every step and the final weights."""
    example = load_example()
    grads: dict[int, dict[str, torch.Tensor]] = {}
    losses: dict[int, float] = {}

    def record(step: int, net: torch.nn.Module, loss: float) -> None:
        grads[step] = full_grads(net)
        losses[step] = loss

    net = example.train(example.parse_args(argv), on_step=record)
    return {"grads": grads, "losses": losses, "state": full_state(net)}


def rank_main(rank: int, port: int, argv: list[str], out: str) -> None:
    """One rank, as torchrun would start it (the env:// rendezvous variables)."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    try:
        torch.save(run(argv), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CASES = {
    "coat_lite_tiny": ["specs/coat_lite_tiny.yaml", "--input", "64x64"],
    # the hybrid with fewer repetitions (every kind of block is still there), so that CI stays quick
    "hybrid": [
        "specs/coat_lite_small_deformable.yaml",
        "--input",
        "64x64",
        "--set",
        "depths=[1,1,1,1]",
        "--set",
        "enc_layers=2",
        "--set",
        "ffn=512",
    ],  # fmt: skip
}


@pytest.mark.parametrize(
    ("case", "mode"),
    [("coat_lite_tiny", "ddp"), ("hybrid", "ddp"), ("coat_lite_tiny", "fsdp")],
)
def test_two_ranks_equal_one_process_on_the_combined_batch(
    case: str, mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = tmp_path / "model.pt"
    argv = [str(ROOT / a) if a.startswith("specs/") else a for a in CASES[case]]
    argv += ["--batch", "4", "--steps", "2", "--seed", "3", "--dtype", "float64"]  # fp64: 1e-6 is not rounding
    distributed = [*argv, "--out", str(ckpt), *(["--fsdp"] if mode == "fsdp" else [])]
    mp.spawn(rank_main, args=(free_port(), distributed, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = run(argv)  # no process group: a plain model on the whole batch
    finally:
        torch.set_num_threads(threads)

    assert sorted(single["grads"]) == [0, 1]
    for r, got in enumerate(ranks):
        for step in (0, 1):
            expected = single["grads"][step]
            assert got["grads"][step].keys() == expected.keys()
            worst = max((got["grads"][step][k] - g).abs().max().item() for k, g in expected.items())
            assert worst <= TOL, f"rank {r}, step {step + 1}: gradients differ from one process by {worst:.3g}"
        mean_loss = sum(rank["losses"][0] for rank in ranks) / WORLD
        assert abs(mean_loss - single["losses"][0]) <= TOL  # the ranks' losses average to the global batch's
    first, second = (rank["state"] for rank in ranks)
    assert first.keys() == second.keys() == single["state"].keys()
    assert all(torch.equal(first[k], second[k]) for k in first), "the ranks' weights differ"
    saved = torch.load(ckpt, weights_only=True)["state_dict"]  # rank 0's checkpoint: the trained weights
    assert saved.keys() == first.keys() and all(torch.equal(saved[k], first[k]) for k in first)
    rebuilt = bg.load(ckpt).state_dict()  # with the spec: the model comes back (in the default dtype, float32)
    assert all(torch.equal(rebuilt[k], first[k].to(rebuilt[k].dtype)) for k in first)
