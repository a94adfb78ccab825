"""The names the compiler may give modules: every node and shared module becomes an attribute of the model or of a
namespace module (``stage1`` → ``model.stage1``), so each dotted part of its name must be one Python and
``nn.Module`` leave free. Checked once, on the graph (:func:`module_name_errors`), so that a spec that validates
compiles: never a crash in the compiler or at the first forward.

Torch-free: the attribute sets are written out here, and a test checks them against ``nn.Module`` and the model
class (tests/graph/test_names.py), so a new attribute of either is caught there.
"""

from __future__ import annotations

import keyword
from collections.abc import Iterable

from blockgraph.errors import GraphError, Pos

MODULE_ATTRIBUTES = frozenset(
    """T_destination _apply _backward_hooks _backward_pre_hooks _buffers _call_impl _compiled_call_impl
    _forward_hooks _forward_hooks_always_called _forward_hooks_with_kwargs _forward_pre_hooks
    _forward_pre_hooks_with_kwargs _get_backward_hooks _get_backward_pre_hooks _get_name _is_full_backward_hook
    _load_from_state_dict _load_state_dict_post_hooks _load_state_dict_pre_hooks _maybe_warn_non_full_backward_hook
    _modules _named_members _non_persistent_buffers_set _parameters _register_load_state_dict_pre_hook
    _register_state_dict_hook _replicate_for_data_parallel _save_to_state_dict _slow_forward _state_dict_hooks
    _state_dict_pre_hooks _version _wrapped_call_impl add_module apply bfloat16 buffers call_super_init children
    compile cpu cuda double dump_patches eval extra_repr float forward get_buffer get_extra_state get_parameter
    get_submodule half ipu load_state_dict modules mtia named_buffers named_children named_modules named_parameters
    parameters register_backward_hook register_buffer register_forward_hook register_forward_pre_hook
    register_full_backward_hook register_full_backward_pre_hook register_load_state_dict_post_hook
    register_load_state_dict_pre_hook register_module register_parameter register_state_dict_post_hook
    register_state_dict_pre_hook requires_grad_ set_extra_state set_submodule share_memory state_dict to to_empty
    train training type xpu zero_grad""".split()
)
"""Attributes of every ``nn.Module`` (methods, and what ``__init__`` sets): no module name may be one."""

MODEL_ATTRIBUTES = frozenset(
    """_DERIVED _analysis _api _attach _forward_laid_out _head _layout_key _measured_layout _measuring_layout _program
    _pruned _reject _reject_mask _reject_single analysis code
    default_cfg feature_info forward_features forward_head forward_intermediates get_classifier grad_checkpointing
    group_matcher head_hidden_size in_chans inference macs no_weight_decay node_types nodes num_classes num_features
    output_types outputs pretrained_cfg prune_intermediate_layers reset_classifier returns set_grad_checkpointing
    shared_modules spec spec_data summary trimmed_tokens""".split()
)
"""Attributes of a compiled model beyond ``nn.Module``'s (the timm API, the spec, the generated code): no top-level
node or shared module may take one of these names."""


def name_problem(part: str, top: bool) -> str | None:
    """Why ``part`` (one dotted part of a module name; ``top``: the first) cannot be an attribute, or None."""
    if keyword.iskeyword(part):
        return f"'{part}' is a Python keyword"
    if part.startswith("__"):
        return f"'{part}' starts with '__' (Python's special and class-private names)"
    if part in MODULE_ATTRIBUTES:
        return f"'{part}' is an attribute of every torch module (nn.Module.{part})"
    if top and part in MODEL_ATTRIBUTES:
        return f"'{part}' is an attribute of the compiled model (model.{part})"
    return None


def module_name_errors(
    modules: Iterable[tuple[str, Pos, str | None]], namespaces: dict[str, tuple[Pos, str | None]]
) -> list[GraphError]:
    """Errors for module names (``(dotted name, position, node)``) the compiler cannot install: a part that is a
    keyword or an attribute of the modules holding it (reported once, where that part is written: at a stage's
    name for the stage's part, found in ``namespaces``); a name that is also the namespace of another (``s1`` and
    ``s1.block``); numbered names that are not ``name.0`` ... ``name.N-1`` (a block with ``depth:`` names its
    repetitions so; they become an ``nn.ModuleList``), or numbered and plain names side by side."""
    errors: list[GraphError] = []
    entries = list(modules)
    children: dict[str, list[str]] = {}  # namespace → its parts ("" for the model)
    where: dict[str, tuple[Pos, str | None]] = dict(namespaces)
    reported: set[str] = set()
    for dotted, pos, node in entries:
        parts = dotted.split(".")
        for k, part in enumerate(parts):
            problem = None if part.isdigit() else name_problem(part, top=k == 0)
            prefix = ".".join(parts[: k + 1])
            if problem is not None and prefix not in reported:
                reported.add(prefix)
                at, owner = namespaces.get(prefix, (pos, node))
                errors.append(
                    GraphError(
                        f"the name '{prefix}' cannot be a module: {problem}",
                        pos=at,
                        node=owner,
                        hint="rename it (names become attributes of the model: model.stage1.block)",
                    )
                )
            if problem is not None:
                break
        for k in range(len(parts)):
            prefix = ".".join(parts[:k])
            children.setdefault(prefix, [])
            if parts[k] not in children[prefix]:
                children[prefix].append(parts[k])
            where.setdefault(".".join(parts[: k + 1]), (pos, node))
    for dotted, pos, node in entries:
        if dotted in children:
            inner = f"{dotted}.{children[dotted][0]}"
            errors.append(
                GraphError(
                    f"'{dotted}' names a module and also the namespace of '{inner}'",
                    pos=pos,
                    node=node,
                    hint=f"rename one of them: '{dotted}' cannot be both a block and the container of '{inner}'",
                )
            )
    for prefix, parts in children.items():
        numbered = [p for p in parts if p.isdigit()]
        if not numbered:
            continue
        pos, node = where[f"{prefix}.{numbered[0]}"]
        plain = [p for p in parts if not p.isdigit()]
        if plain:
            errors.append(
                GraphError(
                    f"'{prefix}' holds numbered modules ('{prefix}.{numbered[0]}') and named ones "
                    f"('{prefix}.{plain[0]}')",
                    pos=pos,
                    node=node,
                    hint=f"numbered names are the repetitions of a block with `depth:`; name '{prefix}.{plain[0]}' "
                    "under another namespace",
                )
            )
        elif sorted(map(int, numbered)) != list(range(len(numbered))):
            found = ", ".join(f"{prefix}.{i}" for i in sorted(map(int, numbered))[:4])
            errors.append(
                GraphError(
                    f"numbered modules count from {prefix}.0 without gaps; found {found}",
                    pos=pos,
                    node=node,
                    hint="numbered names are the repetitions of a block with `depth:` (name.0 ... name.N-1); give "
                    "a single block a plain name",
                )
            )
    return errors
