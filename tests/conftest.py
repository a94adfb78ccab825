"""Shared fixtures: the reference specs, and a small helper to run the CLI in-process."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU, the Triton kernels (ms_deform_attn's backend="triton", tests/ops/test_msda_triton.py) run in Triton's
# interpreter on CPU tensors. Triton reads TRITON_INTERPRET when it is imported, and torch imports it with
# torch._dynamo (as soon as a test imports blockgraph.ops), so it is set here, before any test module is imported.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# Kernel choices are measured in one round, not 5-15 (blockgraph.ops.autotune): every choice still made by timing
# both candidates, at a fifth of the cost, which dominated the tests that run models (the four-size shape battery:
# 73 s -> 26 s with no measuring at all). tests/ops/test_autotune.py checks the default rounds. Set before blockgraph
# is imported (read once); subprocesses inherit it.
os.environ.setdefault("BLOCKGRAPH_AUTOTUNE_ROUNDS", "1")

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "specs").glob("*.yaml"))
"""Every reference spec: the battery runs over all of them."""


@pytest.fixture
def run_cli():
    """Run ``blockgraph.cli.main`` in-process; returns (exit code, stdout, stderr)."""
    from blockgraph.cli import main

    def run(*argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in argv])
        return code, out.getvalue(), err.getvalue()

    return run


@pytest.fixture
def plugin_sandbox():
    """What a test loads as plugins is forgotten afterwards: the ops it registered, the modules it imported
    (``bgplug_*`` and plugin files), and that installed plugins were loaded."""
    from blockgraph.spec import plugins, schema

    saved = dict(schema._REGISTRY)
    modules = set(sys.modules)
    plugins._reset_plugins()
    try:
        yield
    finally:
        for name in set(sys.modules) - modules:
            if name.startswith(("bgplug_", plugins.PACKAGE)):
                del sys.modules[name]
        for op in set(schema._REGISTRY) - set(saved):
            schema.unregister(op)
        plugins._reset_plugins()
