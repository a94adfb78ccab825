"""Reference specs made small for tests: the same blocks and shape rules, a fraction of the compute."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import blockgraph as bg


def shrunk(path: Path) -> dict[str, Any]:
    """Overrides setting every depth and layer-count variable of the spec at ``path`` to 1."""
    overrides: dict[str, Any] = {}
    for name, value in bg.analyze(path).spec.variables.items():
        if "depth" in name or name.endswith("layers"):
            overrides[name] = [1] * len(value) if isinstance(value, list) else 1
    return overrides
