"""Loading weights, strictly: a timm twin's state_dict through the spec's key-rename rules, and weights files."""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from blockgraph.compiler.checkpoint import is_checkpoint, read
from blockgraph.errors import WeightsError, excerpt, shorten
from blockgraph.spec import patterns

MAX_KEY_CHARS = 1_000
"""The longest state_dict key accepted (a model's keys have well under 200 characters): rename patterns run in time
proportional to a key's length at each place they are tried, so a bound on keys bounds renaming."""


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
    try:
        return twin, [(patterns.compile(p), r) for p, r in twin.rules()]
    except patterns.UnsafePatternError as e:  # (a spec that was validated never has one)
        raise WeightsError(f"spec '{spec.name}': a `twin.rename` pattern is refused: {e}") from None


def _rename(
    rules: list[tuple[re.Pattern[str], str]], state_dict: Mapping[str, Any], known: Callable[[str], bool]
) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """Rename keys by ``rules`` onto those ``known`` accepts: (mapped tensors, our key → theirs, keys fitting none)."""
    mapped: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    unexpected: list[str] = []
    for key, value in state_dict.items():
        if not isinstance(key, str) or len(key) > MAX_KEY_CHARS:
            raise WeightsError(
                f"the state_dict has a key that is not a name of at most {MAX_KEY_CHARS:,} characters: {excerpt(key)}",
                hint="is it a state_dict of a model? (torch.save(model.state_dict(), path))",
            )
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
    return f"{len(keys)} {what}: {', '.join(shorten(k, 100) for k in keys[:8])}{' ...' if len(keys) > 8 else ''}"


def load_timm_state_dict(model: nn.Module, state_dict: Mapping[str, Any]) -> nn.Module:
    """Load a timm twin's ``state_dict`` into a compiled model, strictly, renaming keys by the spec's rules.

    A twin may store one tensor under several keys (timm registers CoaT's shared CPE/CRPE under every block); such
    aliases map to one key of ours and must hold equal tensors.

    Raises:
        WeightsError: the spec names no twin, aliases disagree, keys are missing or unexpected, or shapes differ.
    """
    twin, rules = _twin_rules(model)
    _load(model, *_rename(rules, state_dict, model.state_dict().__contains__), f"{twin.timm or 'twin'} state_dict")
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
    ours, graph = model.state_dict(), model.inference.graph
    built = {*model.nodes, *model.shared_modules(), *model.spec.input_specs()}
    unbuilt = tuple(f"{name}." for name in [*graph.nodes, *graph.shared] if name not in built)
    heads = [(f"{n}.", node.spec.num_classes) for n, node in graph.nodes.items() if hasattr(node.spec, "num_classes")]

    def known(key: str) -> bool:
        return key in ours or key.startswith(unbuilt)

    if layout == "blockgraph" or all(map(known, state_dict)):  # our keys: no renaming
        rules = []
        what = f"checkpoint of '{json.loads(payload['spec']).get('name')}'" if layout == "blockgraph" else "state_dict"
    else:
        twin, rules = _twin_rules(model)
        what = f"{twin.timm or 'twin'} state_dict"
    mapped, source, unexpected = _rename(rules, state_dict, known)
    return _load(model, mapped, source, unexpected, f"{what} in {path}", heads if resized_classifier else [])


def adapt_input_conv(channels: int, weight: torch.Tensor) -> torch.Tensor:
    """A first convolution's weight ``[O, I, kh, kw]`` (I = 3, RGB) for ``channels`` input channels, as timm's
    ``adapt_input_conv``: one channel takes the sum over the three (a grey image's response to equal R, G, B);
    more take the RGB filters repeated and scaled by ``3 / channels`` (the same response to a constant image).

    Raises:
        WeightsError: the file's conv does not have 3 input channels (no rule to adapt it).
    """
    out, given, kh, kw = weight.shape
    if channels == 1 and given > 3 and given % 3 == 0:  # several RGB groups: sum within each
        return weight.float().reshape(out, given // 3, 3, kh, kw).sum(2).to(weight.dtype)
    if channels == 1:
        return weight.float().sum(1, keepdim=True).to(weight.dtype)
    if given != 3:
        raise WeightsError(f"cannot adapt a first convolution of {given} input channels to {channels}")
    repeat = -(-channels // 3)
    return (weight.float().repeat(1, repeat, 1, 1)[:, :channels] * (3 / channels)).to(weight.dtype)


def _first_conv_weight(model: nn.Module) -> str | None:
    from blockgraph.compiler.timm_api import _first_conv

    name = _first_conv(model)
    return f"{name}.weight" if name is not None else None


def _load(
    model: nn.Module,
    mapped: Mapping[str, torch.Tensor],
    source: Mapping[str, str],
    unexpected: list[str],
    what: str,
    heads: Sequence[tuple[str, int]] = (),
) -> list[str]:
    """Load ``mapped`` (our key → tensor; ``source``: our key → the file's) into ``model``: every key of ours,
    none ``unexpected``, each of our shapes, except that a tensor under the prefix of one of the ``heads`` (prefix,
    num_classes) that differs in num_classes only is skipped (fresh initialization, a UserWarning). Returns the
    skipped keys."""
    ours, name = model.state_dict(), model.spec.name
    missing = [k for k in ours if k not in mapped]
    if problems := [_listed(w, keys) for w, keys in (("missing", missing), ("unexpected", unexpected)) if keys]:
        raise WeightsError(
            f"the {what} does not fit '{name}': " + "; ".join(problems),
            hint="check that the file holds weights of this model (and variant); a timm twin's keys go through "
            "the spec's `twin.rename` rules",
        )
    load: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    first = _first_conv_weight(model)
    for key, target in ours.items():
        value = mapped[key]
        if key == first and value.dim() == 4 and value.shape[1] != target.shape[1]:
            value = adapt_input_conv(target.shape[1], value)  # in_chans other than the file's, as timm adapts it
        width = next((n for prefix, n in heads if key.startswith(prefix)), None)
        differ = {b for a, b in zip(value.shape, target.shape, strict=False) if a != b}  # our sizes that differ
        if tuple(value.shape) == tuple(target.shape):
            load[key] = value
        elif value.dim() == target.dim() and differ == {width}:
            skipped.append(key)
        else:
            raise WeightsError(
                f"the {what} does not fit '{name}': '{source[key]}' has shape {list(value.shape)}, our '{key}' has "
                f"{list(target.shape)}",
                hint="the weights are of another size of model (check the variant and its variables); if only the "
                "classifier differs, pass num_classes=... (its weights then keep their fresh initialization)",
            )
    result = model.load_state_dict(load, strict=False)
    assert sorted(result.missing_keys) == sorted(skipped) and not result.unexpected_keys, result
    if skipped:
        warnings.warn(
            f"{name}: {len(skipped)} tensor(s) of the classifier were not loaded from the {what} (num_classes "
            f"differs) and keep their fresh initialization: {', '.join(skipped)}",
            UserWarning,
            stacklevel=4,
        )
    return skipped
