"""CoaT-Lite: our compiled model vs timm's, same weights; and `validate` vs a meta-device forward process.

Prints ratios measured in one run (ours / reference); lower is better. Usage:

    .venv/bin/python bench/coat_lite.py [--model coat_lite_small] [--rounds 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402
from timing import interleaved, process_time, python  # noqa: E402

import blockgraph as bg  # noqa: E402
from tests.support.timm_oracle import create_timm, import_timm  # noqa: E402


def latency(name: str, rounds: int) -> list[tuple[str, float, float, float]]:
    import_timm()
    twin = create_timm(name).eval()
    ours = bg.create_model(name).eval()
    bg.load_timm_state_dict(ours, twin.state_dict())
    rows = []
    for batch in (1, 8):
        x = torch.randn(batch, 3, 224, 224)
        with torch.inference_mode():
            assert torch.allclose(ours(x), twin(x), atol=1e-5, rtol=0)
            t = interleaved({"ours": lambda x=x: ours(x), "timm": lambda x=x: twin(x)}, rounds=rounds)
        rows.append((f"eager forward, batch {batch}, 224x224", t["ours"], t["timm"], t["ours"] / t["timm"]))
    return rows


def validate_time(name: str) -> tuple[str, float, float, float]:
    spec = str(ROOT / "specs" / f"{name}.yaml")
    ours = process_time([sys.executable, str(ROOT / "cli.py"), "validate", spec], cwd=str(ROOT))
    meta = (
        "import sys; sys.path.insert(0, '.'); import torch\n"
        "from tests.support.timm_oracle import create_timm\n"
        f"m = create_timm({name!r}, device='meta')\n"
        "m(torch.empty(1, 3, 224, 224, device='meta'))\n"
    )
    reference = process_time(python(meta), cwd=str(ROOT))
    return ("validate process vs import torch + timm build + meta forward", ours, reference, ours / reference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="coat_lite_small")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = latency(args.model, args.rounds) + [validate_time(args.model)]
    print(f"{args.model}, {args.threads} threads, torch {torch.__version__}")
    print("| measurement | ours (ms) | reference (ms) | ours / reference |")
    print("| --- | ---: | ---: | ---: |")
    for what, ours, ref, ratio in rows:
        print(f"| {what} | {ours * 1e3:.1f} | {ref * 1e3:.1f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
