"""TorchScript: ``torch.jit.script(model)`` compiles the model's *script view* (:func:`script_view`, which
``BlockgraphModel.__prepare_scriptable__`` returns), not the model itself.

TorchScript compiles a subset of Python: no module passed as an argument (CoaT's shared CPE and CRPE are), no
variable number of arguments (the joints), no Python caches or kernel choices. The view is a second tree of module
objects over the same parameters and buffers (nothing is copied; the model is left untouched), in which

- the root's ``forward`` is the generated program written for TorchScript (:func:`~blockgraph.compiler.codegen.
  script_program`: typed, its input checks raising ``ValueError``);
- each shared module is attached to the blocks that use it, under the field's name (``cpe``, ``crpes``), or
  where the block's ``script_attach(**shared)`` puts it (a submodule that calls it);
- a module whose class defines ``script_forward`` runs that as its ``forward``: the same computation through the
  ops' plain reference paths, reading shared modules from its attributes and a joint's inputs from one list
  (``script_packs_inputs``). Every other module's ``forward`` is scriptable as written: where it calls an op with a
  kernel choice, a ``torch.jit.is_scripting()`` branch (which TorchScript resolves while compiling) takes the
  plain path.

The scripted model computes what the eager model computes (tests/compiler/test_script.py: every family, at its
size and another, 1e-5), at any accepted input size.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from blockgraph.compiler.codegen import script_program
from blockgraph.errors import BlockgraphError

_SCRIPT_CLASSES: dict[type, type] = {}


def script_view(model: Any) -> nn.Module:
    """The module tree ``torch.jit.script`` compiles for ``model`` (see the module docstring)."""
    views: dict[int, nn.Module] = {}

    def view(module: nn.Module) -> nn.Module:
        if id(module) in views:
            return views[id(module)]
        copy = object.__new__(_script_class(type(module)))
        copy.__dict__.update(module.__dict__)
        copy.__dict__["_parameters"] = dict(module._parameters)
        copy.__dict__["_buffers"] = dict(module._buffers)
        copy.__dict__["_non_persistent_buffers_set"] = set(module._non_persistent_buffers_set)
        views[id(module)] = copy
        copy.__dict__["_modules"] = {k: None if m is None else view(m) for k, m in module._modules.items()}
        return copy

    graph = model.inference.graph
    for name in model.nodes:
        node = graph.nodes[name]
        if any(getattr(type(m), "scriptable", True) is False for m in model.get_submodule(node.module_name).modules()):
            raise BlockgraphError(
                f"torch.jit.script: node '{name}' (op {node.op}) has no TorchScript form",
                pos=graph.pos(node.path),
                node=name,
                hint="TorchScript is deprecated in torch 2.x; use torch.compile(model), or torch.export / "
                "`blockgraph export --onnx` for a graph without Python",
            )
    packs = set()
    for name in model.nodes:
        node = graph.nodes[name]
        user = view(model.get_submodule(node.module_name))
        if getattr(type(user), "script_packs_inputs", False):
            packs.add(name)
        shared: dict[str, nn.Module] = {}
        for field, qualified in node.shared.items():
            if isinstance(qualified, str):
                shared[field] = view(model.get_submodule(qualified))
            else:
                shared[field] = nn.ModuleList(view(model.get_submodule(q)) for q in qualified)
        attach = getattr(user, "script_attach", None)
        for field, module in shared.items() if attach is None else ():
            user._modules[field] = module
        if attach is not None and shared:
            attach(**shared)
    program = script_program(model.inference, model._program, packs)
    root_class = type(type(model).__name__, (ScriptedModel,), {"forward": program.forward(model.spec.name)})
    root = root_class()
    for key, module in model._modules.items():
        root._modules[key] = view(module)
    root.train(model.training)
    return root


class ScriptedModel(nn.Module):
    """The root of a script view: the model's modules, and its generated program (TorchScript's) as ``forward``."""


def _script_class(cls: type) -> type:
    """``cls``, or for a class with a ``script_forward`` (its own, or inherited with the ``forward`` it replaces), a
    subclass whose ``forward`` is that method."""
    forward = None
    for c in cls.__mro__:  # the most derived of forward and script_forward decides
        if "script_forward" in c.__dict__:
            forward = c.__dict__["script_forward"]
            break
        if "forward" in c.__dict__:
            break
    if forward is None:
        return cls
    if cls not in _SCRIPT_CLASSES:
        _SCRIPT_CLASSES[cls] = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})
    return _SCRIPT_CLASSES[cls]
