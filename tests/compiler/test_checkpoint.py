"""Checkpoints round-trip from the embedded spec alone; damaged files fail clearly, never half-loaded."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

import blockgraph as bg
from blockgraph.compiler.checkpoint import save
from blockgraph.pipeline import analyze_embedded
from tests.conftest import ROOT


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
