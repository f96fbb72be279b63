"""Run every benchmark (what `make bench` runs), each in its own process so that one's memory
and threads cannot skew another's, and gather their tables into bench/results/README.md.

Adding a benchmark = one module with a main() and --quick, plus its name in BENCHMARKS (a
variant of a module run with its own flags: VARIANTS).

--device is passed to every benchmark; --model too, and a model other than MiniLM runs (and
gathers into <results>/<model>-<device>/README.md) only the benchmarks that take it: MODEL_READY,
or those named with --only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from .common import QUICK_RESULTS, RESULTS, env_line, environment, md_table
from .models import MODELS, results_dir

BENCHMARKS = ["merge", "train_step", "serving", "continual", "continual-causal-lm", "pipeline", "scale", "soak"]
VARIANTS = {"continual-causal-lm": ("continual", ["--family", "causal-lm"])}  # result name → (module, its flags)
MODEL_READY = [
    "train_step",
    "serving",
]  # the benchmarks that run on --model llama-*; add merge when bench.merge takes it
ROOT = Path(__file__).resolve().parent.parent


def gathered(name: str, out: Path) -> dict:
    """A benchmark's last results as run() reports them, without running it again."""
    data = json.loads((out / f"{name}.json").read_text()) if (out / f"{name}.json").exists() else {}
    return {"name": name, "rc": 0 if data else 1, "wall_s": data.get("wall_s", 0.0), "targets": data.get("targets", [])}


def run(name: str, flags: list[str], out: Path) -> dict:
    """Run bench.<name> in a fresh interpreter; its exit code, wall time and targets."""
    for ext in ("json", "md"):
        (out / f"{name}.{ext}").unlink(missing_ok=True)  # never gather a stale result
    t0 = time.perf_counter()
    module, own = VARIANTS.get(name, (name, []))
    rc = subprocess.run([sys.executable, "-m", f"bench.{module}", *own, *flags], cwd=ROOT).returncode
    wall = time.perf_counter() - t0
    data = json.loads((out / f"{name}.json").read_text()) if (out / f"{name}.json").exists() else {}
    return {"name": name, "rc": rc, "wall_s": wall, "targets": data.get("targets", [])}


def readme(runs: list[dict], out: Path, command: str, env: dict) -> str:
    """env: the environment when the run started (its commit is the code measured)."""
    moved = environment()["git_commit"]
    glance = md_table(
        ["benchmark", "target", "verdict", "measured"],
        [[r["name"], t["name"], "MET" if t["met"] else "**NOT MET**", t["detail"]] for r in runs for t in r["targets"]]
        + [[r["name"], "runs to completion", "**FAILED**", f"exit code {r['rc']}"] for r in runs if r["rc"] != 0],
    )
    walls = md_table(
        ["benchmark", "wall time (s)", "exit code"],
        [[r["name"], f"{r['wall_s']:.0f}", r["rc"]] for r in runs]
        + [["total (sum)", f"{sum(r['wall_s'] for r in runs):.0f}", ""]],
    )
    parts = [
        "# Benchmark results",
        "",
        f"Produced by `{command}` on {env_line(env)}.",
        "",
        *(
            [f"**The checkout moved to commit {moved} during the run**: each section names the commit it measured.", ""]
            if moved != env["git_commit"]
            else []
        ),
        "Every comparison is measured side by side in the same run; absolute times come from a shared 2-core "
        "machine and "
        "only mean something relative to each other. Each section below is also in `<name>.md` (tables) and "
        "`<name>.json` (every number).",
        "",
        "## Targets at a glance",
        "",
        glance,
        "",
        "## Wall time",
        "",
        walls,
        "",
    ]
    for r in runs:
        md = out / f"{r['name']}.md"
        parts += [
            md.read_text() if md.exists() else f"## {r['name']}\n\nFAILED (exit code {r['rc']}); no results.\n",
            "",
        ]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="every benchmark's smoke run (results/quick/)")
    p.add_argument(
        "--only",
        nargs="+",
        choices=BENCHMARKS,
        help="run only these; the README still gathers every benchmark's latest results",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="passed to every benchmark (default: auto = cuda when available)",
    )
    p.add_argument(
        "--model",
        choices=MODELS,
        default="minilm",
        help=f"passed to every benchmark run; other than minilm: only {', '.join(MODEL_READY)} "
        "unless --only says otherwise",
    )
    args = p.parse_args(argv)
    device = torch.device(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    out = results_dir(QUICK_RESULTS if args.quick else RESULTS, args.model, device)
    out.mkdir(parents=True, exist_ok=True)
    flags = (
        (["--quick"] if args.quick else [])
        + (["--device", args.device] if args.device != "auto" else [])
        + (["--model", args.model] if args.model != "minilm" else [])
    )
    t0, env = time.perf_counter(), environment(device)
    names = BENCHMARKS if args.model == "minilm" else [b for b in BENCHMARKS if b in (args.only or MODEL_READY)]
    runs = [run(name, flags, out) if name in (args.only or names) else gathered(name, out) for name in names]
    command = " ".join(["python -m bench.run_all", *(argv if argv is not None else sys.argv[1:])])
    (out / "README.md").write_text(readme(runs, out, command, env))
    print(f"wrote {out / 'README.md'} ({time.perf_counter() - t0:.0f} s)")
    return max((r["rc"] for r in runs), default=0)


if __name__ == "__main__":
    sys.exit(main())
