"""Custom blocks from user code: loading the modules that register them, and translating what their code raises.

Code comes in three ways, each a module whose import registers blocks (``@register``):

* a spec's ``imports:`` (collected by :func:`~blockgraph.spec.expand.expand`, loaded by :func:`load_imports`
  before parsing): dotted module names, or ``.py`` files relative to the spec;
* ``--plugin MODULE_OR_FILE`` on the command line, or :func:`load_plugin` in Python;
* the ``blockgraph.blocks`` entry point group of installed distributions (:func:`load_plugins`), loaded when a spec
  names an op nobody registered, or when every op is listed (:func:`registry`).

A ``.py`` file is imported as a module of a package made for its directory, ``blockgraph_plugins.d_<hash>`` (the
first 12 hex digits of the sha256 of the directory's absolute path), whose ``__path__`` is that directory: the file
may import its sibling files relatively (``from .convnext_layers import ConvNeXtBlock``), it is loaded once per
process however many specs import it, and what is pickled from it is found again once the same file is loaded in
another process.

A spec that imports code runs that code, as a Python config file does; the YAML itself still executes nothing. A
checkpoint's spec never imports (``allow_imports=False``): its plugins must be loaded first. (The entry points of
installed distributions are loaded for it as for any spec that names an op nobody registered: installing a
distribution that declares them is what trusts them.)

Torch-free; nothing here knows about particular ops.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from blockgraph.errors import BlockError, BlockgraphError, PluginError, Pos
from blockgraph.spec.expand import Expanded, Import, names_a_file
from blockgraph.spec.load import regular_file_kind
from blockgraph.spec.schema import BlockSpec, register, registered

ENTRY_POINT_GROUP = "blockgraph.blocks"
"""The entry point group through which installed distributions add ops: each entry point names a module (whose
import registers its blocks with :func:`~blockgraph.spec.schema.register`) or a :class:`BlockSpec` subclass
(registered on load)."""
PACKAGE = "blockgraph_plugins"
"""The package under which ``.py`` plugin files are imported, one subpackage per directory."""

_plugins_loaded = False


# ------------------------------------------------------------------------------------------------ modules and files


def load_plugin(name_or_path: str | os.PathLike[str]) -> ModuleType:
    """Import a module of custom blocks, so that specs can use its ops: what ``--plugin`` does on the command line.

    Args:
        name_or_path: a dotted module name (``my_pkg.blocks``), or a ``.py`` file (``./blocks/convnext.py``,
            relative to the current directory).

    Returns:
        The module (imported once per process: loading it again returns the same module).

    Raises:
        PluginError: the module cannot be found, or its import fails (whatever it raises).
    """
    text = os.fspath(name_or_path)
    return _load(_entry(text, Pos("<load_plugin>")), f"load_plugin({text!r})")


def load_command_line(values: list[str]) -> None:
    """Load the plugins named by ``--plugin`` options, in order.

    Raises:
        PluginError: one cannot be loaded; the error is at ``<command line>`` and names the option.
    """
    for text in values:
        _load(_entry(text, Pos("<command line>")), f"--plugin {text}")


def load_imports(expanded: Expanded, *, allow_imports: bool = True) -> None:
    """Load the modules a spec's ``imports:`` names, then the installed plugins if it uses an op nobody registered.

    Args:
        expanded: the expanded spec.
        allow_imports: when False (a checkpoint's spec), a module of ``imports:`` that is not loaded yet is an
            error instead of being imported. A spec expanded with a ``root`` imports its files (all under the
            root) but no module by name.

    Raises:
        PluginError: at the ``imports:`` entry: the module cannot be found or fails to import, or, without
            ``allow_imports`` (or by name, under a root), it is not loaded.
    """
    for entry in expanded.imports:
        if expanded.root is not None and not entry.is_file and entry.name not in sys.modules:
            raise PluginError(
                f"the spec imports the module {entry.name!r} by name, which a spec checked with a root "
                f"({expanded.root}) may not do",
                pos=entry.pos,
                hint=f"load it first (`--plugin {entry.name}`), or import a .py file under the root",
            )
        if allow_imports:
            _load(entry, f"plugin {entry.written!r}")
        elif _module_name(entry) not in sys.modules:
            name = entry.name
            python = f"`blockgraph.load_plugin({name!r})`" + ("" if entry.is_file else f" or `import {name}`")
            raise PluginError(
                f"the spec imports the plugin {name!r}, which is not loaded, and may not import it here (as when a "
                "checkpoint is loaded: that never runs code)",
                pos=entry.pos,
                hint=f"load it first: `--plugin {name}` on the command line, {python} in Python",
            )
    unknown = _unknown_op(expanded.data)
    if unknown is not None:
        load_plugins(pos=expanded.source.value(unknown))


def _entry(text: str, pos: Pos) -> Import:
    """A plugin named outside a spec, as an :class:`Import` (a file relative to the current directory)."""
    return Import(os.path.realpath(text) if names_a_file(text) else text, pos, text)


def _module_name(entry: Import) -> str:
    """The name under which the plugin is (or will be) in ``sys.modules``."""
    if not entry.is_file:
        return entry.name
    directory, file = os.path.split(entry.name)
    return f"{_package(directory)}.{file.removesuffix('.py')}"


def _package(directory: str) -> str:
    return f"{PACKAGE}.d_{hashlib.sha256(directory.encode()).hexdigest()[:12]}"


def _load(entry: Import, asked: str) -> ModuleType:
    """Import one plugin (once); ``asked`` says how it was asked for, in messages."""
    name = _module_name(entry)
    if name in sys.modules:
        return sys.modules[name]
    if not entry.is_file:
        return _guarded(lambda: importlib.import_module(name), entry, asked)
    path, where = entry.name, _relative_to(entry)
    if not os.path.exists(path):
        raise PluginError(f"{asked}: no such file: {path}", pos=entry.pos, hint=f"the path is relative to {where}")
    stem = os.path.basename(path).removesuffix(".py")
    kind = regular_file_kind(path)  # a FIFO or a device would block the import, or never end
    if kind is not None or not path.endswith(".py") or not stem.isidentifier():
        what = kind or "not a Python file whose name is a module name"
        raise PluginError(
            f"{asked}: {path} is {what}",
            pos=entry.pos,
            hint="name a .py file whose name is a Python identifier (`./blocks/convnext.py`), or a package by its "
            "module name (`my_pkg.blocks`) with its parent directory on PYTHONPATH",
        )
    return _guarded(lambda: _import_file(name, path), entry, asked)


def _relative_to(entry: Import) -> str:
    if entry.pos.file in ("<command line>", "<load_plugin>") or not os.path.exists(entry.pos.file):
        return f"the current directory ({os.getcwd()})"
    return f"the spec's directory ({os.path.dirname(os.path.abspath(entry.pos.file))})"


def _import_file(name: str, path: str) -> ModuleType:
    """Import ``path`` as the module ``name`` of its directory's package (made on first use)."""
    package, directory = name.rpartition(".")[0], os.path.dirname(path)
    for parent, locations in ((PACKAGE, []), (package, [directory])):
        if parent not in sys.modules:
            package_spec = importlib.machinery.ModuleSpec(parent, None, is_package=True)
            package_spec.submodule_search_locations = locations
            sys.modules[parent] = importlib.util.module_from_spec(package_spec)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _guarded(load: Any, entry: Import, asked: str) -> ModuleType:
    """``load()``, with whatever it raises (an exception, ``sys.exit``) as a :class:`PluginError`."""
    try:
        return load()
    except KeyboardInterrupt as e:
        if interrupted(e):
            raise
        raise _failed(asked, e, entry.pos) from e
    except PluginError:
        raise
    except ModuleNotFoundError as e:
        if e.name is not None and (entry.name == e.name or entry.name.startswith(e.name + ".")):
            raise PluginError(
                f"{asked}: no module named {e.name!r}",
                pos=entry.pos,
                hint="install the package that provides it, or put its parent directory on PYTHONPATH; a file is "
                "written as a path ending in .py (`./blocks/convnext.py`)",
            ) from e
        raise _failed(asked, e, entry.pos) from e
    except BaseException as e:  # noqa: BLE001 - any failure of the plugin's code becomes one clear error
        raise _failed(asked, e, entry.pos) from e


def _failed(asked: str, e: BaseException, pos: Pos | None) -> PluginError:
    if isinstance(e, KeyboardInterrupt):
        return PluginError(
            f"{asked}: importing it raised KeyboardInterrupt (the user pressed no Ctrl-C)",
            pos=pos,
            hint="a plugin must not raise KeyboardInterrupt or exit; raise an ordinary exception",
        )
    if isinstance(e, SystemExit):
        return PluginError(
            f"{asked}: importing it called sys.exit({e.code!r})",
            pos=pos,
            hint="a plugin must not exit; guard a script's code with `if __name__ == '__main__':`",
        )
    return PluginError(
        f"{asked}: importing it raised {_first_line(e)}",
        pos=pos,
        hint="fix the plugin's code (in Python, the PluginError's __cause__ holds the traceback)",
    )


_SIGINTS = [0]
"""How many SIGINTs (Ctrl-C) arrived in the current :func:`watching_interrupts`."""


def _count_sigint(signum: int, frame: Any) -> None:
    """The SIGINT handler while :func:`watching_interrupts`: count it, then raise as Python's own handler does."""
    _SIGINTS[0] += 1
    raise KeyboardInterrupt


@contextlib.contextmanager
def watching_interrupts() -> Iterator[None]:
    """Within it, SIGINTs are counted (then ``KeyboardInterrupt`` raised, as Python does), so that a
    ``KeyboardInterrupt`` that a plugin's code raises by itself is told apart from the user's Ctrl-C
    (:func:`interrupted`): the command line runs in it. Only from the main thread; the handler before is put back."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    _SIGINTS[0] = 0
    before = signal.signal(signal.SIGINT, _count_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def interrupted(e: BaseException) -> bool:
    """Whether ``e`` is the user's interrupt, to let through: a ``KeyboardInterrupt`` after a SIGINT (or any, when
    SIGINTs are not counted: outside the command line)."""
    import signal

    if not isinstance(e, KeyboardInterrupt):
        return False
    return _SIGINTS[0] > 0 or signal.getsignal(signal.SIGINT) is not _count_sigint


def _first_line(e: BaseException) -> str:
    text = str(e).splitlines()[0][:300] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# ------------------------------------------------------------------------------------------------------ entry points


def load_plugins(pos: Pos | None = None) -> None:
    """Load every entry point of the ``blockgraph.blocks`` group, once.

    Called lazily: when a spec uses an op nobody registered (:func:`load_imports`), and when the registry is
    listed (:func:`registry`: ``list --ops``, the JSON Schema, the docs). A spec of built-in ops never imports a
    plugin.

    Raises:
        PluginError: an entry point failed to import, or names neither a module nor a BlockSpec subclass, or its
            block cannot be registered; the message names the entry point and its distribution, and ``pos``
            is its position (where the spec uses an op nobody registered).
    """
    global _plugins_loaded
    if _plugins_loaded:
        return
    from importlib.metadata import entry_points

    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.name, e.value)):
        dist = getattr(ep.dist, "name", None)
        label = f"entry point '{ep.name} = {ep.value}' (group {ENTRY_POINT_GROUP}" + (
            f", from {dist})" if dist else ")"
        )
        try:
            obj = ep.load()
            if isinstance(obj, type) and issubclass(obj, BlockSpec):
                register(obj)
            elif not isinstance(obj, ModuleType):
                raise TypeError(
                    f"it names an object of type {type(obj).__name__}, not a module or a BlockSpec subclass"
                )
        except PluginError:
            raise
        except BaseException as e:  # noqa: BLE001 - any failure of third-party code becomes one clear error
            if interrupted(e):
                raise
            raise PluginError(
                f"the block plugin {label} failed to load: {_first_line(e)}",
                pos=pos,
                hint=f"fix or uninstall {dist or 'the distribution that declares it'}; specs that use only "
                "built-in ops do not load plugins",
            ) from e
    _plugins_loaded = True


def _reset_plugins() -> None:
    """Forget that plugins were loaded (tests install fake distributions)."""
    global _plugins_loaded
    _plugins_loaded = False


def registry() -> dict[str, type[BlockSpec]]:
    """The registered block types by op name (a copy), the installed plugins loaded first (:func:`load_plugins`)."""
    load_plugins()
    return registered()


def _unknown_op(data: Any) -> tuple[Any, ...] | None:
    """The path of the first op in plain spec data (blocks, shared modules, merges) that is not registered (its
    ``op`` key), or None."""
    known = registered()
    stack: list[tuple[Any, tuple[Any, ...]]] = [(data, ())]
    while stack:
        node, path = stack.pop()
        if isinstance(node, dict):
            op = node.get("op")
            if isinstance(op, str) and op not in known:
                return (*path, "op")
            stack.extend((v, (*path, k)) for k, v in reversed(node.items()))
        elif isinstance(node, list):
            stack.extend((v, (*path, i)) for i, v in reversed(list(enumerate(node))))
    return None


# ------------------------------------------------------------------------------------------------ custom blocks' code


def is_builtin(cls: type) -> bool:
    """Whether a block type is one of blockgraph's own (its class is defined inside the ``blockgraph`` package)."""
    return cls.__module__ == "blockgraph" or cls.__module__.startswith("blockgraph.")


def qualified(cls: type) -> str:
    """A class as its author knows it: ``my_pkg.blocks.ChannelAffineSpec``, or, for a class of a plugin file,
    ``ChannelAffineSpec of /path/to/affine.py`` (its module's name is made up)."""
    if cls.__module__.startswith(PACKAGE + "."):
        return f"{cls.__qualname__} of {getattr(sys.modules.get(cls.__module__), '__file__', cls.__module__)}"
    return f"{cls.__module__}.{cls.__qualname__}"


@contextlib.contextmanager
def custom_code(spec: BlockSpec, node: str, pos: Pos | None, what: str) -> Iterator[None]:
    """Run a custom block's code (its shape rule, ``params``, ``build``, its module) turning what it raises into a
    :class:`BlockError` naming the node, the op and the block's class; ``what`` names the code (``"its shape
    rule"``).

    A built-in block's exception passes through unchanged: that is a bug of blockgraph, not of the spec's author.
    Blockgraph's own errors (``ctx.fail``) pass through too.
    """
    if is_builtin(type(spec)):
        yield
        return
    try:
        yield
    except BlockgraphError:
        raise
    except BaseException as e:  # noqa: BLE001 - the author's code may raise anything, sys.exit() included
        if interrupted(e) or isinstance(e, GeneratorExit):
            raise
        raise BlockError(
            f"custom block '{node}' (op {spec.op}, {qualified(type(spec))}) raised {_first_line(e)} in {what}",
            pos=pos,
            node=node,
            hint="fix the block's code; in Python, the BlockError's __cause__ holds the traceback",
        ) from e
