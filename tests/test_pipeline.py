"""Each command runs the pipeline once: one analysis (``pipeline.analyze``) and at most one compilation
(``compile_model``), whatever it prints (the summary's MACs included) or loads."""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from pathlib import Path

import pytest

import blockgraph as bg
from blockgraph import pipeline
from blockgraph.compiler import model
from blockgraph.compiler.checkpoint import save
from tests.conftest import ROOT

TINY = ROOT / "specs" / "coat_lite_tiny.yaml"
SMALL = ("--set", "depths=[1,1,1,1]")


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Counts of ``analyze`` and ``compile_model`` calls, wherever blockgraph looks them up."""
    counts: Counter = Counter()
    for original in (pipeline.analyze, model.compile_model):

        def counted(*args, _original=original, **kwargs):
            counts[_original.__name__] += 1
            return _original(*args, **kwargs)

        for name, module in list(sys.modules.items()):
            if name.startswith("blockgraph") and getattr(module, original.__name__, None) is original:
                monkeypatch.setattr(module, original.__name__, counted)
    return counts


@pytest.mark.parametrize(
    ("argv", "compiled"),
    [
        (["validate", TINY, *SMALL], 0),
        (["build", TINY, *SMALL], 1),
        (["build", TINY, *SMALL, "--out", "{tmp}/model.pt"], 1),
        (["build", TINY, *SMALL, "--json"], 1),
        (["build", TINY, *SMALL, "--emit-python"], 0),
        (["build", TINY, *SMALL, "--emit-python", "--features-only"], 0),
        (["summary", TINY, *SMALL], 1),
        (["summary", TINY, *SMALL, "--json", "--features-only"], 1),
        (["graph", TINY, *SMALL, "--input", "3x64x64"], 0),
        (["export", TINY, *SMALL, "--onnx", "{tmp}/model.onnx", "--input", "3x64x64", "--batch", "1"], 1),
    ],
    ids=lambda v: (
        " ".join(str(a) for a in v if a not in SMALL).replace(str(TINY), "tiny") if isinstance(v, list) else None
    ),
)
def test_each_command_analyses_once(argv: list, compiled: int, calls: Counter, run_cli, tmp_path: Path) -> None:
    if argv[0] == "export":  # torch's exporter needs onnx and onnxscript (as tests/compiler/test_export.py)
        pytest.importorskip("onnx")
        pytest.importorskip("onnxscript")
    code, _, err = run_cli(*(str(a).format(tmp=tmp_path) for a in argv))
    assert code == 0, err
    assert calls == Counter({"analyze": 1, "compile_model": compiled})  # (a missing count is a zero)


def test_create_model_from_a_checkpoint_analyses_once(calls: Counter, tmp_path: Path) -> None:
    save(bg.create_model("coat_lite_tiny", overrides={"depths": [1, 1, 1, 1]}), tmp_path / "tiny.pt")
    for kwargs in ({}, {"num_classes": 10}, {"features_only": True}):
        calls.clear()
        with pytest.warns(UserWarning) if kwargs.get("num_classes") else contextlib.nullcontext():
            bg.create_model(
                "coat_lite_tiny", overrides={"depths": [1, 1, 1, 1]}, checkpoint_path=tmp_path / "tiny.pt", **kwargs
            )
        assert calls == Counter({"analyze": 1, "compile_model": 1}), kwargs
