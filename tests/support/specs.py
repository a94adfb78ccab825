"""Reference specs made small for tests: the same blocks and shape rules, a fraction of the compute."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils._pytree import tree_leaves

import blockgraph as bg


def shrunk(path: Path, most: int = 1) -> dict[str, Any]:
    """Overrides capping every depth and layer-count variable of the spec at ``path`` at ``most`` (2 keeps the blocks
    that alternate, as Swin's shifted windows)."""
    overrides: dict[str, Any] = {}
    for name, value in bg.analyze(path).spec.variables.items():
        if "depth" in name or name.endswith("layers"):
            overrides[name] = [min(v, most) for v in value] if isinstance(value, list) else min(value, most)
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


def small_size(path: Path) -> tuple[int, int]:
    """The smallest input size the spec at ``path`` accepts of at least 64 per side (on a 1x1 map some blocks are
    identically zero: PoolFormer's mixer, a pool minus its input), or its first accepted example."""
    acceptance = bg.analyze(path).inference.acceptance
    h, w = (acceptance[s].nearest(64)[1] or acceptance.examples(1)[0][i] for i, s in enumerate(("H", "W")))
    return h, w


def static_shapes(model: Any, size: tuple[int, int], batch: int) -> dict[str, list[tuple[int, ...]]]:
    """Each node's output shapes (one per output port) at ``size`` and ``batch``, as blockgraph inferred them; a node
    trimmed to its leading tokens (ViT's last block) has the shape of the tokens it computes."""
    h, w = size
    expected = {}
    for name, t in model.node_types().items():
        types = t.values() if isinstance(t, dict) else [t]
        expected[name] = [tuple(x.shape({"H": h, "W": w}, batch=batch)) for x in types]
    for name, keep in model.trimmed_tokens.items():  # computed: the leading tokens its readers read (ViT's cls)
        [(b, _, channels)] = expected[name]
        expected[name] = [(b, keep, channels)]
    return expected


def runtime_shapes(model: Any, run: Callable[[], Any]) -> tuple[dict[str, list[tuple[int, ...]]], Any]:
    """Each node's output shapes (one per tensor it returns) in ``run()``, a forward of ``model``; and what ``run()``
    returned."""
    seen: dict[str, list[tuple[int, ...]]] = {}

    def hook(name: str) -> Callable[..., None]:
        return lambda m, i, o: seen.__setitem__(name, [tuple(x.shape) for x in tree_leaves(o)])

    hooks = [model.get_submodule(name).register_forward_hook(hook(name)) for name in model.nodes]
    try:
        out = run()
    finally:
        for handle in hooks:
            handle.remove()
    return seen, out
