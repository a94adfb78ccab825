"""The analysis pipeline, everything before torch: load → expand → (load plugins) → parse → graph → infer.

Torch-free: ``validate``, the compiler (which rebuilds a model from its embedded spec) and the public API all start
here.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blockgraph.blocks  # noqa: F401  (registers the built-in ops; torch-free)
from blockgraph.errors import Pos, SpecError
from blockgraph.graph.build import Graph, build_graph
from blockgraph.graph.infer import Inference, infer
from blockgraph.spec.expand import Expanded, expand
from blockgraph.spec.plugins import load_imports
from blockgraph.spec.references import SPEC_DIR, nearest_hint
from blockgraph.spec.schema import ModelBase, ParsedSpec, parse
from blockgraph.types import TensorType

SpecLike = str | os.PathLike[str] | ModelBase
"""A spec: a file path, YAML text, or a parsed :class:`ModelBase`."""


@dataclass
class Analysis:
    """Everything known about a spec before any weight exists."""

    expanded: Expanded
    parsed: ParsedSpec
    graph: Graph
    inference: Inference

    @property
    def spec(self) -> ModelBase:
        return self.parsed.model

    def output(self, name: str) -> TensorType:
        """The type of the declared output or feature ``name``."""
        out = self.graph.outputs.get(name) or self.graph.features[name]
        value = self.inference.types[out.node]
        return value if isinstance(value, TensorType) else value[out.port]  # (a node of several outputs: a port)


_NAME_OR_PATH = re.compile(r"[\w./\\~-]+")
"""A one-line string of these characters is a file's path or a reference spec's name, never YAML text."""


def spec_file(text: str) -> Path | None:
    """The file a one-line spec argument names: a path that exists, or a reference spec's name
    (``coat_lite_small``); None for YAML text.

    Raises:
        SpecError: it looks like a path or a name, but no file or reference spec has it (nearest names in the hint).
    """
    if "\n" in text:
        return None
    if os.path.exists(text):
        return Path(text)
    if _NAME_OR_PATH.fullmatch(text):
        reference = SPEC_DIR / f"{text}.yaml"
        if "/" not in text and reference.is_file():
            return reference
        raise SpecError(f"no such file or reference spec: '{text}'", pos=Pos(text), hint=nearest_hint(text))
    return None


def analyze(
    spec: SpecLike,
    *,
    variant: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    num_classes: int | None = None,
    allow_imports: bool = True,
    root: str | os.PathLike[str] | None = None,
) -> Analysis:
    """Run the pipeline up to static shapes: load → expand → parse → graph → infer (no torch).

    Between expanding and parsing, the modules the spec's ``imports:`` names are loaded (their code runs), and the
    installed plugins if the spec names an op nobody registered (:mod:`blockgraph.spec.plugins`).

    Args:
        spec: a spec file path, YAML text, or a :class:`ModelBase`.
        variant: a variant of a family spec (``"small"``).
        overrides: variable values replacing the spec's.
        num_classes: shorthand for ``overrides={"num_classes": n}``.
        allow_imports: when False, a module of ``imports:`` that is not loaded yet is a :class:`PluginError`
            instead of being imported (a checkpoint's spec never runs code).
        root: a directory outside which no file is read, for specs sent by others: the spec file, its
            ``extends:`` and its ``imports:`` files must be under it (a reference spec excepted), and modules it
            names in ``imports:`` are not imported (unless already loaded).
    """
    overrides = dict(overrides or {})
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    if isinstance(spec, ModelBase):
        expanded = expand(
            Path(os.devnull), text=_dump(spec), file=f"<{spec.name}>", variant=variant, overrides=overrides, root=root
        )
    elif isinstance(spec, str) and (path := spec_file(spec)) is None:
        expanded = expand(spec, text=spec, file="<string>", variant=variant, overrides=overrides, root=root)
    else:
        expanded = expand(path if isinstance(spec, str) else spec, variant=variant, overrides=overrides, root=root)
    return _analysis(expanded, allow_imports)


def analyze_embedded(text: str, *, file: str = "<embedded spec>", allow_imports: bool = True) -> Analysis:
    """Analyse a spec stored as text in a file (a checkpoint's, a pickled model's: :meth:`Expanded.standalone`).

    The text is the spec itself, never a path or a reference spec's name to read, and it must be complete: an
    ``extends:`` or an import of a YAML library, which would read another file, is a :class:`SpecError`.

    Args:
        file: the name to show in messages (the file the text was stored in).
        allow_imports: as for :func:`analyze` (a checkpoint's spec never imports: False).
    """
    return _analysis(expand(file, text=text, file=file, standalone=True), allow_imports)


def _analysis(expanded: Expanded, allow_imports: bool) -> Analysis:
    load_imports(expanded, allow_imports=allow_imports)
    parsed = parse(expanded)
    graph = build_graph(parsed)
    return Analysis(expanded, parsed, graph, infer(graph))


def _dump(spec: ModelBase) -> str:
    data = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    data.pop("variant", None)
    return json.dumps(data)  # JSON is YAML
