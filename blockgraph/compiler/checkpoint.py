"""Checkpoints: the weights with the expanded spec embedded (and its sha256), written atomically
(:func:`blockgraph.files.atomic_output`); loading rebuilds the model from the embedded spec alone."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch

from blockgraph.compiler.model import compile_model
from blockgraph.errors import BlockgraphError, PluginError, Pos, WeightsError
from blockgraph.files import atomic_output
from blockgraph.pipeline import analyze_embedded

FORMAT = "blockgraph-checkpoint/1"


def save(model: Any, path: str | os.PathLike[str]) -> None:
    """Write ``model``'s weights and spec to ``path``, atomically (:func:`blockgraph.files.atomic_output`): a crash or
    a kill leaves the old file (or none) and no temporary file.

    Raises:
        WeightsError: the model is on the meta device (it has no weights).
        BlockgraphError: ``path`` is not a regular file, or cannot be written.
    """
    state = model.state_dict()
    if any(t.is_meta for t in state.values()):
        raise WeightsError(
            f"'{model.spec.name}' is on the meta device: it has no weights to write to {os.fspath(path)}",
            pos=Pos(os.fspath(path) or "<output>"),
            hint="build it on a real device (without --device meta) to write a checkpoint",
        )
    spec_json = json.dumps(model.spec_data)  # in declaration order: features and outputs are returned in it
    payload = {
        "format": FORMAT,
        "spec": spec_json,
        "spec_sha256": hashlib.sha256(spec_json.encode()).hexdigest(),
        "outputs": list(model.outputs),
        "returns": model.returns,
        "state_dict": state,
    }
    with atomic_output(path) as f:
        try:
            torch.save(payload, f)
        except RuntimeError as e:  # torch reports a failed write (a full disk) as its own error
            if isinstance(written := e.__context__, OSError):
                raise OSError(written.errno, written.strerror) from e
            raise


def read(path: str | os.PathLike[str], *, device: Any = None) -> Any:
    """The contents of a weights file (``torch.load`` with ``weights_only=True``), as a :class:`WeightsError` when it
    cannot be read; a blockgraph checkpoint's embedded spec is checked against its sha256."""
    path = os.fspath(path)
    where = Pos(path)
    try:
        payload = torch.load(path, map_location=device or "cpu", weights_only=True)
    except FileNotFoundError as e:
        raise WeightsError(f"no such checkpoint: {path}", pos=where) from e
    except Exception as e:  # noqa: BLE001 - torch raises many types for a truncated or foreign file
        raise WeightsError(
            f"cannot read {path} as a checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
            pos=where,
            hint="the file is truncated, or not a checkpoint of tensors (write one with `blockgraph build --out`)",
        ) from e
    if is_checkpoint(payload):
        spec = payload.get("spec")
        if not isinstance(spec, str) or hashlib.sha256(spec.encode()).hexdigest() != payload.get("spec_sha256"):
            raise WeightsError(
                "the embedded spec does not match its sha256: the checkpoint was altered",
                pos=where,
                hint="rebuild the checkpoint from its spec",
            )
    return payload


def is_checkpoint(payload: Any) -> bool:
    """Whether ``payload`` (a loaded file) is a blockgraph checkpoint."""
    return isinstance(payload, dict) and payload.get("format") == FORMAT


def load(path: str | os.PathLike[str], *, device: Any = None) -> Any:
    """Rebuild a model from a checkpoint written by :func:`save` (``blockgraph build --out``).

    The architecture comes from the embedded spec alone (the text in the file: no spec file is read); its hash is
    checked; the weights
    load strictly with ``weights_only=True``. Nothing in the file runs code: the modules of custom blocks that the
    spec imports (``imports:``) must be loaded first (``blockgraph.load_plugin``, ``--plugin``).

    Raises:
        WeightsError: the file is missing, truncated, altered, or not a blockgraph checkpoint.
        PluginError: the spec imports a module of custom blocks that is not loaded.
    """
    path = os.fspath(path)
    payload = read(path, device=device)  # (the embedded spec's sha256 checked)
    if not is_checkpoint(payload):
        raise WeightsError(
            f"{path} is not a blockgraph checkpoint (format {payload.get('format') if isinstance(payload, dict) else None!r})",
            pos=Pos(path),
            hint=f"expected format {FORMAT!r}",
        )
    returns = payload.get("returns")
    try:
        model = compile_model(
            analyze_embedded(payload["spec"], file=path, allow_imports=False),
            outputs=payload.get("outputs") if returns in ("dict", "list") else None,
            features_only=returns == "list",
            device=device,
        )
    except PluginError as e:  # the checkpoint is where it was asked for (its spec is JSON text)
        raise PluginError(e.message, pos=Pos(path), hint=e.hint) from e
    except BlockgraphError as e:
        raise WeightsError(f"the embedded spec does not build: {e.message}", pos=Pos(path), hint=e.hint) from e
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except (RuntimeError, KeyError) as e:
        raise WeightsError(
            f"the weights do not fit the embedded spec: {str(e).splitlines()[0][:300]}", pos=Pos(path)
        ) from e
    return model
