"""The reference specs shipped in ``specs/``, by name: ``validate coat_lite_small`` works where a path does, and
``extends: coat_lite.yaml`` finds the family file from anywhere. Torch-free."""

from __future__ import annotations

import difflib
import fnmatch
import os
from pathlib import Path

from blockgraph.errors import Pos, SpecError

SPEC_DIR = Path(os.environ.get("BLOCKGRAPH_SPECS", Path(__file__).resolve().parent.parent.parent / "specs"))
"""Where the reference specs live (``create_model`` / ``list_models``); ``BLOCKGRAPH_SPECS`` overrides it."""


def list_models(pattern: str = "*") -> list[str]:
    """Names of the reference specs (one file per named model in ``specs/``) matching a glob pattern."""
    return [path.stem for path in sorted(SPEC_DIR.glob("*.yaml")) if fnmatch.fnmatch(path.stem, pattern)]


def spec_path(name: str) -> Path:
    """The file of a reference spec by name.

    Raises:
        SpecError: no reference spec has that name (with the nearest names).
    """
    path = SPEC_DIR / f"{name}.yaml"
    if not path.is_file():
        raise SpecError(f"no reference spec named '{name}'", pos=Pos(str(SPEC_DIR)), hint=nearest_hint(name))
    return path


def nearest_hint(name: str) -> str:
    """``did you mean 'coat_lite_small'?`` for the reference names nearest ``name`` (a name or a path)."""
    stem = Path(name).name.removesuffix(".yaml").removesuffix(".yml")
    close = difflib.get_close_matches(stem, list_models(), n=3)
    if close:
        return f"did you mean {' or '.join(repr(c) for c in close)}? (`blockgraph list` names the reference specs)"
    return "give a spec file's path, or a reference spec's name (`blockgraph list` names them)"
