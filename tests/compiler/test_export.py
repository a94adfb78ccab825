"""ONNX export (blockgraph.compiler.export, ``cli.py export``): the exported graphs run in onnxruntime and agree with
eager PyTorch; the deformable encoder's core exports as plain gathers; the CLI's errors and atomic writes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import blockgraph as bg
from blockgraph.compiler.export import export_onnx
from blockgraph.spec.references import SPEC_DIR
from tests.conftest import ROOT
from tests.support.specs import shrunk
from tests.support.weights import randomize_batchnorm

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

TOL = 1e-4

MODELS = {
    # name: outputs compared (None: the spec's default outputs)
    "coat_lite_small": None,
    "vit_base_patch16_224": None,
    "mpvit_tiny": None,
    "swin_tiny_patch4_window7_224": None,
    "mobilevit_s": None,
    "deformable_encoder": ["memory", "l0", "l1", "l2", "l3"],
}
DEPTHS = {"swin_tiny_patch4_window7_224": {"depths": [2, 2, 2, 2]}}
"""Depths other than one per stage: Swin's second block of a stage shifts its windows (a roll and a mask)."""


def random_model(name: str, outputs: list[str] | None = None) -> torch.nn.Module:
    """A reference model with one block per stage (or :data:`DEPTHS`: every kind of block the full model has;
    exporting a deeper one repeats the same code) and random weights: its own init, then every parameter perturbed
    (zero inits such as Deformable-DETR's sampling offsets or layer scales would silence a branch) and BatchNorm
    statistics drawn."""
    torch.manual_seed(0)
    overrides = shrunk(SPEC_DIR / f"{name}.yaml") | DEPTHS.get(name, {})
    model = bg.build_model(name, overrides=overrides, outputs=outputs).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    randomize_batchnorm(model, gen)
    return model


def run_onnx(path: Path, image: torch.Tensor) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {session.get_inputs()[0].name: image.numpy()}), strict=True))


def eager_outputs(model: torch.nn.Module, image: torch.Tensor) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = model(image)
    if isinstance(out, dict):
        return {k: v.numpy() for k, v in out.items()}
    values = out if isinstance(out, list | tuple) else [out]
    return {k: v.numpy() for k, v in zip(model.outputs, values, strict=True)}


@pytest.mark.parametrize("name", list(MODELS))
def test_exported_graph_matches_eager(name: str, tmp_path: Path) -> None:
    """Native size, dynamic batch: traced at batch 2, run at batch 1; every output within 1e-4 of eager."""
    model = random_model(name, MODELS[name])
    path = tmp_path / f"{name}.onnx"
    result = export_onnx(model, path)
    h, w = model.spec.input.size
    assert result.inputs == {model.spec.input.name: ["batch", 3, h, w]}
    assert list(result.outputs) == model.outputs and all(s[0] == "batch" for s in result.outputs.values())
    assert os.listdir(tmp_path) == [path.name]
    image = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(2))
    got, expected = run_onnx(path, image), eager_outputs(model, image)
    assert list(got) == list(expected)
    for key, e in expected.items():
        assert got[key].shape == e.shape, key
        err = float(np.abs(got[key] - e).max())
        assert err <= TOL, f"{name}: output {key} differs from eager by {err:.3g}"
    ops = {(n.domain, n.op_type) for n in onnx.load(str(path), load_external_data=False).graph.node}
    assert {domain for domain, _ in ops} <= {"", "ai.onnx"}, f"non-standard ops: {sorted(ops)}"
    if name == "deformable_encoder":  # the sampling core: plain gathers, neither GridSample nor a custom op
        assert ("", "Gather") in ops and not any(op == "GridSample" for _, op in ops)


def test_dynamic_size_runs_at_other_accepted_sizes(tmp_path: Path) -> None:
    """CoaT-Lite accepts H >= 32, W >= 32: traced at 64x96, the graph runs at 32x160 and 96x64."""
    torch.manual_seed(0)
    model = bg.build_model(TINY, overrides={"depths": [1, 1, 1, 1]}).eval()
    path = tmp_path / "tiny.onnx"
    result = export_onnx(model, path, input_size=(64, 96), dynamic_size=True)
    assert result.inputs == {"image": ["batch", 3, "H", "W"]}
    for h, w in ((32, 160), (96, 64)):
        image = torch.randn(1, 3, h, w)
        got, expected = run_onnx(path, image)["logits"], eager_outputs(model, image)["logits"]
        assert np.abs(got - expected).max() <= TOL, (h, w)


def test_dynamic_size_needs_an_open_range(tmp_path: Path) -> None:
    """ViT's fixed position embeddings take 224 <= H <= 239 only: refused before tracing."""
    model = bg.create_model("vit_tiny_patch16_224", device="meta")
    with pytest.raises(bg.BlockgraphError, match=r"no open range of H around 224") as info:
        export_onnx(model, tmp_path / "vit.onnx", dynamic_size=True)
    assert "224 <= H <= 239" in info.value.message and os.listdir(tmp_path) == []


def test_an_axis_the_exporter_fixed_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.onnx falls back to other capture strategies when torch.export refuses a dynamic dim, and the graph it
    returns may be static (the deformable encoder with --dynamic-size): that is reported, not written."""

    class Static:  # what the exporter returned: an input fixed at the traced size
        model = type("M", (), {"graph": type("G", (), {"inputs": [type("V", (), {"shape": [2, 3, 40, 48]})]})})

    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: Static())
    model = bg.build_model(TINY, overrides={"depths": [1, 1, 1, 1]}, device="meta")
    with pytest.raises(bg.BlockgraphError, match="could not keep batch and H and W of 'coat_lite_tiny' dynamic"):
        export_onnx(model, tmp_path / "x.onnx", input_size=(40, 48), dynamic_size=True)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------
# The CLI

TINY = ROOT / "specs" / "coat_lite_tiny.yaml"
SMALL_ARGS = ("--set", "depths=[1,1,1,1]", "--input", "32x48")  # a quick export


def test_cli_export_writes_the_file_and_reports_it(tmp_path: Path, run_cli) -> None:
    out = tmp_path / "tiny.onnx"
    ckpt = tmp_path / "tiny.pt"
    code, _, err = run_cli("build", TINY, "--set", "depths=[1,1,1,1]", "--out", ckpt)
    assert code == 0, err
    code, text, err = run_cli("export", TINY, *SMALL_ARGS, "--onnx", out, "--batch", "3", "--weights", ckpt)
    assert code == 0, err
    assert text.startswith(f"wrote {out} (ONNX opset ") and "image [3, 3, 32, 48] -> logits [3, 1000]" in text
    assert sorted(os.listdir(tmp_path)) == ["tiny.onnx", "tiny.pt"]  # nothing else left behind
    model = bg.load(ckpt).eval()  # the checkpoint's weights, not a fresh init
    image = torch.randn(3, 3, 32, 48)
    got = run_onnx(out, image)["logits"]
    assert np.abs(got - eager_outputs(model, image)["logits"]).max() <= TOL


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((ROOT / "specs" / "nope.yaml",), "no such file"),
        ((TINY, "--input", "16x16"), "input 16x16"),
        ((TINY, "--input", "3x"), "is not CxHxW or HxW"),
        ((TINY, "--batch", "0"), "batch must be a whole number from 1 to 1,000,000, got 0"),
        ((TINY, "--opset", "11"), "opset 11 is too old"),
        ((TINY, "--weights", "/nonexistent/missing.pt"), "no such checkpoint"),
    ],
    ids=["unknown spec", "input too small", "bad input", "batch", "opset", "weights"],
)
def test_cli_export_errors(args: tuple, message: str, tmp_path: Path, run_cli) -> None:
    code, _, err = run_cli("export", *args, "--onnx", tmp_path / "x.onnx")
    assert code == 2 and message in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []


def test_cli_export_unwritable_paths(tmp_path: Path, run_cli) -> None:
    code, _, err = run_cli("export", TINY, "--onnx", tmp_path / "no" / "x.onnx")
    assert code == 2 and "no directory" in err
    code, _, err = run_cli("export", TINY, "--onnx", tmp_path)
    assert code == 2 and "is a directory" in err
    code, _, err = run_cli("export", TINY, "--onnx", "")
    assert code == 2 and "the output path is empty" in err
    if os.path.exists("/dev/null"):
        code, _, err = run_cli("export", TINY, "--onnx", "/dev/null")
        assert code == 2 and "only a regular file is replaced" in err
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        code, _, err = run_cli("export", TINY, "--onnx", locked / "x.onnx")
        assert code == 2 and "not writable" in err


def test_cli_export_failures_leave_nothing(tmp_path: Path, run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """An exporter failure is exit 2; a write that dies half-way leaves neither a partial file nor a temporary."""
    out = tmp_path / "x.onnx"
    out_args = (TINY, *SMALL_ARGS, "--batch", "1", "--onnx", out)

    def broken_export(*args, **kwargs):
        raise RuntimeError("Unsupported operator aten::frobnicate\nmore detail")

    with monkeypatch.context() as m:
        m.setattr(torch.onnx, "export", broken_export)
        code, _, err = run_cli("export", *out_args)
    assert code == 2
    assert "torch.onnx.export failed for 'coat_lite_tiny': RuntimeError: Unsupported operator aten::frobnicate" in err
    assert os.listdir(tmp_path) == []

    def dies_half_way(self, destination, **kwargs):
        Path(destination).write_bytes(b"\x08\x07partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch.onnx.ONNXProgram, "save", dies_half_way)
    code, _, err = run_cli("export", *out_args)
    assert code == 2 and "No space left on device" in err
    assert os.listdir(tmp_path) == []


def test_a_killed_exports_staging_directory_is_removed_by_the_next(tmp_path: Path, run_cli) -> None:
    """An export writes in a staging directory beside its file; one a killed export left long ago goes with the next
    export there, a recent one (maybe another export's, still running) stays."""
    from blockgraph.files import STALE_AFTER_S

    old, recent = tmp_path / ".blockgraph-export-abcd1234", tmp_path / ".blockgraph-export-efgh5678"
    for staging in (old, recent):
        staging.mkdir()
        (staging / "x.onnx").write_bytes(b"half")
    past = time.time() - STALE_AFTER_S - 60
    os.utime(old / "x.onnx", (past, past))
    os.utime(old, (past, past))
    code, _, err = run_cli("export", TINY, *SMALL_ARGS, "--onnx", tmp_path / "x.onnx")
    assert code == 0, err
    assert not old.exists() and recent.exists()
