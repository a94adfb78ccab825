"""Weight helpers for parity tests."""

from __future__ import annotations

import torch


def randomize_batchnorm(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Give every BatchNorm non-trivial statistics and affine terms, so that eval-mode BN is not close to the
    identity and no branch is silenced by a zero init (timm's zero_init_last zeroes residual branches)."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_(0.0, 0.2, generator=generator)
                m.running_var.uniform_(0.5, 2.0, generator=generator)
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.normal_(0.0, 0.2, generator=generator)


def ops_called(fn) -> set[str]:
    """The names of the ops ``fn()`` runs (torch.profiler's keys: ``aten::add_``, ``mkldnn::_linear_pointwise``)."""
    with torch.profiler.profile() as prof:
        fn()
    return {e.key for e in prof.key_averages()}
