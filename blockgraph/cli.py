"""The command line: ``blockgraph validate|build|summary|graph|export|schema|docs|list``.

Exit status: 0 success; 2 the spec or input is invalid (each error on stderr as ``FILE:LINE:COL: error: MESSAGE``
then ``hint: ...``); 3 an internal error (a bug in blockgraph: one line, please report). ``validate``, ``schema``
and ``list`` never import torch.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from blockgraph.errors import BlockgraphError, Pos, SpecError, excerpt
from blockgraph.spec.patch import PATH_KEY

EXIT_INVALID = 2
EXIT_INTERNAL = 3


def _input_size(text: str) -> tuple[int, ...]:
    from blockgraph.spec.schema import MAX_SIZE

    match = re.fullmatch(r"\s*(\d{1,20})\s*x\s*(\d{1,20})(?:\s*x\s*(\d{1,20}))?\s*", text)
    if not match:
        raise SpecError(
            f"--input {excerpt(text)} is not CxHxW or HxW", pos=Pos("<command line>"), hint="e.g. --input 3x480x640"
        )
    size = tuple(int(g) for g in match.groups() if g is not None)
    if any(s == 0 or s > MAX_SIZE for s in size):
        raise SpecError(
            f"--input {text!r}: sizes must be between 1 and {MAX_SIZE:,}",
            pos=Pos("<command line>"),
            hint="e.g. --input 3x480x640",
        )
    return size


_NUMBERS = (("max_params", "--max-params", False), ("max_activation_bytes", "--max-activation-bytes", False),
            ("batch", "--batch", True), ("opset", "--opset", True))  # fmt: skip
"""The numeric flags: attribute, flag, whole number."""


def _read_numbers(args: argparse.Namespace) -> None:
    """Turn the numeric flags given as text into numbers, each checked (see :func:`_number`)."""
    for attr, flag, whole in _NUMBERS:
        if isinstance(getattr(args, attr, None), str):
            setattr(args, attr, _number(flag, getattr(args, attr), whole))


def _number(flag: str, text: str | None, whole: bool = False) -> Any:
    """The value of a numeric flag (None when not given): a finite number, or a whole one (``1e9`` reads as one);
    the range is checked where the value is used (budgets, batch)."""
    if text is None:
        return None
    try:
        value = float(text) if len(text) <= 40 else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or (whole and value != int(value)):
        kind = "a whole number" if whole else "a finite number"
        raise SpecError(f"{flag} {excerpt(text)} is not {kind}", pos=Pos("<command line>"), hint=f"e.g. {flag} 8")
    return int(value) if whole else value


_SET_HELP = "override a variable, or the value at a dotted path (stages.stage4.blocks.blocks.depth=2)"
_ROOT_HELP = (
    "read no file outside DIR (for specs sent by others): the spec, its extends: and its imports: files must be "
    "under it (reference specs by name excepted), and no module is imported by name"
)


def _overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``--set NAME=VALUE`` options as overrides; each VALUE is YAML, read as a spec file is (same limits)."""
    from blockgraph.spec.load import load_value

    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not (name.isidentifier() or PATH_KEY.fullmatch(name)):
            raise SpecError(
                f"--set {excerpt(pair)} must be NAME=VALUE or PATH=VALUE",
                pos=Pos("<command line>"),
                hint="--set depths=[1,1,1,1], --set stages.stage4.blocks.blocks.depth=2",
            )
        out[name] = load_value(value, f"<--set {name}>").plain()
    return out


def _validate(args: argparse.Namespace) -> Any:
    from blockgraph.api import validate

    return validate(
        args.spec,
        input_size=_input_size(args.input) if args.input else None,
        variant=args.variant,
        overrides=_overrides(args.set),
        root=args.root,
        max_params=args.max_params,
        max_activation_bytes=args.max_activation_bytes,
        batch=1 if args.batch is None else args.batch,
    )


def cmd_validate(args: argparse.Namespace) -> int:
    report = _validate(args)
    if args.json:
        print(json.dumps({"name": report.name, "input": list(report.input), "inputs": report.inputs,
                          "accepts": report.accepted,
                          "outputs": report.outputs, "params": report.params,
                          "activation_bytes": report.activation_bytes, "nodes": report.nodes}, indent=2))  # fmt: skip
    else:
        print(report.format())
    for warning in report.warnings:
        print(warning.format(), file=sys.stderr)
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    """``build``, and ``summary`` (built on the meta device, never written)."""
    from blockgraph.api import build_model
    from blockgraph.compiler.summary import describe

    report = _validate(args)  # shapes and budgets first: nothing is allocated before they pass
    _, h, w = report.input
    if args.out is not None:  # a place that cannot be written fails now, not after the build
        from blockgraph.files import output_target

        output_target(args.out)
    if args.emit_python:  # the generated forward only: no module is built
        from blockgraph.compiler.codegen import generate

        print(generate(report.analysis.inference, features_only=args.features_only).code, end="")
        return 0
    model = build_model(report.analysis, features_only=args.features_only, device=args.device, max_params=None)
    if args.out is not None:
        from blockgraph.compiler.checkpoint import save

        save(model, args.out)
    if args.json:
        print(json.dumps(describe(model, (h, w), args.batch), indent=2))
    else:
        print(model.summary((h, w), batch=args.batch))
        if args.out is not None:
            print(f"wrote {args.out}")
    return 0


def _emit(data: bytes | str, out: str | None) -> None:
    """Write ``data`` to ``out`` atomically, or to stdout (bytes, a binary format, never to a terminal)."""
    if out is not None:
        from blockgraph.files import write_atomic

        write_atomic(out, data)
    elif isinstance(data, str):
        sys.stdout.write(data)
    elif getattr(sys.stdout, "buffer", None) is None or sys.stdout.isatty():
        raise SpecError("binary output: write it to a file", pos=Pos("<command line>"), hint="add --out FILE")
    else:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()


def cmd_graph(args: argparse.Namespace) -> int:
    from blockgraph.api import analyze
    from blockgraph.graph.render import render

    size = _input_size(args.input) if args.input else None
    analysis = analyze(args.spec, variant=args.variant, overrides=_overrides(args.set), root=args.root)
    hw = None
    if size is not None:
        hw = (size[-2], size[-1])
        analysis.inference.check(*hw, channels=size[0] if len(size) == 3 else None)
    data = render(analysis.inference, args.format, hw, collapse=args.collapse)
    _emit(data if args.format == "png" else data.decode(), args.out)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from blockgraph.api import build_model
    from blockgraph.compiler.export import export_onnx

    report = _validate(args)  # budgets included
    _, h, w = report.input
    model = build_model(report.analysis, features_only=args.features_only, max_params=None)
    if args.weights:
        from blockgraph.compiler.weights import load_weights_file

        load_weights_file(model, args.weights)
    result = export_onnx(
        model, args.onnx, input_size=(h, w), batch=args.batch, dynamic_size=args.dynamic_size, opset=args.opset
    )
    print(json.dumps(asdict(result), indent=2) if args.json else result.format())
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    import blockgraph.blocks  # noqa: F401
    from blockgraph.spec.source_schema import json_schema, source_schema

    schema = json_schema() if args.expanded else source_schema()
    _emit(json.dumps(schema, indent=2, ensure_ascii=False) + "\n", args.out)
    return 0


def cmd_docs(args: argparse.Namespace) -> int:
    from blockgraph.docs import pages, spec_language

    if args.all:
        if not os.path.isdir(args.all):
            raise SpecError(f"--all {args.all}: no such directory", pos=Pos("<command line>"))
        for name, text in pages().items():
            _emit(text, os.path.join(args.all, name))
            print(f"wrote {os.path.join(args.all, name)}")
    else:
        _emit(spec_language(), args.out)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    import blockgraph.blocks  # noqa: F401
    from blockgraph.api import list_models
    from blockgraph.spec.plugins import registry

    if args.ops:
        for op, cls in registry().items():
            summary = (cls.__doc__ or "").strip().splitlines()
            print(f"{op:24} {summary[0] if summary else ''}")
    else:
        for name in list_models(args.pattern):
            print(name)
    return 0


@functools.cache
def parser() -> argparse.ArgumentParser:
    """The command line's parser, built once (about 4 ms; parsing leaves it unchanged: list defaults are copied)."""
    p = argparse.ArgumentParser(prog="blockgraph", description="Declarative model builder for PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)

    def spec_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("spec", help="a spec file (YAML), or a reference spec's name (`blockgraph list`)")
        q.add_argument("--variant", help="variant of a family spec (e.g. small)")
        q.add_argument("--input", help="input size CxHxW or HxW (default: the spec's)")
        q.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help=_SET_HELP)
        q.add_argument("--root", metavar="DIR", help=_ROOT_HELP)
        q.add_argument("--json", action="store_true", help="print one JSON object")
        q.add_argument("--max-params", default="2e9", help="refuse models with more parameters (default 2e9)")
        q.add_argument("--max-activation-bytes", default=None, help="refuse a forward needing more")
        q.add_argument("--batch", default="1", help="batch size for the activation estimate (and summary)")

    v = sub.add_parser("validate", help="check a spec statically (no torch)")
    spec_args(v)
    v.set_defaults(func=cmd_validate)
    b = sub.add_parser("build", help="build the module and print its table")
    spec_args(b)
    b.add_argument("--out", help="write weights + embedded spec to this file (atomically)")
    b.add_argument("--features-only", action="store_true", help="return the feature maps")
    b.add_argument("--device", default=None, help="device to build on (e.g. meta)")
    b.add_argument("--emit-python", action="store_true", help="print the generated forward (built on meta) and exit")
    b.set_defaults(func=cmd_build)
    m = sub.add_parser("summary", help="per-node table: op, output shape, params, MACs (meta device, no weights)")
    spec_args(m)
    m.add_argument("--features-only", action="store_true", help="the model that returns the feature maps")
    m.set_defaults(func=cmd_build, max_params=None, device="meta", out=None, emit_python=False)  # no budget: meta
    g = sub.add_parser("graph", help="draw the dataflow: mermaid or dot text, svg/png through Graphviz (no torch)")
    g.add_argument("spec", help="a spec file (YAML), or a reference spec's name (`blockgraph list`)")
    g.add_argument("--format", choices=("mermaid", "dot", "svg", "png"), default="mermaid")
    g.add_argument("--variant", help="variant of a family spec (e.g. small)")
    g.add_argument("--input", help="input size CxHxW or HxW for the shapes shown (default: the spec's)")
    g.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help=_SET_HELP)
    g.add_argument("--root", metavar="DIR", help=_ROOT_HELP)
    g.add_argument("--collapse", action="store_true", help="draw each repeated block (depth: N) as one node")
    g.add_argument("--out", help="write to this file (atomically) instead of stdout")
    g.set_defaults(func=cmd_graph)
    e = sub.add_parser("export", help="export the model to ONNX (torch.onnx, dynamo exporter)")
    spec_args(e)
    e.add_argument("--onnx", required=True, metavar="PATH", help="the .onnx file to write (atomically)")
    e.add_argument("--dynamic-size", action="store_true", help="H and W dynamic too (over the accepted sizes)")
    e.add_argument("--opset", default=None, help="ONNX opset, 18 or newer (default: the exporter's)")
    e.add_argument("--weights", metavar="CKPT", help="load these weights (build --out, or a state_dict)")
    e.add_argument("--features-only", action="store_true", help="export the feature maps")
    e.set_defaults(func=cmd_export, batch=None)  # --batch N fixes the batch; without it, a dynamic batch axis
    s = sub.add_parser("schema", help="print the JSON Schema of spec files, for editors (no torch)")
    s.add_argument(
        "--expanded", action="store_true", help="the schema of a spec after expansion (what pydantic checks)"
    )
    s.add_argument("--out", help="write to this file (atomically) instead of stdout")
    s.set_defaults(func=cmd_schema)
    d = sub.add_parser("docs", help="print the spec-language reference (Markdown), generated from the models")
    d.add_argument("--out", help="write to this file (atomically) instead of stdout")
    d.add_argument("--all", metavar="DIR", help="write every generated page (reference, editor schema, picture)")
    d.set_defaults(func=cmd_docs)
    ls = sub.add_parser("list", help="list reference models (or ops)")
    ls.add_argument("pattern", nargs="?", default="*")
    ls.add_argument("--ops", action="store_true", help="list the registered ops")
    ls.set_defaults(func=cmd_list)
    for command in sub.choices.values():
        command.add_argument(
            "--plugin",
            action="append",
            default=[],
            metavar="MODULE_OR_FILE",
            help="import a module of custom blocks first (a dotted name, or a .py file); repeatable",
        )
    return p


_PACKAGES = {"torch": "torch", "einops": "einops", "networkx": "networkx", "pydantic": "pydantic", "yaml": "pyyaml"}
"""Runtime dependencies by module name → the distribution to install."""


def _unrecognized(p: argparse.ArgumentParser, command: str, extra: list[str]) -> int:
    """The subcommand's usage, the arguments it does not know, and the nearest option: exit 2."""
    import difflib

    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    options = [o for action in sub._actions for o in action.option_strings]
    sub.print_usage(sys.stderr)
    print(f"blockgraph {command}: error: unrecognized arguments: {' '.join(extra)}", file=sys.stderr)
    first = next((x for x in extra if x.startswith("-")), extra[0])
    close = difflib.get_close_matches(first.split("=")[0], options, n=1)
    hint = f"did you mean {close[0]}?" if close else f"options: {', '.join(o for o in options if o.startswith('--'))}"
    print(f"hint: {hint}", file=sys.stderr)
    return EXIT_INVALID


def _run(args: argparse.Namespace) -> int:
    _read_numbers(args)
    if args.plugin:
        from blockgraph.spec.plugins import load_command_line

        load_command_line(args.plugin)
    return args.func(args)


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args, extra = p.parse_known_args(argv)
    if extra:
        return _unrecognized(p, args.command, extra)
    from blockgraph.spec.plugins import watching_interrupts

    try:
        with watching_interrupts():
            return _run(args)
    except BlockgraphError as e:
        print(e.format(), file=sys.stderr)
        return EXIT_INVALID
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in _PACKAGES:
            raise
        package = _PACKAGES[(e.name or "").split(".")[0]]
        print(
            f"error: this command needs the package '{package}', which is not installed\n"
            f"hint: install it with `pip install {package}` (torch: the build for your machine, see pytorch.org), or "
            "set up the environment with `make venv`",
            file=sys.stderr,
        )
        return EXIT_INVALID
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # noqa: BLE001 - the one place that turns bugs into a one-line report
        frames = traceback.extract_tb(e.__traceback__)  # the last one raised
        where = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
        print(
            f"internal error: {type(e).__name__}: {e}{where} (this is a bug in blockgraph; please report it, "
            "with the spec; BLOCKGRAPH_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        if os.environ.get("BLOCKGRAPH_DEBUG"):
            raise
        return EXIT_INTERNAL
