"""Checkpoints round-trip from the embedded spec alone; damaged files fail clearly, never half-loaded; writing one
leaves nothing behind."""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import blockgraph as bg
from blockgraph.compiler.checkpoint import save
from blockgraph.files import STALE_AFTER_S, write_atomic
from blockgraph.pipeline import analyze_embedded
from tests.conftest import ROOT

SMALL = {"depths": [1, 1, 1, 1], "dims": [16, 16, 16, 16], "num_classes": 10}
"""coat_lite_tiny at a width where its checkpoint is 200 kB."""


@pytest.fixture(scope="module")
def small() -> torch.nn.Module:
    torch.manual_seed(0)
    return bg.build_model("coat_lite_tiny", overrides=SMALL).eval()


@pytest.fixture
def checkpoint(tmp_path: Path, run_cli) -> Path:
    path = tmp_path / "model.pt"
    code, _, err = run_cli("build", ROOT / "specs" / "coat_lite_tiny.yaml", "--out", path, "--set", "depths=[1,1,1,1]")
    assert code == 0, err
    return path


def test_load_rebuilds_the_model_from_the_embedded_spec(checkpoint: Path) -> None:
    model = bg.load(checkpoint).eval()
    assert model.spec.name == "coat_lite_tiny"
    payload = torch.load(checkpoint, weights_only=True)
    state = model.state_dict()
    assert all(torch.equal(state[k], payload["state_dict"][k]) for k in state)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_an_altered_spec_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    payload = torch.load(checkpoint, weights_only=True)
    payload["spec"] = payload["spec"].replace('"num_classes": 1000', '"num_classes": 10')
    torch.save(payload, tmp_path / "altered.pt")
    with pytest.raises(bg.WeightsError, match="does not match its sha256"):
        bg.load(tmp_path / "altered.pt")


@pytest.mark.parametrize("keep", [0.5, 0.01])
def test_a_truncated_file_is_refused(checkpoint: Path, tmp_path: Path, keep: float) -> None:
    data = checkpoint.read_bytes()
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


def test_the_embedded_spec_keeps_the_declaration_order(tmp_path: Path) -> None:
    """Features (and outputs) are returned in the order they are declared: the checkpoint keeps it."""
    data = bg.analyze(ROOT / "specs" / "coat_lite_tiny.yaml", overrides={"depths": [1, 1, 1, 1]}).expanded.standalone()
    data["features"] = dict(reversed(data["features"].items()))  # stage4 first
    model = bg.build_model(json.dumps(data), features_only=True)
    save(model, tmp_path / "model.pt")
    loaded = bg.load(tmp_path / "model.pt")
    assert [f["name"] for f in loaded.feature_info] == ["stage4", "stage3", "stage2", "stage1"]
    assert list(loaded.feature_info) == list(model.feature_info) and loaded.code == model.code


def test_the_embedded_spec_is_never_read_from_a_path(checkpoint: Path, tmp_path: Path) -> None:
    """A crafted checkpoint whose spec names a file (or a reference spec, or extends one, or imports a library of
    blocks): the file would build this very model, but the spec is the text in the checkpoint, and it is not one."""
    payload = torch.load(checkpoint, weights_only=True)
    spec_file = tmp_path / "tiny.yaml"
    spec_file.write_text(payload["spec"])
    (tmp_path / "lib.yaml").write_text("define: {}\n")
    crafted = {
        str(spec_file): "a spec must be a mapping",
        "coat_lite_tiny": "a spec must be a mapping",
        json.dumps({"extends": str(spec_file)}): "an embedded spec cannot `extends:` a file",
        json.dumps({**json.loads(payload["spec"]), "imports": [str(tmp_path / "lib.yaml")]}): (
            "an embedded spec cannot import the block library"
        ),
    }
    for spec, message in crafted.items():
        sha256 = hashlib.sha256(spec.encode()).hexdigest()
        torch.save({**payload, "spec": spec, "spec_sha256": sha256}, tmp_path / "crafted.pt")
        with pytest.raises(bg.WeightsError, match=f"the embedded spec does not build: {message}"):
            bg.load(tmp_path / "crafted.pt")
        with pytest.raises(bg.SpecError, match=message):  # what a checkpoint's (and a pickle's) spec goes through
            analyze_embedded(spec)


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
