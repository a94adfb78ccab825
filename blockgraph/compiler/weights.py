"""Loading a timm twin's weights through the spec's key-rename rules, strictly."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from blockgraph.errors import WeightsError


def rename_key(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str:
    """Apply the first rule whose pattern matches ``key`` (``re.sub``, once); keys no rule matches stay."""
    for pattern, replacement in rules:
        if pattern.search(key):
            return pattern.sub(replacement, key, count=1)
    return key


def map_state_dict(model: nn.Module, state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Rename a twin's state_dict onto ``model``'s keys.

    A twin may store one tensor under several keys (timm registers CoaT's shared CPE/CRPE under every block); such
    aliases map to one key of ours and must hold equal tensors.

    Raises:
        WeightsError: the spec names no twin, aliases disagree, keys are missing or unexpected, or shapes differ.
    """
    spec = getattr(model, "spec", None)
    twin = getattr(spec, "twin", None)
    if twin is None:
        raise WeightsError(
            f"spec '{getattr(spec, 'name', '?')}' names no timm twin", hint="add `twin: {timm: ..., rename: [...]}`"
        )
    rules = [(re.compile(p), r) for p, r in twin.rules()]
    ours = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    unexpected: list[str] = []
    for key, value in state_dict.items():
        target = rename_key(key, rules)
        if target not in ours:
            unexpected.append(f"{key} -> {target}" if target != key else key)
            continue
        if target in mapped:
            if mapped[target].shape != value.shape or not torch.equal(mapped[target], value):
                raise WeightsError(
                    f"twin keys '{source[target]}' and '{key}' both map to '{target}' but hold different values",
                    hint="only aliases of one shared tensor may map to the same key; check the rename rules",
                )
            continue
        mapped[target] = value
        source[target] = key
    missing = [k for k in ours if k not in mapped]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(
            f"{len(unexpected)} unexpected: {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}"
        )
    if problems:
        raise WeightsError(
            f"the {twin.timm or 'twin'} state_dict does not fit '{spec.name}': " + "; ".join(problems),
            hint="fix the spec's `twin.rename` rules (regex → our key) or the architecture",
        )
    for key, value in mapped.items():
        if tuple(value.shape) != tuple(ours[key].shape):
            raise WeightsError(
                f"'{source[key]}' has shape {list(value.shape)}, our '{key}' has {list(ours[key].shape)}",
                hint="the twin and the spec describe different sizes (check the variant and its variables)",
            )
    return mapped


def load_timm_state_dict(model: nn.Module, state_dict: Mapping[str, Any]) -> nn.Module:
    """Load a timm twin's ``state_dict`` into a compiled model (strict), renaming keys by the spec's rules."""
    mapped = map_state_dict(model, state_dict)
    model.load_state_dict(mapped, strict=True)
    return model
