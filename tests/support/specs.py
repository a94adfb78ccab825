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


ONE_TWIN_PER_FAMILY = [
    "coat_lite_tiny",
    "coat_tiny",
    "vit_tiny_patch16_224",
    "deit_base_distilled_patch16_224",
    "swin_tiny_patch4_window7_224",
    "mobilevit_xxs",
    "convnext_atto",
    "poolformer_s12",
    "pvt_v2_b0",
    "inception_next_tiny",
]
"""One reference spec with a timm twin per family, small where the family has a small size."""
