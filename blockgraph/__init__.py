"""blockgraph: a declarative model builder for PyTorch.

A YAML spec is validated, its dataflow and every tensor shape are resolved statically (no torch needed), and it is
compiled into an ordinary ``nn.Module``.
"""

from blockgraph.api import (
    analyze,
    build_model,
    create_model,
    list_models,
    load,
    load_timm_state_dict,
    validate,
)
from blockgraph.errors import (
    BlockError,
    BlockgraphError,
    BudgetError,
    ExportError,
    GraphError,
    MultiError,
    PluginError,
    ShapeError,
    SpecError,
    WeightsError,
)
from blockgraph.spec.plugins import load_plugin
from blockgraph.spec.schema import BlockSpec, register

__all__ = [
    "BlockError",
    "BlockSpec",
    "BlockgraphError",
    "BudgetError",
    "ExportError",
    "GraphError",
    "MultiError",
    "PluginError",
    "ShapeError",
    "SpecError",
    "WeightsError",
    "analyze",
    "build_model",
    "create_model",
    "list_models",
    "load",
    "load_plugin",
    "load_timm_state_dict",
    "register",
    "validate",
]
__version__ = "0.1.0"
