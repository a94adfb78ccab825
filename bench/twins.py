"""The reference specs in specs/ and their timm twins, as the model benchmarks see them.

A spec's twin is its ``twin: {timm: NAME}``; the twins proper are the 15 spec files named like their timm model
(coat_lite_small.yaml ↔ timm's coat_lite_small). Family files (coat_lite.yaml) name the twin of their default
variant; they are benchmarked as specs of their own, not compared again.

timm's fused attention is switched on (:func:`tests.support.timm_oracle.set_fused`, also timm's default): timm's
ViT, DeiT, Swin and MobileViT attention then runs through ``F.scaled_dot_product_attention`` as ours does, so both
sides do the same math (CoaT's factorized attention has no fused path in either).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from report import matches

import blockgraph as bg
from tests.support.timm_oracle import create_timm, set_fused
from tests.support.weights import randomize_batchnorm


@dataclass(frozen=True)
class Reference:
    """One reference spec: its file, its timm twin (if any), and its native input."""

    name: str
    path: Path
    timm: str | None
    channels: int
    size: tuple[int, int]

    @property
    def is_twin(self) -> bool:
        """Whether this file is the twin's own spec (not a family file defaulting to it)."""
        return self.timm == self.name

    def input(self, batch: int, *, seed: int = 0, device: str = "cpu") -> torch.Tensor:
        """A random batch at the native size (the same values on every device)."""
        x = torch.randn(batch, self.channels, *self.size, generator=torch.Generator().manual_seed(seed))
        return x.to(device)


def references(only: str | None = None) -> list[Reference]:
    """The reference specs whose name matches ``only`` (see :func:`report.matches`), in name order."""
    out = []
    for name in bg.list_models():
        if not matches(name, only):
            continue
        path = bg.api.spec_path(name)
        spec = bg.analyze(path).spec
        twin = spec.twin.timm if spec.twin is not None else None
        out.append(Reference(name, path, twin, spec.input.channels, tuple(spec.input.size)))
    return out


def twins(only: str | None = None) -> list[Reference]:
    """The specs that are a timm model's own spec."""
    return [r for r in references(only) if r.is_twin]


def pair(ref: Reference, *, seed: int = 0, device: str = "cpu") -> tuple[torch.nn.Module, torch.nn.Module]:
    """Ours and the timm twin in eval mode with the same weights (timm's random init, BatchNorm statistics
    randomized so no branch is silenced) on ``device``, checked to take the same native input size."""
    assert ref.timm is not None, f"{ref.name} has no timm twin"
    set_fused(True)
    torch.manual_seed(seed)
    twin = create_timm(ref.timm).eval()
    randomize_batchnorm(twin, torch.Generator().manual_seed(seed + 1))
    ours = bg.build_model(ref.path).eval()
    bg.load_timm_state_dict(ours, twin.state_dict())
    native = tuple(twin.pretrained_cfg["input_size"][1:])
    if native != ref.size:
        raise ValueError(f"{ref.name}: spec input {ref.size} but timm's native input_size is {native}")
    return ours.to(device), twin.to(device)
