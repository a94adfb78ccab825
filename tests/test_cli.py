"""The CLI and API contracts of DESIGN.md: validate without torch, build table / --json / --out, schema, list."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import blockgraph as bg
from blockgraph.spec.plugins import registry
from tests.conftest import ROOT
from tests.support.processes import run_bounded, run_without_torch

SMALL = ROOT / "specs" / "coat_lite_small.yaml"


def test_validate_does_not_import_torch() -> None:
    result = run_without_torch("validate", SMALL, "--input", "3x480x640")
    assert result.returncode == 0, result.stderr
    assert "stage1 1x64x120x160" in result.stdout
    assert "logits 1x1000" in result.stdout
    assert "parameters: 19,838,504; activations: 61.3 MiB per input" in result.stdout  # counted without torch


def test_cli_script_validate_exit_codes(tmp_path: Path) -> None:
    ok = subprocess.run([sys.executable, "cli.py", "validate", str(SMALL)], capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert "accepts: any H, W >= 32" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages: [{name: s, blocks: [{op: nope}]}]\n")
    result = subprocess.run([sys.executable, "cli.py", "validate", str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.startswith(f"{bad}:2:34: error: unknown op 'nope'")
    assert "Traceback" not in result.stderr


def test_validate_reports_accepted_sizes_and_rejects_others(run_cli) -> None:
    code, out, _ = run_cli("validate", SMALL)
    assert code == 0 and "accepts: any H, W >= 32" in out
    code, out, _ = run_cli("validate", SMALL, "--json")
    data = json.loads(out)
    assert data["params"] == 19_838_504 and data["activation_bytes"] == 10_511_520
    code, _, err = run_cli("validate", SMALL, "--input", "3x31x640")
    assert code == 2
    assert "input 31x640" in err and "node 'stage4.patch_embed'" in err and "nearest: H = 32" in err


def test_build_table_and_json(run_cli) -> None:
    code, out, err = run_cli("build", SMALL)
    assert code == 0, err
    assert "stage3.blocks.5" in out and "19,838,504 parameters" in out
    code, out, err = run_cli("build", SMALL, "--json", "--input", "3x480x640")
    assert code == 0, err
    data = json.loads(out)
    assert data["name"] == "coat_lite_small"
    assert data["params"] == 19_838_504
    assert data["input"] == [1, 3, 480, 640]
    assert data["outputs"] == {"logits": [1, 1000]}
    by_name = {n["name"]: n for n in data["nodes"]}
    assert by_name["stage1.blocks.2"]["shape"] == [1, 19201, 64]
    assert by_name["head"]["inputs"] == ["stage4.blocks.2"]
    assert sum(n["params"] for n in data["nodes"]) < data["params"]  # shared CPE/CRPE are counted on their own
    # MACs at 480x640, from torch's flop counter on the meta device: every node's share, and the total
    assert data["macs"] == sum(n["macs"] for n in data["nodes"])  # a node's count includes the shared modules it calls
    assert by_name["stage1.patch_embed"]["macs"] == 120 * 160 * 64 * 3 * 4 * 4  # conv 4x4/4: out pixels * C_out * k
    assert 0.95 < data["macs"] / (3.96e9 * 480 * 640 / 224**2) < 1.1  # ARCHITECTURES.md: 3.96 GMACs at 224


def test_build_out_is_atomic_and_embeds_the_spec(tmp_path: Path, run_cli) -> None:
    out = tmp_path / "model.pt"
    code, _, err = run_cli("build", ROOT / "specs" / "coat_lite_tiny.yaml", "--out", out)
    assert code == 0, err
    assert os.listdir(tmp_path) == ["model.pt"]  # no temporary file left behind
    payload = torch.load(out, weights_only=True)
    assert payload["format"] == "blockgraph-checkpoint/2"
    spec = json.loads(payload["spec"])
    assert spec["name"] == "coat_lite_tiny"
    assert "stage1.blocks.0.factoratt_crpe.qkv.weight" in payload["state_dict"]
    # The embedded spec alone rebuilds the same architecture, and the weights load strictly.
    model = bg.build_model(payload["spec"])
    model.load_state_dict(payload["state_dict"], strict=True)


TINY_ARGS = ("coat_lite_tiny", "--set", "depths=[1,1,1,1]", "--set", "dims=[16,16,16,16]")
"""A model built in milliseconds, whose checkpoint is 200 kB."""


def _out_targets(tmp_path: Path) -> dict[str, tuple[str, str, str]]:
    """``--out`` values that must be refused: (value, the error, the hint)."""
    (tmp_path / "null.pt").symlink_to(os.devnull)
    targets = {
        "empty": ("", "the output path is empty", "e.g. --out model.pt"),
        "a directory": (str(tmp_path), "it is a directory", f"e.g. {tmp_path / 'model.pt'}"),
        "no directory": (str(tmp_path / "nope" / "m.pt"), "no directory", "create the directory"),
        "a link to /dev/null": (str(tmp_path / "null.pt"), "it is a character device (a link to", "regular file"),
    }
    if os.path.isdir("/proc/self"):
        targets["in /proc"] = ("/proc/x.pt", "no new file can be made in /proc", "a directory you can write to")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe.pt")
        targets["a FIFO"] = (str(tmp_path / "pipe.pt"), "it is a FIFO", "regular file")
    return targets


def test_build_out_refuses_what_is_not_a_regular_file(tmp_path: Path, run_cli) -> None:
    """Each refused --out: exit 2 before the model is built, the reason and a hint, and what was there untouched;
    the other commands that write --out refuse the same."""
    targets = _out_targets(tmp_path)
    for case, (value, message, hint) in targets.items():
        code, out, err = run_cli("build", *TINY_ARGS, "--out", value)
        assert code == 2 and message in err and hint in err.partition("\nhint: ")[2], (case, err)
        assert "Traceback" not in err and "internal error" not in err and out == "", case
    for command in (("schema",), ("graph", "coat_lite_tiny"), ("docs",)):
        for case in ("empty", "a directory", "a link to /dev/null"):
            value, message, _ = targets[case]
            code, _, err = run_cli(*command, "--out", value)
            assert code == 2 and message in err, (command, case, err)
    assert os.readlink(tmp_path / "null.pt") == os.devnull
    fifo = "a FIFO" in targets
    assert not fifo or stat.S_ISFIFO((tmp_path / "pipe.pt").stat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["null.pt", *(["pipe.pt"] if fifo else [])]


def _damaged(path: Path, case: str) -> bytes:
    """A checkpoint (``path``) damaged as ``case`` says."""
    data = path.read_bytes()
    payload = torch.load(path, weights_only=True)
    if case == "empty":
        return b""
    if case == "cut":
        return data[: len(data) // 3]
    if case == "random bytes":
        return bytes(range(256)) * 16
    if case == "a flipped bit":
        first = payload["state_dict"]["stage1.patch_embed.proj.weight"].numpy().tobytes()
        at = data.index(first) + len(first) // 2
        return data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1 :]
    field, value = {"spec an int": ("spec", 3), "state_dict a list": ("state_dict", [])}[case]
    out = io.BytesIO()
    torch.save({**payload, field: value}, out)
    return out.getvalue()


@pytest.mark.parametrize("case", ["empty", "cut", "random bytes", "a flipped bit", "spec an int", "state_dict a list"])
def test_commands_that_read_a_damaged_checkpoint_exit_2(case: str, tmp_path: Path, run_cli) -> None:
    """``export --weights`` reads checkpoints (and ``validate``/``build`` take a spec, not a checkpoint): a damaged
    one is an error naming the file, with a hint; never an internal error."""
    good = tmp_path / "good.pt"
    assert run_cli("build", *TINY_ARGS, "--out", good)[0] == 0
    bad = tmp_path / "bad.pt"
    bad.write_bytes(_damaged(good, case))
    code, _, err = run_cli("export", *TINY_ARGS, "--onnx", tmp_path / "x.onnx", "--weights", bad)
    assert code == 2 and err.startswith(f"{bad}: error: ") and "\nhint: " in err, err
    if case == "a flipped bit":
        assert "1 tensor(s) do not match their sha256: 'stage1.patch_embed.proj.weight'" in err
    for command in ("validate", "build"):
        code, _, err = run_cli(command, bad)
        assert code == 2 and "internal error" not in err, err
    assert sorted(os.listdir(tmp_path)) == ["bad.pt", "good.pt"]


def test_build_out_of_a_model_on_the_meta_device_is_refused(tmp_path: Path, run_cli) -> None:
    code, _, err = run_cli("build", *TINY_ARGS, "--device", "meta", "--out", tmp_path / "m.pt")
    assert code == 2 and "is on the meta device: it has no weights" in err and "hint:" in err
    assert list(tmp_path.iterdir()) == []


def test_build_out_on_a_full_disk_keeps_the_old_file(tmp_path: Path) -> None:
    """A write that fails midway (here: the file size limit, as a full disk would): exit 2, the reason, the old file
    as it was, no temporary file."""
    out = tmp_path / "m.pt"
    out.write_bytes(b"the old checkpoint")
    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, resource.RLIM_INFINITY)); "
        f"from blockgraph.cli import main; sys.exit(main({['build', *TINY_ARGS, '--out', str(out)]!r}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and f"{out}: error: cannot write {out}: File too large" in done.stderr, done.stderr
    assert out.read_bytes() == b"the old checkpoint" and os.listdir(tmp_path) == ["m.pt"]


def test_schema_is_json_schema_with_every_op(run_cli) -> None:
    code, out, _ = run_cli("schema")
    assert code == 0
    schema = json.loads(out)
    text = json.dumps(schema)
    for op in registry():
        assert f'"{op}"' in text
    assert schema["title"] == "blockgraph model spec"


def test_list(run_cli) -> None:
    code, out, _ = run_cli("list", "coat_lite*")
    assert code == 0
    names = out.split()
    assert names == sorted(names) and all(n.startswith("coat_lite") for n in names)
    assert {"coat_lite", "coat_lite_medium", "coat_lite_mini", "coat_lite_small", "coat_lite_tiny"} <= set(names)
    code, out, _ = run_cli("list", "--ops")
    assert "serial_block" in out and "conv_rel_pos_enc" in out


def test_create_model_and_list_models() -> None:
    assert "coat_lite_small" in bg.list_models("coat*")
    model = bg.create_model("coat_lite_tiny", num_classes=10, device="meta")
    assert model.spec.name == "coat_lite_tiny"
    assert model.get_submodule("head.fc").out_features == 10
    with pytest.raises(bg.SpecError, match="no reference spec named 'coat_lite_smal'") as info:
        bg.create_model("coat_lite_smal")
    assert "coat_lite_small" in info.value.hint


def test_shared_modules_are_registered_once_and_reused() -> None:
    model = bg.create_model("coat_lite_tiny", device="meta")
    keys = list(model.state_dict())
    assert sum(k.startswith("stage1.cpe.") for k in keys) == 2  # weight, bias: once
    assert not any(".blocks.0.cpe." in k for k in keys)
    assert "    m_stage1 = self.stage1" in model.code.splitlines()
    assert "cpe=m_stage1.cpe, crpe=m_stage1.crpe" in model.code


def test_forward_rejects_a_bad_input_with_a_blockgraph_error() -> None:
    model = bg.create_model("coat_lite_tiny")
    with pytest.raises(bg.ShapeError, match="input 16x64") as info:
        model(torch.randn(1, 3, 16, 64))
    assert "accepts any H, W >= 32" in info.value.hint
    with pytest.raises(bg.ShapeError, match="4-d image batch"):
        model(torch.randn(3, 224, 224))
    with pytest.raises(bg.ShapeError, match="the input has 1 channels"):
        model(torch.randn(1, 1, 224, 224))


def test_variant_argument_and_family_file() -> None:
    report = bg.validate(ROOT / "specs" / "coat_lite.yaml", variant="small")
    assert report.name == "coat_lite_small"
    small = bg.analyze(SMALL)
    family = bg.analyze(ROOT / "specs" / "coat_lite.yaml", variant="small")
    assert small.spec.variables == family.spec.variables
    assert [n.name for n in small.graph] == [n.name for n in family.graph]


def test_summary_lists_every_node() -> None:
    model = bg.create_model("coat_lite_tiny", device="meta")
    text = model.summary((480, 640))
    assert "stage1.blocks.1" in text and "1x19201x64" in text and "5,721,960 parameters" in text


HOSTILE = {
    "python_tag": ("name: x\nstages: !!python/object/apply:os.system ['true']\n", "2:9", "tag"),
    "duplicate_key": ("name: x\nname: y\nstages: []\n", "2:1", "duplicate key 'name'"),
    "billion_laughs": (
        "a: &a [x, x, x, x, x, x, x, x, x]\n"
        + "".join(f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True))
        + "name: *i\n",
        "",
        "expand",
    ),
    "depth_ten_million": (
        (ROOT / "specs" / "vit.yaml").read_text().replace("depth: 12", "depth: 10000000"),
        "",
        "`depth` 10,000,000 would expand the spec past the limit",
    ),
    "width_a_billion": (
        (ROOT / "specs" / "vit.yaml").read_text().replace("dim: 192", "dim: 999999999"),
        "",
        "would have 144,000,001,836,999,999,019 parameters",
    ),
    "binary_garbage": (bytes(range(256)) * 64, "", "binary"),
    "not_utf8": ("name: caf\xe9\n".encode("latin-1"), "1:", "UTF-8"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_files_fail_cleanly_in_under_a_second(case: str, tmp_path: Path, run_cli) -> None:
    """Each hostile file: exit 2, a FILE:LINE:COL error naming the problem, no traceback, within one second (imports
    are warmed first: the time is blockgraph's)."""
    run_cli("validate", SMALL)
    content, where, fragment = HOSTILE[case]
    path = tmp_path / f"{case}.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    for command in ("validate", "build"):
        start = time.perf_counter()
        code, _, err = run_cli(command, path)
        elapsed = time.perf_counter() - start
        assert code == 2, err
        assert err.startswith(f"{path}:{where}"), err
        assert fragment in err and "Traceback" not in err
        assert elapsed < 1.0, f"{command} took {elapsed:.2f} s"


LAUGHS = (
    "{"
    + ", ".join(
        ["a0: &a0 [" + ", ".join(["x"] * 9) + "]"]
        + [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    )
    + "}"
)


def _spec(tmp: Path, text: str) -> Path:
    (tmp / "spec.yaml").write_text(text)
    return tmp / "spec.yaml"


def _fifo(tmp: Path) -> Path:
    os.mkfifo(tmp / "spec.yaml")
    return tmp / "spec.yaml"


def _link(tmp: Path, target: str) -> Path:
    (tmp / "spec.yaml").symlink_to(target)
    return tmp / "spec.yaml"


BOUNDED = {
    # case: (the spec file, a function of tmp_path; more arguments; what stderr's first line says)
    "a FIFO": (_fifo, (), "is a FIFO (named pipe), not a spec file"),
    "a link to /dev/zero": (lambda tmp: _link(tmp, "/dev/zero"), (), "is a character device, not a spec file"),
    "a link to /dev/urandom": (lambda tmp: _link(tmp, "/dev/urandom"), (), "is a character device"),
    "a recursive alias": (
        lambda tmp: _spec(tmp, (ROOT / "specs" / "coat_lite_tiny.yaml").read_text() + "r: &r [*r]\n"),
        (),
        "the alias *r is inside the collection it names",
    ),
    "4 MB of dashes": (lambda tmp: _spec(tmp, "-\n" * 1_999_999), (), "expands to more than 200,000 values"),
    "--set alias bomb": (lambda tmp: SMALL, ("--set", f"depths={LAUGHS}"), "expands to more than 200,000 values"),
    "--set recursive alias": (lambda tmp: SMALL, ("--set", "depths=&r [*r]"), "inside the collection it names"),
    "extends a FIFO": (
        lambda tmp: (os.mkfifo(tmp / "parent.yaml"), _spec(tmp, "name: x\nextends: parent.yaml\n"))[1],
        (),
        "`extends:` names a FIFO (named pipe), not a spec file",
    ),
    "imports a FIFO": (
        lambda tmp: (os.mkfifo(tmp / "blocks.py"), _spec(tmp, "name: x\nimports: [./blocks.py]\n"))[1],
        (),
        "blocks.py is a FIFO (named pipe)",
    ),
    "imports /dev/zero": (
        lambda tmp: ((tmp / "blocks.py").symlink_to("/dev/zero"), _spec(tmp, "name: x\nimports: [./blocks.py]\n"))[1],
        (),
        "/dev/zero is a character device",
    ),
}


@pytest.mark.parametrize("case", list(BOUNDED))
def test_hostile_reads_are_refused_fast_in_a_bounded_process(case: str, tmp_path: Path) -> None:
    """Inputs that used to hang or exhaust memory, each through `cli.py validate` in a process of its own (killed
    after 30 s, unable to map more than 1 GiB): exit 2 with a clear error within 5 s."""
    make, args, fragment = BOUNDED[case]
    start = time.perf_counter()
    result = run_bounded(["cli.py", "validate", make(tmp_path), *args])
    elapsed = time.perf_counter() - start
    assert result.returncode == 2, result.stderr[-2000:]
    assert fragment in result.stderr.splitlines()[0], result.stderr
    assert elapsed < 5, f"{elapsed:.1f} s"


def _family(tmp: Path) -> Path:
    """A directory to confine specs to (`--root`), holding a family spec, a plugin file and links out of it."""
    root = tmp / "root"
    (root / "sub").mkdir(parents=True)
    (root / "family.yaml").write_text((ROOT / "specs" / "coat_lite.yaml").read_text())
    (root / "blocks.py").write_text("")
    (tmp / "outside.yaml").write_text("name: x\nstages: sk-live-0123456789abcdefghijklmnopqrstuvwxyz0123456789\n")
    (tmp / "plugin.py").write_text("")
    (root / "link.yaml").symlink_to(tmp / "outside.yaml")
    return root


READS = {
    # case: (the spec's text, written in root/sub; whether validate runs with --root; what stderr's first line says,
    # None: valid)
    "extends a family under the root": ("name: c\nextends: ../family.yaml\nvariant: tiny\n", True, None),
    "extends a reference spec by name": ("name: c\nextends: coat_lite_tiny\n", True, None),
    "extends a reference that extends its family": ("name: c\nextends: coat_lite_tiny.yaml\n", True, None),
    "extends a file outside the root": (
        "name: c\nextends: ../../outside.yaml\n",
        True,
        "`extends:` names a file outside the directory specs may read",
    ),
    "extends a link out of the root": (
        "name: c\nextends: ../link.yaml\n",
        True,
        "`extends:` names a file outside the directory specs may read",
    ),
    "imports a .py file under the root": ("name: c\nextends: coat_lite_tiny\nimports: [../blocks.py]\n", True, None),
    "imports a .py file outside the root": (
        "name: c\nextends: coat_lite_tiny\nimports: [../../plugin.py]\n",
        True,
        "`imports:` names a file outside the directory specs may read",
    ),
    "imports a module by name": (
        "name: c\nextends: coat_lite_tiny\nimports: [bgplug_never_imported]\n",
        True,
        "the spec imports the module 'bgplug_never_imported' by name, which a spec checked with a root",
    ),
    "extends /etc/passwd": ("name: c\nextends: /etc/passwd\n", False, "is not a spec (.yaml or .yml): /etc/passwd"),
    "extends a directory": ("name: c\nextends: ../../root\n", False, "`extends:` names a directory, not a spec file"),
    "extends /dev/zero": ("name: c\nextends: /dev/zero\n", False, "`extends:` names a character device"),
    "a parent's value is shown in part": (
        "extends: ../../outside.yaml\n",
        False,
        "'stages': input should be a valid list (got 'sk-live-0123456789abcdefghijklmnopqr... (54 characters))",
    ),
}


@pytest.mark.parametrize("case", list(READS))
def test_extends_and_imports_read_only_spec_files_and_stay_under_the_root(
    case: str, tmp_path: Path, run_cli, plugin_sandbox
) -> None:
    text, confined, fragment = READS[case]
    root = _family(tmp_path)
    spec = root / "sub" / "spec.yaml"
    spec.write_text(text)
    code, out, err = run_cli("validate", spec, *(("--root", root) if confined else ()))
    if fragment is None:
        assert code == 0, err
        return
    assert code == 2, out
    assert err.startswith(f"{spec}:2:") or err.startswith(f"{spec}:3:") or err.startswith(f"{tmp_path}"), err
    assert fragment in err.splitlines()[0], err
    assert "sk-live-0123456789abcdefghijklmnopqrstuvwxyz" not in err


def test_root_refuses_a_spec_file_outside_it_and_a_missing_directory(tmp_path: Path, run_cli) -> None:
    root = _family(tmp_path)
    code, _, err = run_cli("validate", tmp_path / "outside.yaml", "--root", root)
    assert code == 2 and "the spec file is outside the directory specs may read" in err
    code, _, err = run_cli("validate", "coat_lite_tiny", "--root", tmp_path / "nope")
    assert code == 2 and err.startswith("<root>: error: root ") and "no such directory" in err
    assert run_cli("validate", "coat_lite_tiny", "--root", root)[0] == 0  # a reference spec, by name


def test_root_in_the_api(tmp_path: Path) -> None:
    root = _family(tmp_path)
    spec = root / "sub" / "spec.yaml"
    spec.write_text("name: c\nextends: ../../outside.yaml\n")
    with pytest.raises(bg.SpecError, match="outside the directory specs may read") as info:
        bg.validate(spec, root=root)
    assert info.value.line == 2
    spec.write_text("name: c\nextends: ../family.yaml\nvariant: tiny\n")
    assert bg.validate(spec, root=root).name == "c"
    assert bg.build_model(spec, root=root, device="meta").spec.name == "c"


def test_summary_per_node_params_and_macs_add_up(run_cli) -> None:
    code, out, err = run_cli("summary", ROOT / "specs" / "coat_lite_tiny.yaml", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["params"] == 5_721_960  # timm's coat_lite_tiny
    nodes = {n["name"]: n for n in data["nodes"]}
    shared = {s["name"]: s for s in data["shared"]}
    # 4 stages x (patch_embed, cls, 2 blocks), 3 to_map (stage4.to_map is a feature only) and the head; cpe, crpe x 4
    assert len(nodes) == 20 and len(shared) == 8
    # Every parameter belongs to exactly one row: a node or a shared module.
    assert sum(n["params"] for n in nodes.values()) + sum(s["params"] for s in shared.values()) == data["params"]
    # A node's MACs include the shared modules it calls, so the nodes alone add up to the total.
    assert sum(n["macs"] for n in nodes.values()) == data["macs"]
    # The last block computes the cls token only (the head reads nothing else): its keys and values for all 50 tokens
    # (qkv's k, v rows, the CPE and softmax(k)^T v: 10,240,000 + 141,120 + 8 x 40 x 40 x 50) and the rest for one.
    last = nodes["stage4.blocks.1"]
    assert last["computed_tokens"] == 1 and last["shape"] == [1, 50, 320]
    assert (
        last["macs"]
        == 50 * 320 * 640 + 7 * 7 * 320 * 9 + 8 * 40 * 40 * 50 + 320 * 320 * 2 + 8 * 40 * 40 + 2 * 320 * 1280
    )
    full = nodes["stage4.blocks.0"]["macs"]  # the same block on every token
    assert 0.98 < (data["macs"] - last["macs"] + full) / 1.60e9 < 1.01  # timm's benchmark CSV: 1.60 GMACs at 224
    assert not any("computed_tokens" in n for name, n in nodes.items() if name != "stage4.blocks.1")
    assert nodes["stage1.patch_embed"]["macs"] == 56 * 56 * 64 * 3 * 4 * 4  # conv 4x4/4, 3 -> 64 channels
    assert nodes["head"]["macs"] == 320 * 1000 and nodes["head"]["params"] == 2 * 320 + 320 * 1000 + 1000
    # The shared depthwise 3x3 CPE of stage 1 runs once per block (2 blocks) on a 56x56x64 map.
    assert shared["stage1.cpe"]["macs"] == 2 * 56 * 56 * 64 * 9
    assert shared["stage1.cpe"]["users"] == ["stage1.blocks.0", "stage1.blocks.1"]
    assert shared["stage1.cpe"]["params"] == 64 * 9 + 64


def test_summary_table_and_batch(run_cli) -> None:
    code, out, err = run_cli("summary", ROOT / "specs" / "coat_lite_tiny.yaml", "--input", "3x448x448", "--batch", "2")
    assert code == 0, err
    assert "stage1.cpe" in out and "conv_pos_enc (shared)" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:] if line.strip()}
    assert rows["stage1.blocks.1"][-3] == "2x12545x64"  # 1 + 112 * 112 tokens at batch 2
    assert rows["stage1.patch_embed"][-1] == f"{2 * 112 * 112 * 64 * 3 * 4 * 4:,}"
    assert rows["head"][-2:] == ["321,640", f"{2 * 320 * 1000:,}"]
    assert out.splitlines()[-1].startswith("coat_lite_tiny: 5,721,960 parameters, ")
    assert out.splitlines()[-1].endswith(" at 2x448x448, outputs: logits")


def test_summary_never_allocates_weights(run_cli) -> None:
    # 64 blocks of width 12288: ~116 G parameters, far past memory; the summary works on the meta device alone.
    code, out, err = run_cli(
        "summary", ROOT / "specs" / "vit_tiny_patch16_224.yaml", "--set", "dim=12288", "--set", "depth=64"
    )
    assert code == 0, err
    d = 12288  # per block: qkv, proj, fc1, fc2 = 12 d^2 + 9 d; two norms 4 d; then patch embed, cls + pos, head
    expected = 64 * (12 * d * d + 13 * d) + (16 * 16 * 3 * d + d) + (1 + 197) * d + (2 * d + 1000 * d + 1000)
    assert f"vit_tiny_patch16_224: {expected:,} parameters" in out


def test_build_emit_python_prints_the_generated_forward(run_cli) -> None:
    code, out, err = run_cli("build", ROOT / "specs" / "coat_lite_tiny.yaml", "--emit-python")
    assert code == 0, err
    assert out == bg.create_model("coat_lite_tiny", device="meta").code
    lines = out.splitlines()
    assert lines[0] == "def forward(self, image):"
    assert "    stage1_patch_embed = m_stage1.patch_embed(image)  # [B, (H//4)*(W//4), 64]" in lines
    assert lines[-1] == "    return head"
    compile(out, "<emitted>", "exec")  # valid Python
    code, out, _ = run_cli("build", ROOT / "specs" / "coat_lite_tiny.yaml", "--emit-python", "--features-only")
    assert out.splitlines()[-1] == "    return [stage1_to_map, stage2_to_map, stage3_to_map, stage4_to_map]"


def test_a_reference_name_is_a_spec_and_a_near_miss_says_which(run_cli, tmp_path) -> None:
    code, out, _ = run_cli("validate", "coat_lite_small")
    assert code == 0 and out.startswith("coat_lite_small: valid")
    code, _, err = run_cli("validate", "coat_lite_smal")
    assert code == 2
    assert err.startswith("coat_lite_smal: error: no such file or reference spec: 'coat_lite_smal'")
    assert "did you mean 'coat_lite_small'" in err
    code, _, err = run_cli("build", str(tmp_path / "missing.yaml"))
    assert code == 2 and "no such file or reference spec" in err
    (tmp_path / "mine.yaml").write_text("name: mine\nextends: coat_lite.yaml\nvariant: tiny\n")  # found in specs/
    code, out, _ = run_cli("validate", tmp_path / "mine.yaml")
    assert code == 0 and out.startswith("mine: valid")


def test_a_mistyped_flag_gets_the_commands_usage_and_the_nearest_option(run_cli) -> None:
    code, _, err = run_cli("validate", "coat_lite_small", "--vairant", "tiny")
    assert code == 2
    assert err.startswith("usage: blockgraph validate")
    assert "unrecognized arguments: --vairant tiny" in err and "hint: did you mean --variant?" in err


def test_a_missing_runtime_dependency_is_named_not_a_bug() -> None:
    code = "import sys; sys.modules['torch'] = None; from blockgraph.cli import main; sys.exit(main(['build', 'vit_tiny_patch16_224']))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "needs the package 'torch'" in done.stderr and "pip install torch" in done.stderr
    assert "bug" not in done.stderr
