"""Checkpoints round-trip from the embedded spec alone; any altered bit, damaged or foreign file fails clearly (a
WeightsError naming the file, never another exception), never half-loaded; writing one leaves nothing behind."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import select
import signal
import struct
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import blockgraph as bg
from blockgraph.compiler import checkpoint
from blockgraph.compiler.checkpoint import save
from blockgraph.files import STALE_AFTER_S, write_atomic
from blockgraph.pipeline import analyze_embedded
from tests.conftest import ROOT

SMALL = {"depths": [1, 1, 1, 1], "dims": [16, 16, 16, 16], "num_classes": 10}
"""coat_lite_tiny at a width where its checkpoint is 200 kB."""


@pytest.fixture
def checkpoint_file(tmp_path: Path, run_cli) -> Path:
    path = tmp_path / "model.pt"
    code, _, err = run_cli("build", ROOT / "specs" / "coat_lite_tiny.yaml", "--out", path, "--set", "depths=[1,1,1,1]")
    assert code == 0, err
    return path


@pytest.fixture(scope="module")
def small() -> torch.nn.Module:
    torch.manual_seed(0)
    return bg.build_model("coat_lite_tiny", overrides=SMALL).eval()


@pytest.fixture(scope="module")
def small_file(small: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "small.pt"
    save(small, path)
    return path


def test_load_rebuilds_the_model_from_the_embedded_spec(checkpoint_file: Path) -> None:
    model = bg.load(checkpoint_file).eval()
    assert model.spec.name == "coat_lite_tiny"
    payload = torch.load(checkpoint_file, weights_only=True)
    state = model.state_dict()
    assert all(torch.equal(state[k], payload["state_dict"][k]) for k in state)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_every_tensor_has_its_digest(small: torch.nn.Module, small_file: Path) -> None:
    payload = torch.load(small_file, weights_only=True)
    assert payload["format"] == checkpoint.FORMAT
    digests = payload["sha256"]
    assert list(digests["state_dict"]) == list(small.state_dict())
    for name, tensor in small.state_dict().items():
        data = (
            json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode() + tensor.contiguous().numpy().tobytes()
        )
        assert digests["state_dict"][name] == hashlib.sha256(data).hexdigest()


def test_an_altered_spec_is_refused(checkpoint_file: Path, tmp_path: Path) -> None:
    payload = torch.load(checkpoint_file, weights_only=True)
    payload["spec"] = payload["spec"].replace('"num_classes": 1000', '"num_classes": 10')
    torch.save(payload, tmp_path / "altered.pt")
    with pytest.raises(bg.WeightsError, match="does not match its sha256"):
        bg.load(tmp_path / "altered.pt")


# ------------------------------------------------------------------------------------------------ altered bits


def _records(data: bytes) -> dict[str, tuple[int, int]]:
    """Where each record of a ``torch.save`` zip lies in the file: name -> (start, end) of its bytes."""
    out = {}
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
            start = info.header_offset + 30 + name_length + extra_length
            out[info.filename.split("/", 1)[1]] = (start, start + info.file_size)
    return out


def _tensor_bytes(path: Path) -> dict[str, tuple[int, int]]:
    """Where each tensor's bytes lie in a checkpoint: torch.save numbers the storages in the order it meets them,
    the state_dict's (no two tensors of these models share one)."""
    data = path.read_bytes()
    records = _records(data)
    state = torch.load(path, weights_only=True)["state_dict"]
    out = {name: records[f"data/{i}"] for i, name in enumerate(state)}
    assert all(end - start == state[k].numel() * state[k].element_size() for k, (start, end) in out.items())
    return out


def _loaders(path: Path) -> list[Callable[[], Any]]:
    """Every way a checkpoint is read: load, read, create_model(checkpoint_path=)."""
    return [
        lambda: bg.load(path),
        lambda: checkpoint.read(path),
        lambda: bg.create_model("coat_lite_tiny", checkpoint_path=path, overrides=SMALL),
    ]


@pytest.mark.parametrize("picks", [(0,), (1,), (-1,), (3, 20, -2)], ids=["first", "second", "last", "three"])
def test_a_flipped_bit_in_a_tensor_is_named(small_file: Path, tmp_path: Path, picks: tuple[int, ...]) -> None:
    where = _tensor_bytes(small_file)
    names = [list(where)[i] for i in picks]
    data = bytearray(small_file.read_bytes())
    for i, name in enumerate(names):
        start, end = where[name]
        data[start + (end - start) * i // len(names)] ^= 1 << (i % 8)
    path = tmp_path / "flipped.pt"
    path.write_bytes(bytes(data))
    for load in _loaders(path):
        with pytest.raises(bg.WeightsError, match=f"{len(names)} tensor\\(s\\) do not match their sha256") as info:
            load()
        assert all(f"'{name}'" in info.value.message for name in names)
        assert str(path) in str(info.value) and "write it again" in info.value.hint


def test_any_flipped_bit_is_an_error_or_changes_nothing(small_file: Path, tmp_path: Path) -> None:
    """Bits flipped anywhere in the file (tensors, the pickle, zip headers): each is a WeightsError, or lands where
    it changes nothing that is read (a zip header's time, the storage's location, which the load maps to the CPU)."""
    data = small_file.read_bytes()
    original = checkpoint.read(small_file)
    pickle = _records(data)["data.pkl"]
    rng = random.Random(0)
    positions = rng.sample(range(len(data)), 150) + rng.sample(range(*pickle), 150)
    path = tmp_path / "flipped.pt"
    errors = 0
    for position in positions:
        flipped = bytearray(data)
        flipped[position] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(flipped))
        try:
            payload = checkpoint.read(path)
        except bg.WeightsError:
            errors += 1
            continue
        assert {k: v for k, v in payload.items() if k != "state_dict"} == {
            k: v for k, v in original.items() if k != "state_dict"
        }, position
        assert list(payload["state_dict"]) == list(original["state_dict"]), position
        for name, tensor in original["state_dict"].items():
            got = payload["state_dict"][name]
            assert got.dtype == tensor.dtype and got.stride() == tensor.stride() and torch.equal(got, tensor), position
    assert errors > 200  # most land in tensors or in what the pickle says


# ------------------------------------------------------------------------------------------ damaged and foreign


def _sealed(payload: dict[str, Any]) -> dict[str, Any]:
    """A payload with the digests its fields have: a file crafted to pass every digest."""
    digests = {
        "spec": hashlib.sha256(payload["spec"].encode()).hexdigest(),
        "outputs": checkpoint.outputs_digest(payload["outputs"], payload["returns"]),
        "state_dict": {k: checkpoint.tensor_digest(k, v) for k, v in payload["state_dict"].items()},
    }
    return {**payload, "sha256": {**digests, "all": checkpoint._manifest(digests)}}


def _zip_without(data: bytes, name: str) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as archive, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as copy:
        for info in archive.infolist():
            if info.filename.split("/", 1)[1] != name:
                copy.writestr(info, archive.read(info))
    return out.getvalue()


def _saved(value: Any) -> bytes:
    out = io.BytesIO()
    torch.save(value, out)
    return out.getvalue()


def _cut(n: int) -> Callable[[bytes, dict[str, Any]], bytes]:
    return lambda data, payload: data[:n]


def _empty_zip() -> bytes:
    out = io.BytesIO()
    zipfile.ZipFile(out, "w").close()
    return out.getvalue()


def _random(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _fields(**changes: Any) -> Callable[[bytes, dict[str, Any]], bytes]:
    """A file whose payload has these fields changed (``None``: removed), its digests left as they were."""

    def make(data: bytes, payload: dict[str, Any]) -> bytes:
        changed = {**payload, **changes}
        return _saved({k: v for k, v in changed.items() if v is not None})

    return make


DAMAGED: dict[str, Callable[[bytes, dict[str, Any]], bytes]] = {
    "empty": lambda data, payload: b"",
    **{f"cut at {n}": _cut(n) for n in (1, 22, 100, 4096)},
    "cut in half": lambda data, payload: data[: len(data) // 2],
    "cut at the end": lambda data, payload: data[:-22],
    "one byte short": lambda data, payload: data[:-1],
    "random bytes": lambda data, payload: _random(5000, 1),
    "one random byte": lambda data, payload: _random(1, 2),
    "a zip of random bytes": lambda data, payload: b"PK\x03\x04" + _random(5000, 3),
    "no pickle": lambda data, payload: _zip_without(data, "data.pkl"),
    "no first tensor": lambda data, payload: _zip_without(data, "data/0"),
    "no last tensor": lambda data, payload: _zip_without(data, f"data/{len(payload['state_dict']) - 1}"),
    "an empty zip": lambda data, payload: _empty_zip(),
    "text": lambda data, payload: b"name: not a checkpoint\n",
    "a list": lambda data, payload: _saved([1, 2, 3]),
    "a tensor": lambda data, payload: _saved(torch.zeros(3)),
    "None": lambda data, payload: _saved(None),
    "a dict of numbers": lambda data, payload: _saved({"format": 1, "state_dict": 2}),
    "spec an int": _fields(spec=3),
    "spec missing": _fields(spec=None),
    "state_dict a list": _fields(state_dict=[torch.zeros(1)]),
    "state_dict of numbers": _fields(state_dict={"a": 1}),
    "state_dict keys not text": _fields(state_dict={1: torch.zeros(1)}),
    "outputs text": _fields(outputs="logits"),
    "outputs of numbers": _fields(outputs=[1]),
    "returns unknown": _fields(returns="tuple"),
    "digests missing": _fields(sha256=None),
    "digests a list": _fields(sha256=[1]),
    "tensor digests missing": lambda data, payload: _saved(
        {**payload, "sha256": {**payload["sha256"], "state_dict": 1}}
    ),
    "a tensor's digest a tensor": lambda data, payload: _saved(
        {**payload, "sha256": {**payload["sha256"], "state_dict": dict.fromkeys(payload["state_dict"], torch.ones(1))}}
    ),
    "a tensor removed, digests too": lambda data, payload: _saved(
        {
            **payload,
            "state_dict": dict(list(payload["state_dict"].items())[1:]),
            "sha256": {**payload["sha256"], "state_dict": dict(list(payload["sha256"]["state_dict"].items())[1:])},
        }
    ),
    "a future format": _fields(format="blockgraph-checkpoint/99"),
    "spec not a JSON object": lambda data, payload: _saved(_sealed({**payload, "spec": "[1, 2]"})),
    "spec not JSON": lambda data, payload: _saved(_sealed({**payload, "spec": "{name: x"})),
    "spec that does not build": lambda data, payload: _saved(_sealed({**payload, "spec": '{"name": "x"}'})),
    "weights of another size": lambda data, payload: _saved(
        _sealed({**payload, "state_dict": {k: torch.zeros(2) for k in payload["state_dict"]}})
    ),
}


WEIGHTS_FIT = {"spec that does not build"}
"""Its weights fit the model create_model builds by name: create_model reads weights, not the embedded spec."""


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_damaged_and_foreign_files_are_weights_errors(small_file: Path, tmp_path: Path, case: str) -> None:
    data = small_file.read_bytes()
    path = tmp_path / "damaged.pt"
    path.write_bytes(DAMAGED[case](data, torch.load(small_file, weights_only=True)))
    load, read, create = _loaders(path)
    for refused in (load,) if case in WEIGHTS_FIT else (load, create):
        with pytest.raises(bg.WeightsError) as info:
            refused()
        assert str(path) in str(info.value), info.value
    try:  # a file crafted to pass every digest is read; what it holds is refused by what builds from it
        read()
    except bg.WeightsError:
        pass


@pytest.mark.parametrize("keep", [0.5, 0.01])
def test_a_truncated_file_is_refused(checkpoint_file: Path, tmp_path: Path, keep: float) -> None:
    data = checkpoint_file.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(bg.WeightsError, match="cannot read .* as a checkpoint") as info:
        bg.load(tmp_path / "cut.pt")
    assert "truncated" in info.value.hint


def test_foreign_files_are_refused(tmp_path: Path) -> None:
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(bg.WeightsError, match="not a blockgraph checkpoint"):
        bg.load(tmp_path / "other.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(bg.WeightsError, match="cannot read"):
        bg.load(tmp_path / "text.pt")
    with pytest.raises(bg.WeightsError, match="no such checkpoint"):
        bg.load(tmp_path / "missing.pt")
    with pytest.raises(bg.WeightsError, match="it is a directory"):
        bg.load(tmp_path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.pt")
    with pytest.raises(bg.WeightsError, match=r"it is a FIFO \(named pipe\), not a file"):
        bg.load(tmp_path / "pipe.pt")


def test_a_checkpoint_of_the_first_format_loads_with_a_warning(small: torch.nn.Module, tmp_path: Path) -> None:
    """Files written before the tensors' digests: their spec is checked, their weights cannot be; they load."""
    spec = json.dumps(small.spec_data)
    payload = {"format": checkpoint.FORMAT_1, "spec": spec, "spec_sha256": hashlib.sha256(spec.encode()).hexdigest(),
               "outputs": list(small.outputs), "returns": small.returns, "state_dict": small.state_dict()}  # fmt: skip
    torch.save(payload, tmp_path / "old.pt")
    with pytest.warns(UserWarning, match="no digests of its tensors"):
        model = bg.load(tmp_path / "old.pt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), small.state_dict().values(), strict=True))
    torch.save({**payload, "spec": spec.replace('"num_classes": 10', '"num_classes": 11')}, tmp_path / "altered.pt")
    with pytest.raises(bg.WeightsError, match="the embedded spec does not match its sha256"):
        bg.load(tmp_path / "altered.pt")


# ------------------------------------------------------------------------------------ the spec is the embedded text


def test_the_embedded_spec_is_never_read_from_a_path(small: torch.nn.Module, tmp_path: Path) -> None:
    """A crafted checkpoint whose spec names a file (or a reference spec, or extends one, or imports a library of
    blocks): the file would build this very model, but the spec is the text in the checkpoint, and it is not one."""
    spec_file = tmp_path / "small.yaml"
    spec_file.write_text(json.dumps(small.spec_data))
    payload = {"format": checkpoint.FORMAT, "outputs": list(small.outputs), "returns": small.returns,
               "state_dict": small.state_dict()}  # fmt: skip
    not_json = "the checkpoint is damaged: its embedded spec is not a JSON object"
    crafted = {
        "a path": (str(spec_file), not_json),
        "a reference name": ("coat_lite_tiny", not_json),
        "extends a file": (
            json.dumps({"extends": str(spec_file)}),
            "does not build: an embedded spec cannot `extends:`",
        ),
        "imports a library": (
            json.dumps({**small.spec_data, "imports": [str(tmp_path / "lib.yaml")]}),
            "does not build: an embedded spec cannot import the block library",
        ),
    }
    (tmp_path / "lib.yaml").write_text("define: {}\n")
    path = tmp_path / "crafted.pt"
    for spec, message in crafted.values():
        torch.save(_sealed({**payload, "spec": spec}), path)
        with pytest.raises(bg.WeightsError, match=message):
            bg.load(path)
        with pytest.raises(bg.SpecError):  # what a checkpoint's (and a pickle's) spec goes through
            analyze_embedded(spec)
    torch.save(_sealed({**payload, "spec": json.dumps(small.spec_data)}), path)
    assert bg.load(path).spec.name == "coat_lite_tiny"  # the same file with its spec as text: it loads


def test_the_embedded_spec_keeps_the_declaration_order(tmp_path: Path) -> None:
    """Features (and outputs) are returned in the order they are declared: the checkpoint keeps it."""
    data = bg.analyze(ROOT / "specs" / "coat_lite_tiny.yaml", overrides={"depths": [1, 1, 1, 1]}).expanded.standalone()
    data["features"] = dict(reversed(data["features"].items()))  # stage4 first
    model = bg.build_model(json.dumps(data), features_only=True)
    save(model, tmp_path / "model.pt")
    loaded = bg.load(tmp_path / "model.pt")
    assert [f["name"] for f in loaded.feature_info] == ["stage4", "stage3", "stage2", "stage1"]
    assert list(loaded.feature_info) == list(model.feature_info) and loaded.code == model.code


def test_a_spec_over_the_parameter_budget_is_refused_before_it_is_built(small: torch.nn.Module, tmp_path: Path) -> None:
    save(small, tmp_path / "small.pt")
    with pytest.raises(bg.WeightsError, match="the embedded spec does not build: .* over the limit of 1,000"):
        bg.load(tmp_path / "small.pt", max_params=1000)


# ------------------------------------------------------------------------------------------------- writing


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_checkpoints_have_the_mode_of_any_new_file(small: torch.nn.Module, tmp_path: Path, umask: int) -> None:
    before = os.umask(umask)
    try:
        save(small, tmp_path / "model.pt")
        write_atomic(tmp_path / "schema.json", "{}")
    finally:
        os.umask(before)
    assert (tmp_path / "model.pt").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "schema.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_model_on_the_meta_device_is_not_written(tmp_path: Path) -> None:
    model = bg.build_model("coat_lite_tiny", overrides=SMALL, device="meta")
    with pytest.raises(bg.WeightsError, match="is on the meta device: it has no weights"):
        save(model, tmp_path / "model.pt")
    assert list(tmp_path.iterdir()) == []


_KILLED_WRITER = """
import sys, time, torch
import blockgraph.files
def stalled(obj, f, *args, **kwargs):  # the checkpoint half written, then the process waits to be killed
    f.write(b"x" * 1_000_000)
    f.flush()
    print("writing", flush=True)
    time.sleep(60)
torch.save = stalled
blockgraph.files._unnamed_files = sys.argv[2] == "unnamed"
from blockgraph.cli import main
main(["build", "coat_lite_tiny", "--set", "depths=[1,1,1,1]", "--set", "dims=[16,16,16,16]", "--out", sys.argv[1]])
"""


def _unnamed_files_work(directory: Path) -> bool:
    try:
        os.close(os.open(directory, os.O_TMPFILE | os.O_WRONLY, 0o600))
    except (AttributeError, OSError):
        return False
    return True


def _kill_while_writing(path: Path, how: str) -> None:
    """Run ``build --out path`` in a process, and SIGKILL it half-way through writing the checkpoint."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(path), how], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    try:
        ready, _, _ = select.select([process.stdout], [], [], 120)
        line = process.stdout.readline() if ready else b""
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    with process.stdout, process.stderr:
        assert line == b"writing\n", process.stderr.read().decode()


@pytest.mark.parametrize("how", ["unnamed", "named"])
def test_a_writer_killed_midway_leaves_no_temporary_file(small: torch.nn.Module, tmp_path: Path, how: str) -> None:
    """Linux: the data goes into an unnamed file, gone with the process. Elsewhere: a named one, which the next write
    beside it removes once it is old (one a live writer is still writing is kept)."""
    if how == "unnamed" and not _unnamed_files_work(tmp_path):
        pytest.skip("this file system makes no unnamed files (O_TMPFILE)")
    target = tmp_path / "model.pt"
    target.write_bytes(b"the old checkpoint")
    _kill_while_writing(target, how)
    assert target.read_bytes() == b"the old checkpoint"
    left = sorted(p.name for p in tmp_path.iterdir() if p != target)
    if how == "unnamed":
        assert left == []
        return
    assert len(left) == 1 and left[0].startswith(".blockgraph-") and left[0].endswith(".tmp")
    stale, fresh = tmp_path / left[0], tmp_path / ".blockgraph-0123456789abcdef.tmp"
    fresh.write_bytes(b"a live writer's")
    old = time.time() - STALE_AFTER_S - 60
    os.utime(stale, (old, old))
    save(small, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [fresh.name, "model.pt"]
    assert bg.load(target).spec.name == "coat_lite_tiny"


def test_writing_through_a_link_replaces_the_file_it_points_to(small: torch.nn.Module, tmp_path: Path) -> None:
    (tmp_path / "real.pt").write_bytes(b"old")
    (tmp_path / "link.pt").symlink_to("real.pt")
    save(small, tmp_path / "link.pt")
    assert (tmp_path / "link.pt").is_symlink() and bg.load(tmp_path / "real.pt").spec.name == "coat_lite_tiny"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.pt", "real.pt"]


# ----------------------------------------------------------------------------------------------------- safetensors


def _safetensors_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """Where each tensor's bytes lie in a safetensors file (its JSON header gives them after the 8-byte size)."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    base = 8 + size
    return {
        k: (base + v["data_offsets"][0], base + v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"
    }


@pytest.fixture(scope="module")
def small_safetensors(small: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "small.safetensors"
    save(small, path)
    return path


def test_a_safetensors_checkpoint_round_trips_without_pickle(small: torch.nn.Module, small_safetensors: Path) -> None:
    """`.safetensors`: the tensors, and the spec, outputs and digests in the metadata; no pickle in the file."""
    from safetensors import safe_open

    with safe_open(small_safetensors, framework="pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == checkpoint.FORMAT and json.loads(metadata["spec"])["name"] == "coat_lite_tiny"
    assert set(json.loads(metadata["sha256"])["state_dict"]) == set(small.state_dict())
    assert b"\x80\x02" not in small_safetensors.read_bytes()[:16]  # not a pickle (nor a zip of one)
    loaded = bg.load(small_safetensors).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
    assert list(loaded.state_dict()) == list(small.state_dict())


def test_a_flipped_bit_in_a_safetensors_tensor_is_named(small_safetensors: Path, tmp_path: Path) -> None:
    where = _safetensors_offsets(small_safetensors)
    name = sorted(where)[len(where) // 2]
    start, end = where[name]
    data = bytearray(small_safetensors.read_bytes())
    data[(start + end) // 2] ^= 0x10
    path = tmp_path / "flipped.safetensors"
    path.write_bytes(bytes(data))
    for load in _loaders(path):
        with pytest.raises(bg.WeightsError, match=f"1 tensor\\(s\\) do not match their sha256: '{name}'"):
            load()


@pytest.mark.parametrize("case", ["truncated", "header", "metadata", "random"])
def test_a_damaged_safetensors_file_is_a_weights_error(small_safetensors: Path, tmp_path: Path, case: str) -> None:
    data = small_safetensors.read_bytes()
    size = int.from_bytes(data[:8], "little")
    if case == "truncated":
        data = data[: len(data) // 2]
    elif case == "header":  # the JSON header cut short
        data = data[:8] + data[8 : 8 + size // 2].ljust(size, b" ") + data[8 + size :]
    elif case == "metadata":  # the digests' JSON made invalid (same length, so the header still parses)
        assert b'\\"state_dict\\":' in data
        data = data.replace(b'\\"state_dict\\":', b'\\"state_dict\\"=', 1)
    else:
        data = (size).to_bytes(8, "little") + b"{" + random.Random(0).randbytes(len(data) - 9)
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(data)
    with pytest.raises(bg.WeightsError):
        bg.load(path)


def test_a_twins_safetensors_loads_through_its_rename(tmp_path: Path) -> None:
    """timm's hub weights are `model.safetensors` state_dicts (shared tensors written once: save_model)."""
    from safetensors.torch import save_model

    from tests.support.timm_oracle import create_timm

    torch.manual_seed(0)
    twin = create_timm("coat_lite_tiny").eval()
    path = tmp_path / "model.safetensors"
    save_model(twin, str(path))
    ours = bg.create_model("coat_lite_tiny", checkpoint_path=path).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), twin(x), rtol=0, atol=1e-5)


def test_build_writes_safetensors_from_the_command_line(tmp_path: Path, run_cli) -> None:
    path = tmp_path / "model.safetensors"
    code, out, err = run_cli("build", "coat_lite_tiny", "--set", "depths=[1,1,1,1]", "--out", path)
    assert code == 0, err
    assert f"wrote {path}" in out and bg.load(path).spec.name == "coat_lite_tiny"
