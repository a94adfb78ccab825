"""Loading a timm twin's weights through the spec's key-rename rules, strictly."""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from blockgraph.compiler.checkpoint import is_checkpoint, read
from blockgraph.errors import WeightsError


def rename_key(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str:
    """Apply the first rule whose pattern matches ``key`` (``re.sub``, once); keys no rule matches stay."""
    for pattern, replacement in rules:
        if pattern.search(key):
            return pattern.sub(replacement, key, count=1)
    return key


def _twin_rules(model: nn.Module) -> tuple[Any, list[tuple[re.Pattern[str], str]]]:
    spec = getattr(model, "spec", None)
    twin = getattr(spec, "twin", None)
    if twin is None:
        raise WeightsError(
            f"spec '{getattr(spec, 'name', '?')}' names no timm twin", hint="add `twin: {timm: ..., rename: [...]}`"
        )
    return twin, [(re.compile(p), r) for p, r in twin.rules()]


def _rename(
    rules: list[tuple[re.Pattern[str], str]], state_dict: Mapping[str, Any], known: Callable[[str], bool]
) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """Rename twin keys onto keys ``known`` accepts: (mapped tensors, our key → twin key, twin keys that fit
    nothing)."""
    mapped: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    unexpected: list[str] = []
    for key, value in state_dict.items():
        target = rename_key(key, rules)
        if not known(target):
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
    return mapped, source, unexpected


def _listed(what: str, keys: list[str]) -> str:
    return f"{len(keys)} {what}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"


def map_state_dict(model: nn.Module, state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Rename a twin's state_dict onto ``model``'s keys.

    A twin may store one tensor under several keys (timm registers CoaT's shared CPE/CRPE under every block); such
    aliases map to one key of ours and must hold equal tensors.

    Raises:
        WeightsError: the spec names no twin, aliases disagree, keys are missing or unexpected, or shapes differ.
    """
    twin, rules = _twin_rules(model)
    spec = model.spec
    ours = model.state_dict()
    mapped, source, unexpected = _rename(rules, state_dict, ours.__contains__)
    if problems := _fit_problems(ours, mapped, unexpected):
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


def _unwrap(payload: Any, path: str) -> tuple[dict[str, torch.Tensor], str]:
    """The state_dict in a loaded file, and its layout: ``"blockgraph"`` (our checkpoint) or ``"state_dict"`` (a
    plain state_dict, possibly under ``state_dict``/``model`` as training scripts save it, ``module.``-prefixed by
    DDP)."""
    if is_checkpoint(payload):
        return dict(payload["state_dict"]), "blockgraph"
    if isinstance(payload, dict):
        for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
            if isinstance(payload.get(key), dict):
                payload = payload[key]
                break
    if not isinstance(payload, dict) or not payload or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise WeightsError(
            f"{path} holds no state_dict (a mapping of names to tensors)",
            hint="pass a blockgraph checkpoint (`blockgraph build --out`) or a file written by "
            "torch.save(model.state_dict(), path)",
        )
    if all(isinstance(k, str) and k.startswith("module.") for k in payload):
        payload = {k[len("module.") :]: v for k, v in payload.items()}
    return dict(payload), "state_dict"


def load_weights_file(model: nn.Module, path: str, *, resized_classifier: bool = False) -> list[str]:
    """Load a weights file into ``model``: a blockgraph checkpoint, a state_dict in our key layout, or the timm
    twin's state_dict (renamed through ``twin.rename``).

    The file may hold a complete model: the tensors of nodes and shared modules that ``model`` did not build (the
    classifier of a ``features_only`` model), known by their names in the spec's graph, are dropped. With
    ``resized_classifier`` (the caller chose ``num_classes``), a tensor of a classifier (a node whose block has
    ``num_classes``) whose shape differs from the file's in ``num_classes`` only is *skipped*: it keeps its fresh
    initialization, as timm does when ``num_classes`` differs from the pretrained head. Everything else must fit
    exactly.

    Returns:
        The skipped keys (a UserWarning names them too).

    Raises:
        WeightsError: the file cannot be read, or its tensors do not fit (missing, unexpected, shapes).
    """
    payload = read(path)
    state_dict, layout = _unwrap(payload, path)
    ours, spec, graph = model.state_dict(), model.spec, model.inference.graph
    built = {*model.nodes, *model.shared_modules(), model.spec.input.name}
    unbuilt = tuple(f"{name}." for name in [*graph.nodes, *graph.shared] if name not in built)
    classifiers = {
        f"{n}.": node.spec.num_classes for n, node in graph.nodes.items() if hasattr(node.spec, "num_classes")
    }

    def known(key: str) -> bool:
        return key in ours or key.startswith(unbuilt)

    if layout == "blockgraph" or all(map(known, state_dict)):
        mapped, unexpected = {k: v for k, v in state_dict.items() if k in ours}, [k for k in state_dict if not known(k)]
        source = {k: k for k in mapped}
        what = f"checkpoint of '{json.loads(payload['spec']).get('name')}'" if layout == "blockgraph" else "state_dict"
    else:
        twin, rules = _twin_rules(model)
        mapped, source, unexpected = _rename(rules, state_dict, known)
        what = f"{twin.timm or 'twin'} state_dict"
    if problems := _fit_problems(ours, mapped, unexpected):
        raise WeightsError(
            f"the {what} in {path} does not fit '{spec.name}': " + "; ".join(problems),
            hint="check that the file holds weights of this model (and variant); a timm twin's keys go through "
            "the spec's `twin.rename` rules",
        )
    load: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for key, target in ours.items():
        value = mapped[key]
        width = next((n for prefix, n in classifiers.items() if key.startswith(prefix)), None)  # its num_classes
        differ = {b for a, b in zip(value.shape, target.shape, strict=False) if a != b}  # our sizes that differ
        if tuple(value.shape) == tuple(target.shape):
            load[key] = value
        elif resized_classifier and value.dim() == target.dim() and differ == {width}:
            skipped.append(key)
        else:
            raise WeightsError(
                f"the {what} in {path} does not fit '{spec.name}': '{source[key]}' has shape {list(value.shape)}, "
                f"our '{key}' has {list(target.shape)}",
                hint="the file holds another size of model (check the variant and its variables); if only the "
                "classifier differs, pass num_classes=... (its weights then keep their fresh initialization)",
            )
    result = model.load_state_dict(load, strict=False)
    assert sorted(result.missing_keys) == sorted(skipped) and not result.unexpected_keys, result
    if skipped:
        warnings.warn(
            f"{spec.name}: {len(skipped)} tensor(s) of the classifier were not loaded from {path} (num_classes "
            f"differs) and keep their fresh initialization: {', '.join(skipped)}",
            UserWarning,
            stacklevel=3,
        )
    return skipped


def _fit_problems(ours: Mapping[str, Any], mapped: Mapping[str, Any], unexpected: list[str]) -> list[str]:
    """What keeps a renamed state_dict from loading strictly: our keys it lacks, and its keys we do not have."""
    missing = [k for k in ours if k not in mapped]
    return ([_listed("missing", missing)] if missing else []) + (
        [_listed("unexpected", unexpected)] if unexpected else []
    )
