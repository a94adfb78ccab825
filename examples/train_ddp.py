"""Data-parallel training of any blockgraph spec, launched with torchrun.

    torchrun --standalone --nproc-per-node 2 examples/train_ddp.py specs/coat_lite_tiny.yaml --input 64x64 \\
        --batch 16 --steps 20 --out coat_lite_tiny.pt

Every rank builds the same model (same seed; DistributedDataParallel also broadcasts rank 0's weights), reads its
own shard of each global batch (``DistributedSampler``: rank r takes samples r, r + world, ...), and DDP averages
the gradients, so a step equals one step of a single process on the whole global batch with the mean loss.
``--fsdp`` shards parameters, gradients and optimizer state instead (FSDP2, ``fully_shard``: one unit per graph
node that owns no shared module, then the root). Rank 0 logs the loss and writes the checkpoint (weights + the
embedded spec; ``blockgraph.load(path)`` rebuilds the model).

Data: synthetic (a fixed seed; sample i is the same on every run and rank), or ``--data file.pt`` holding
``{"images": [N, C, H, W], "labels": [N]}``. The loss: cross-entropy for a ``[B, classes]`` output, mean squared
error against a random target for any other output (feature maps, tokens), summed over the model's outputs.

The backend is NCCL on GPUs (one per rank, ``LOCAL_RANK``), gloo on CPUs. BatchNorm keeps per-rank statistics
unless ``--sync-bn`` (GPUs only: torch's SyncBatchNorm does not run on CPU tensors).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F  # noqa: N812
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import blockgraph as bg
from blockgraph.compiler.checkpoint import save

StepHook = Callable[[int, nn.Module, float], None]
"""Called on every rank after each backward, before the optimizer step: (step, model, this rank's loss)."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("spec", help="a spec file (YAML)")
    p.add_argument("--variant", help="variant of a family spec")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a spec variable")
    p.add_argument("--input", default=None, help="HxW (default: the spec's input size)")
    p.add_argument("--batch", type=int, default=16, help="global batch size (split evenly over the ranks)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", help="a torch file {'images': [N, C, H, W], 'labels': [N]} (default: synthetic)")
    p.add_argument("--out", help="write the checkpoint here (rank 0, at the end)")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (fully_shard) instead of DDP")
    p.add_argument("--sync-bn", action="store_true", help="synchronize BatchNorm statistics (GPUs only)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--log-every", type=int, default=1)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# Data


class SyntheticData(Dataset):
    """``length`` samples, each a function of (seed, index) only: an image and one target per model output (a class
    index for a ``[classes]`` output, a random tensor of the output's shape otherwise)."""

    def __init__(self, length: int, image: Sequence[int], outputs: Sequence[Sequence[int]], seed: int, dtype) -> None:
        self.length, self.image, self.outputs, self.seed, self.dtype = length, tuple(image), outputs, seed, dtype

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        image = torch.randn(self.image, generator=gen, dtype=self.dtype)
        targets = [
            torch.randint(shape[0], (), generator=gen)
            if len(shape) == 1
            else torch.randn(tuple(shape), generator=gen, dtype=self.dtype)
            for shape in self.outputs
        ]
        return image, targets


class TensorFile(Dataset):
    """``{"images": [N, C, H, W], "labels": [N]}`` from a torch file (loaded with ``weights_only=True``)."""

    def __init__(self, path: str, dtype) -> None:
        data = torch.load(path, weights_only=True)
        self.images, self.labels = data["images"].to(dtype), data["labels"].long()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.images[i], [self.labels[i]]


def output_list(out: Any) -> list[torch.Tensor]:
    """The model's outputs as a list, in ``model.outputs`` order (a tensor, a list of maps, or a dict)."""
    if isinstance(out, dict):
        return list(out.values())
    return list(out) if isinstance(out, list | tuple) else [out]


def loss_fn(outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
    """Sum over outputs of a per-sample mean: cross-entropy for ``[B, classes]``, mean squared error otherwise."""
    total = outputs[0].new_zeros(())
    for out, target in zip(outputs, targets, strict=True):
        total = total + (F.cross_entropy(out, target) if out.dim() == 2 else F.mse_loss(out, target))
    return total


# ---------------------------------------------------------------------------------------------------------------
# Training


def input_size(args: argparse.Namespace, model: nn.Module) -> tuple[int, int]:
    if not args.input:
        return tuple(model.spec.input.size)
    match = re.fullmatch(r"(\d+)x(\d+)", args.input)
    if not match:
        raise SystemExit(f"--input {args.input!r} must be HxW")
    return int(match[1]), int(match[2])


def build(args: argparse.Namespace, device: Any = None) -> nn.Module:
    """The model, identical on every rank (seeded), in the chosen dtype."""
    from blockgraph.cli import _overrides  # --set NAME=VALUE, parsed as the CLI parses it

    overrides = _overrides(args.set)
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    return bg.build_model(args.spec, variant=args.variant, overrides=overrides, device=device, dtype=dtype)


def output_shapes(model: nn.Module, size: tuple[int, int], dtype) -> list[list[int]]:
    """Each output's per-sample shape, from a forward on the meta device (no memory, no compute)."""
    replica = build_like(model, "meta")
    with torch.no_grad():
        out = replica(torch.empty(1, model.spec.input.channels, *size, device="meta", dtype=dtype))
    return [list(t.shape[1:]) for t in output_list(out)]


def build_like(model: nn.Module, device: Any) -> nn.Module:
    """A fresh model of the same spec (embedded in ``model.spec_data``) and outputs, on ``device``."""
    return bg.build_model(
        json.dumps(model.spec_data),  # JSON is YAML
        outputs=model.outputs if model.returns == "dict" else None,
        features_only=model.returns == "list",
        device=device,
        dtype=next(model.parameters()).dtype,
        max_params=None,
    )


def fsdp_wrap(model: nn.Module) -> nn.Module:
    """FSDP2: one unit per graph node with parameters and no shared module inside it (a shared module is called by
    several nodes, so it stays in the root unit, gathered for the whole forward), then the root."""
    from torch.distributed.fsdp import fully_shard

    shared = model.shared_modules()
    for name in model.nodes:
        module = model.get_submodule(name)
        owns_shared = any(s == name or s.startswith(name + ".") for s in shared)
        if not owns_shared and any(True for _ in module.parameters()):
            fully_shard(module)
    fully_shard(model)
    return model


def setup() -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...); a plain
    ``python examples/train_ddp.py`` runs as a single process without one."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def train(args: argparse.Namespace, on_step: StepHook | None = None) -> nn.Module:
    """Run ``args.steps`` optimizer steps; returns the trained (wrapped) model."""
    rank, world, device = setup()
    distributed = world > 1
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be divisible by the {world} ranks")
    model = build(args, device)
    dtype = next(model.parameters()).dtype
    size = input_size(args, model)
    model.inference.check(*size)  # a size the spec does not accept: its error, pointing into the spec
    if args.data:
        data = TensorFile(args.data, dtype)
    else:
        image = (model.spec.input.channels, *size)
        data = SyntheticData(args.steps * args.batch, image, output_shapes(model, size, dtype), args.seed, dtype)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(data, batch_size=args.batch // world, sampler=sampler, drop_last=True)
    if args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    net = model
    if args.fsdp:
        net = fsdp_wrap(model) if distributed else model
    elif distributed:
        ids = [device.index] if device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
    params = [p for p in net.parameters() if p.requires_grad]
    if args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    net.train()
    step, epoch, start = 0, 0, time.perf_counter()
    while step < args.steps:
        sampler.set_epoch(epoch)
        for images, targets in loader:
            images = images.to(device)
            loss = loss_fn(output_list(net(images)), [t.to(device) for t in targets])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if on_step is not None:
                on_step(step, net, loss.item())
            optimizer.step()
            step += 1
            if step % args.log_every == 0 or step == args.steps:
                shown = loss.detach().clone()
                if distributed:
                    dist.all_reduce(shown, op=dist.ReduceOp.AVG)  # the mean loss of the global batch
                if rank == 0:
                    rate = step * args.batch / (time.perf_counter() - start)
                    print(f"step {step}/{args.steps}  loss {shown.item():.4f}  {rate:.1f} images/s", flush=True)
            if step == args.steps:
                break
        epoch += 1
    if args.out:
        write_checkpoint(net, model, args.out, rank, fsdp=args.fsdp and distributed)
    return net


def write_checkpoint(net: nn.Module, model: nn.Module, path: str, rank: int, *, fsdp: bool) -> None:
    """Rank 0 writes the weights (with the spec) atomically; FSDP first gathers the full state dict (every rank
    takes part) into a plain copy of the model."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            plain = build_like(model, "cpu")
            plain.load_state_dict(full)
            save(plain, path)
    elif rank == 0:
        save(model, path)
    if rank == 0:
        print(f"wrote {path}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except bg.BlockgraphError as e:
        print(e.format(), flush=True)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
