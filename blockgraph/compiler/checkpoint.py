"""Checkpoints: a model's weights and its expanded spec, each with its sha256, written atomically; loading rebuilds
the model from the embedded spec alone and finds any altered bit.

A checkpoint is a ``torch.save`` of one dict, read back with ``weights_only=True``:

* ``format``: :data:`FORMAT`;
* ``spec``: the expanded spec, complete in itself, as JSON text (:meth:`~blockgraph.spec.expand.Expanded.standalone`);
* ``outputs``, ``returns``: the outputs ``forward`` returns, and how (``"tensor"``, ``"list"``, ``"dict"``);
* ``state_dict``: the weights, CPU tensors;
* ``sha256``: ``{"spec": ..., "outputs": ..., "state_dict": {key: ...}, "all": ...}``, the digests of the spec's
  text, of the outputs (:func:`outputs_digest`), of every tensor (:func:`tensor_digest`), and of these digests with
  the tensors' names in order (so a tensor cannot go missing, appear or be renamed unseen).

A path ending in ``.safetensors`` is written as a safetensors file instead: the tensors, and the other fields as text
in its metadata (``outputs`` and ``sha256`` as JSON); no pickle at all. Reading tells the kinds apart by their first
bytes, and a safetensors file without blockgraph's metadata is a plain state_dict (a timm twin's ``model.safetensors``
loads through ``twin.rename``).

Files of the first format (:data:`FORMAT_1`, a digest of the spec only) still load, with a warning that their weights
cannot be checked.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import stat
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn

import torch

from blockgraph.compiler import budget
from blockgraph.compiler.model import compile_model
from blockgraph.errors import BlockgraphError, PluginError, Pos, WeightsError
from blockgraph.files import atomic_output, file_kind
from blockgraph.pipeline import analyze_embedded

FORMAT = "blockgraph-checkpoint/2"
FORMAT_1 = "blockgraph-checkpoint/1"
"""The first format: no digests of the outputs or of the tensors (``spec_sha256``, the spec's, only)."""
_FAMILY = "blockgraph-checkpoint/"
RETURNS = ("tensor", "list", "dict")
SAFETENSORS = ".safetensors"
"""A checkpoint path ending so is written as a safetensors file (no pickle); reading recognizes either kind."""
_REWRITE = "write it again (`blockgraph build --out`), or copy it again from where it came"


def tensor_digest(name: str, tensor: torch.Tensor) -> str:
    """The sha256 of a tensor's name (its key in the state_dict), dtype, shape and bytes (in C order), as hex: the
    same tensor read from any file or device has the same digest; another value of any element, another dtype, shape
    or name, another."""
    data = tensor.detach()
    if data.layout != torch.strided:
        raise WeightsError(f"tensor '{name}' is {data.layout}: only dense tensors are checkpointed")
    data = data.cpu().resolve_conj().resolve_neg().contiguous()
    digest = hashlib.sha256(json.dumps([name, str(data.dtype), list(data.shape)]).encode())
    size = data.numel() * data.element_size()
    if size:  # the bytes as they are in memory (no copy): hashlib reads any buffer, and lets go of the GIL
        digest.update((ctypes.c_char * size).from_address(data.data_ptr()))
    return digest.hexdigest()


def outputs_digest(outputs: list[str], returns: str) -> str:
    """The sha256 of what ``forward`` returns: the outputs' names and how they are returned."""
    return hashlib.sha256(json.dumps({"outputs": outputs, "returns": returns}).encode()).hexdigest()


def _digests(state_dict: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """:func:`tensor_digest` of every tensor, several at a time (hashing runs outside the GIL), largest first."""
    keys = sorted(state_dict, key=lambda k: -state_dict[k].numel() * state_dict[k].element_size())
    workers = min(8, os.cpu_count() or 1, len(keys))
    if workers <= 1:
        return {k: tensor_digest(k, state_dict[k]) for k in state_dict}
    with ThreadPoolExecutor(workers) as pool:
        done = dict(zip(keys, pool.map(lambda k: tensor_digest(k, state_dict[k]), keys), strict=True))
    return {k: done[k] for k in state_dict}


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
    state = {k: v.detach().cpu() for k, v in state.items()}
    spec = json.dumps(model.spec_data)  # in declaration order: features and outputs are returned in it
    outputs = list(model.outputs)
    digests = {"spec": _sha256(spec), "outputs": outputs_digest(outputs, model.returns), "state_dict": _digests(state)}
    digests["all"] = _manifest(digests)
    payload = {"format": FORMAT, "spec": spec, "outputs": outputs, "returns": model.returns, "state_dict": state,
               "sha256": digests}  # fmt: skip
    if os.fspath(path).endswith(SAFETENSORS):
        data = _safetensors_bytes(payload)
        with atomic_output(path) as f:
            f.write(data)
        return
    with atomic_output(path) as f:
        try:
            torch.save(payload, f)
        except RuntimeError as e:  # torch reports a failed write (a full disk) as its own error
            if isinstance(written := e.__context__, OSError):
                raise OSError(written.errno, written.strerror) from e
            raise


def _safetensors_bytes(payload: dict[str, Any]) -> bytes:
    """The checkpoint as a safetensors file: the tensors, and the rest (format, spec, outputs, how they are
    returned, digests) as text in its metadata. No pickle: reading it runs no code."""
    from safetensors.torch import save as safetensors_save

    metadata = {"format": payload["format"], "spec": payload["spec"], "outputs": json.dumps(payload["outputs"]),
                "returns": payload["returns"], "sha256": json.dumps(payload["sha256"])}  # fmt: skip
    tensors = {k: v.contiguous() for k, v in payload["state_dict"].items()}
    return safetensors_save(tensors, metadata=metadata)


def _manifest(digests: Mapping[str, Any]) -> str:
    """The sha256 of the digests of the spec, the outputs and the tensors, names in order: a tensor removed, added,
    renamed or moved changes it."""
    tensors = list(digests["state_dict"].items())
    return _sha256(json.dumps([digests["spec"], digests["outputs"], tensors]))


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__


def read(path: str | os.PathLike[str]) -> Any:
    """The contents of a weights file (``torch.load`` with ``weights_only=True``, onto the CPU), as a
    :class:`WeightsError` when it cannot be read; a blockgraph checkpoint is checked whole: the type of every field,
    and the digests of its spec, its outputs and each of its tensors.

    Raises:
        WeightsError: the file is missing, not a regular file, unreadable, truncated, or a damaged checkpoint.
    """
    path = os.fspath(path)
    payload = _read(path)
    if is_checkpoint(payload):
        _check_tensors(payload, path)
    return payload


def is_checkpoint(payload: Any) -> bool:
    """Whether ``payload`` (a loaded file) is a blockgraph checkpoint."""
    return isinstance(payload, dict) and payload.get("format") in (FORMAT, FORMAT_1)


def _read(path: str) -> Any:
    """:func:`read` but for the digests of the tensors (the spec's and the outputs' are checked)."""
    where = Pos(path or "<checkpoint>")
    try:
        mode = os.stat(path).st_mode
    except ValueError as e:  # a NUL character in the path
        raise WeightsError(
            f"no such checkpoint: {path!r} (a path with a NUL character)", pos=Pos("<checkpoint>")
        ) from e
    except OSError as e:
        missing = isinstance(e, FileNotFoundError | NotADirectoryError)
        raise WeightsError(
            f"no such checkpoint: {path or repr(path)}" if missing else f"cannot read {path}: {e.strerror}",
            pos=where,
            hint="check the path (a file written by `blockgraph build --out`, or a state_dict)",
        ) from e
    if not stat.S_ISREG(mode):  # a FIFO or a device would hang or never end; a directory is no checkpoint
        raise WeightsError(
            f"cannot read {path} as a checkpoint: it is {file_kind(mode)}, not a file",
            pos=where,
            hint="name a checkpoint file (`blockgraph build --out`), or a state_dict's",
        )
    if _is_safetensors(path):
        payload = _read_safetensors(path)
    else:
        payload = _torch_load(path)
    if isinstance(payload, dict) and isinstance(payload.get("format"), str) and payload["format"].startswith(_FAMILY):
        _check_fields(payload, path)
    return payload


def _is_safetensors(path: str) -> bool:
    """Whether the file starts as a safetensors file does: an 8-byte little-endian header size, then ``{``."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < (100 << 20)


def _read_safetensors(path: str) -> Any:
    """A safetensors file: a blockgraph checkpoint (its metadata holds the fields, see :func:`_safetensors_bytes`),
    or a plain state_dict (a timm twin's ``model.safetensors``)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
        raise WeightsError(
            f"cannot read {path} as a safetensors file ({_first_line(e)})",
            pos=Pos(path),
            hint="the file is truncated or damaged; write it again (`blockgraph build --out model.safetensors`)",
        ) from e
    if not str(metadata.get("format", "")).startswith(_FAMILY):
        return state
    payload: dict[str, Any] = {"format": metadata["format"], "state_dict": state}
    for key in ("spec", "returns"):
        if key in metadata:
            payload[key] = metadata[key]
    for key in ("outputs", "sha256"):
        if key in metadata:
            try:
                payload[key] = json.loads(metadata[key])
            except ValueError:
                _damaged(path, f"its metadata '{key}' is not JSON")
    order = payload.get("sha256", {}).get("state_dict") if isinstance(payload.get("sha256"), dict) else None
    if isinstance(order, dict) and set(order) == set(state):  # safetensors sorts the tensors: the model's order back
        payload["state_dict"] = {k: state[k] for k in order}
    return payload


def _torch_load(path: str) -> Any:
    where = Pos(path or "<checkpoint>")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a truncated or foreign file
        raise WeightsError(
            f"cannot read {path} as a checkpoint ({_first_line(e)})",
            pos=where,
            hint="the file is truncated, or not a checkpoint of tensors (write one with `blockgraph build --out`)",
        ) from e


def _damaged(path: str, what: str, hint: str = f"the file is damaged, or was not written by blockgraph: {_REWRITE}"
             ) -> NoReturn:  # fmt: skip
    raise WeightsError(f"the checkpoint is damaged: {what}", pos=Pos(path), hint=hint)


def _check_fields(payload: dict[str, Any], path: str) -> None:
    """Check a checkpoint's fields, and the digests of its spec and outputs (see the module's docstring).

    Raises:
        WeightsError: a field is missing or of the wrong type, or a digest differs.
    """

    def field(name: str, kind: type, expected: str) -> Any:
        value = payload.get(name)
        if not isinstance(value, kind):
            found = "missing" if name not in payload else f"a {type(value).__name__}"
            _damaged(path, f"its field '{name}' should be {expected}, it is {found}")
        return value

    version = payload["format"]
    if version not in (FORMAT, FORMAT_1):
        raise WeightsError(
            f"{path} is a blockgraph checkpoint of format {version!r}, which this version cannot read (it reads "
            f"{FORMAT!r} and {FORMAT_1!r})",
            pos=Pos(path),
            hint="load it with the version of blockgraph that wrote it, or a newer one",
        )
    spec = field("spec", str, "the spec as JSON text")
    outputs = field("outputs", list, "a list of output names")
    returns = field("returns", str, f"one of {', '.join(RETURNS)}")
    state = field("state_dict", dict, "a mapping of names to tensors")
    if returns not in RETURNS:
        _damaged(path, f"its field 'returns' is {returns!r}, not one of {', '.join(RETURNS)}")
    if not all(isinstance(o, str) for o in outputs):
        _damaged(path, "its field 'outputs' should list names (text)")
    if odd := [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)][:3]:
        _damaged(path, f"its state_dict should map names to tensors: {', '.join(map(repr, odd))} do not")
    if odd := [k for k, v in state.items() if v.layout != torch.strided][:3]:
        _damaged(path, f"its state_dict holds tensors that are not dense: {', '.join(odd)}")
    if version == FORMAT_1:
        if payload.get("spec_sha256") != _sha256(spec):
            _damaged(path, "the embedded spec does not match its sha256", "rebuild the checkpoint from its spec")
        warnings.warn(
            f"{path}: a checkpoint of format {FORMAT_1!r} has no digests of its tensors, so damage to its weights "
            f"cannot be found; write it again to add them (`blockgraph.compiler.checkpoint.save(blockgraph.load(path), "
            "path)`)",
            UserWarning,
            stacklevel=4,
        )
    else:
        digests = field("sha256", dict, "the digests of the spec, the outputs and the tensors")
        if digests.get("spec") != _sha256(spec):
            _damaged(path, "the embedded spec does not match its sha256", "rebuild the checkpoint from its spec")
        if digests.get("outputs") != outputs_digest(outputs, returns):
            _damaged(path, "its outputs do not match their sha256")
        tensors = digests.get("state_dict")
        if not isinstance(tensors, dict) or not all(isinstance(v, str) for v in tensors.values()):
            _damaged(path, "the digests of its tensors are missing")
        ordered = {k: tensors.get(k) for k in state}  # the tensors the file holds, in its order
        if set(tensors) != set(state) or digests.get("all") != _manifest({**digests, "state_dict": ordered}):
            _damaged(path, "its list of tensors does not match its sha256 (a tensor was removed, added or renamed)")
    try:
        data = json.loads(spec)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        _damaged(path, "its embedded spec is not a JSON object")


def _check_tensors(payload: dict[str, Any], path: str) -> None:
    """Check the digest of every tensor of a checked checkpoint (:func:`_check_fields`); none in the first format.

    Raises:
        WeightsError: some tensors differ from their digests (named, the first eight).
    """
    if payload["format"] == FORMAT_1:
        return
    expected = payload["sha256"]["state_dict"]
    if altered := [k for k, digest in _digests(payload["state_dict"]).items() if expected[k] != digest]:
        shown = ", ".join(f"'{k}'" for k in altered[:8]) + (" ..." if len(altered) > 8 else "")
        _damaged(
            path,
            f"{len(altered)} tensor(s) do not match their sha256: {shown}",
            "the bytes of these weights changed after they were written (a disk, memory or transfer error, or an "
            f"edit): {_REWRITE}",
        )


def load(path: str | os.PathLike[str], *, device: Any = None, max_params: float | None = budget.DEFAULT_MAX_PARAMS
         ) -> Any:  # fmt: skip
    """Rebuild a model from a checkpoint written by :func:`save` (``blockgraph build --out``).

    The architecture comes from the embedded spec alone (the text in the file: no spec file is read); the file is
    checked whole (:func:`read`: the digests of the spec and of every tensor); the weights load strictly, read with
    ``weights_only=True``. Nothing in the file runs code: the modules of custom blocks that the spec imports
    (``imports:``) must be loaded first (``blockgraph.load_plugin``, ``--plugin``). A spec over ``max_params``
    parameters is refused before anything is allocated, as :func:`blockgraph.build_model` does.

    Raises:
        WeightsError: the file is missing, truncated, altered, not a blockgraph checkpoint, or over ``max_params``.
        PluginError: the spec imports a module of custom blocks that is not loaded.
    """
    path = os.fspath(path)
    payload = _read(path)
    if not is_checkpoint(payload):
        raise WeightsError(
            f"{path} is not a blockgraph checkpoint (format {payload.get('format') if isinstance(payload, dict) else None!r})",
            pos=Pos(path),
            hint=f"expected format {FORMAT!r}",
        )
    with ThreadPoolExecutor(1) as background:  # the tensors' digests are checked while the model is built
        checked = background.submit(_check_tensors, payload, path)
        try:
            model = _build(payload, path, device, max_params)
        finally:
            checked.result()  # a damaged file is said first; nothing is loaded from it
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except (RuntimeError, KeyError) as e:
        raise WeightsError(f"the weights do not fit the embedded spec: {_first_line(e)[:300]}", pos=Pos(path)) from e
    return model


def _build(payload: dict[str, Any], path: str, device: Any, max_params: float | None) -> Any:
    """The model of a checkpoint's embedded spec, its weights freshly initialized."""
    returns = payload["returns"]
    try:
        analysis = analyze_embedded(payload["spec"], file=path, allow_imports=False)
        if max_params is not None and str(device) != "meta":
            budget.check(analysis.inference, tuple(analysis.spec.input.size), max_params=max_params)
        return compile_model(
            analysis,
            outputs=payload["outputs"] if returns in ("dict", "list") else None,
            features_only=returns == "list",
            device=device,
        )
    except PluginError as e:  # the checkpoint is where it was asked for (its spec is JSON text)
        raise PluginError(e.message, pos=Pos(path), hint=e.hint) from e
    except BlockgraphError as e:
        raise WeightsError(f"the embedded spec does not build: {e.message}", pos=Pos(path), hint=e.hint) from e
