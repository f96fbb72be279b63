"""What every benchmark shares: the command line, timing, the machine description, result files,
and synthetic LoRA factors with the structure Share assumes.

Timing is always relative: contenders run in the same process, interleaved round-robin after a
warm-up, and the report gives the median and the ratio. On a shared machine (other jobs on the
same cores) absolute seconds drift by several × within minutes; an interleaved ratio much less.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
QUICK_RESULTS = RESULTS / "quick"


# ---- command line ------------------------------------------------------------------------------
def parse_args(
    description: str,
    argv: list[str] | None = None,
    threads: int | None = None,
    models: tuple[str, ...] = ("minilm",),
    model_note: str = "",
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """--quick: a seconds-long smoke run (tiny sizes) written to results/quick/ so it never
    overwrites the real results; --out: another results directory; --threads: torch intra-op
    threads (default `threads`, else every core this process may use); --device auto|cpu|cuda
    (auto: cuda when available), returned as a torch.device; --model: the base model
    (bench.models.MODELS; default minilm). A benchmark lists the models it runs on in `models`;
    any other is refused with one line (plus `model_note`, why). Results of a model other than
    minilm go to <results>/<model>-<device>/ (bench.models.results_dir) unless --out is given."""
    from .models import MODELS, results_dir

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results directory (default bench/results, or bench/results/quick with --quick; "
        "<that>/<model>-<device> for a model other than minilm)",
    )
    p.add_argument(
        "--threads", type=int, default=threads, help="torch threads (default: %(default)s; None = every available core)"
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where models run (default: auto = cuda when available)",
    )
    p.add_argument(
        "--model",
        choices=MODELS,
        default="minilm",
        help="base model: minilm = the packaged MiniLM classifier (default); "
        "llama-tiny / llama-0.5b / llama-1b = a randomly initialised "
        "Llama-shaped causal LM built from a config (no download; llama-tiny for CPU smoke runs)",
    )
    if extra:  # the benchmark's own options
        extra(p)
    args = p.parse_args(argv)
    if args.model not in models:
        p.exit(
            2,
            f"{p.prog}: --model {args.model} is not supported by this benchmark (it runs on: "
            f"{', '.join(models)}){'; ' + model_note if model_note else ''}\n",
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        p.exit(
            2,
            f"{p.prog}: --device cuda: no CUDA device is available (torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda or 'none'})\n",
        )
    args.device = torch.device(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    args.out = args.out or results_dir(QUICK_RESULTS if args.quick else RESULTS, args.model, args.device)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notices, not ours
    torch.manual_seed(0)
    return args


# ---- timing ------------------------------------------------------------------------------------
@dataclass
class Timing:
    """Seconds per call: median and quartiles over `runs` timed calls."""

    median: float
    p25: float
    p75: float
    runs: int

    @classmethod
    def of(cls, samples: list[float]) -> Timing:
        q = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
        return cls(statistics.median(samples), q[0], q[2], len(samples))


def sync() -> None:
    """Wait for queued GPU work so that a timer measures it (no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn: Callable[[], object]) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, Timing]:
    """Median seconds of each fn over `repeats` rounds; each round runs every fn once, starting
    from a rotating position, so load from other processes hits every contender alike."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            samples[name].append(_timed(fns[name]))
    return {name: Timing.of(s) for name, s in samples.items()}


def time_adaptive(fn: Callable[[], object], budget_s: float = 0.5, max_repeats: int = 9) -> tuple[Timing, object]:
    """(median seconds of fn, its last result): one run, then, if that was fast, a fresh series
    until ~budget_s is spent (at most max_repeats), the first run serving as warm-up. Slow calls
    (a full SVD of a 4096-row stack) run once; fast ones get a median."""
    box = {}

    def call():
        box["result"] = fn()

    samples = [_timed(call)]
    if samples[0] < budget_s:
        samples = []
        while len(samples) < max_repeats and sum(samples) < budget_s:
            samples.append(_timed(call))
    return Timing.of(samples), box["result"]


# ---- memory ------------------------------------------------------------------------------------
def rss_bytes() -> int:
    """Resident set size of this process, after returning freed heap pages to the OS (glibc),
    so that a before/after difference counts what is live rather than allocator slack."""
    import gc

    import psutil

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return psutil.Process().memory_info().rss


def tensor_bytes(tensors) -> int:
    """Bytes held by the tensors, each storage counted once (views and aliases share one)."""
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


# ---- the machine -------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(device: torch.device | None = None) -> dict:
    """Where the numbers come from: they mean little without the machine and the load on it."""
    import peft
    import transformers

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=RESULTS.parent, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "git_commit": commit,
        "command": " ".join([Path(sys.executable).name, "-m", *_module_argv()]),
    }


def _module_argv() -> list[str]:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return [spec.name if spec else sys.argv[0], *sys.argv[1:]]


def env_line(env: dict) -> str:
    return (
        f"{env['date']} · {env['cpu']}, {env['cores']} cores ({env['torch_threads']} torch threads, "
        f"1-min load {env['load_avg_1min']}) · device {env['device']} · torch {env['torch']}, "
        f"transformers {env['transformers']}, peft {env['peft']} · commit {env['git_commit'] or '?'}"
    )


# ---- reports -----------------------------------------------------------------------------------
def fmt(x: float | None, decimals: int | None = None) -> str:
    """A number for a table: `decimals` fixed decimals, or by default 3 significant digits
    (scientific notation for tiny or huge values); "—" for a missing value."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if decimals is not None:
        return f"{x:.{decimals}f}"
    if x == 0:
        return "0"
    if abs(x) >= 1e5 or abs(x) < 1e-3:
        return f"{x:.2e}"
    return f"{x:.3g}"


def dur(seconds: float) -> str:
    """A duration with its unit: µs, ms or s, 3 significant digits."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if abs(seconds) >= scale or unit == "µs":
            return f"{seconds / scale:.3g} {unit}"
    return ""


def md_table(header: list[str], rows: list[list]) -> str:
    """A GitHub-markdown table; '|' inside a cell (as in |Δ logit|) is escaped."""
    cell = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Target:
    """One claim of the issue, checked against this run's numbers."""

    name: str
    met: bool
    detail: str

    def line(self) -> str:
        return f"- {self.name}: **{'MET' if self.met else 'NOT MET'}** — {self.detail}"


def write_report(
    out: Path,
    name: str,
    title: str,
    intro: str,
    sections: list[str],
    targets: list[Target],
    results: dict,
    env: dict,
    wall_s: float,
    quick: bool,
) -> Path:
    """bench results: <out>/<name>.json (every number) and <out>/<name>.md (the tables, the
    verdict on each target, the machine). Returns the .md path."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "quick": quick,
        "wall_s": round(wall_s, 2),
        "environment": env,
        "targets": [asdict(t) for t in targets],
        "results": results,
    }
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1, default=_jsonable) + "\n")
    parts = [f"## {title}{' (quick smoke run)' if quick else ''}", "", intro, ""]
    for s in sections:
        parts += [s, ""]
    if targets:
        parts += ["**Targets**", "", *[t.line() for t in targets], ""]
    parts += [
        f"_Wall time {wall_s:.0f} s. {env_line(env)}; 1-min load at the end {os.getloadavg()[0]:.2f}. Command: "
        f"`{env['command']}`._",
        "",
    ]
    md = out / f"{name}.md"
    md.write_text("\n".join(parts))
    print("\n".join(parts))
    return md


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if hasattr(x, "__dataclass_fields__"):
        return asdict(x)
    return str(x)


# ---- synthetic factors with Share's structure ------------------------------------------------
def orthonormal(m: int, k: int, g: torch.Generator) -> torch.Tensor:
    """m×k with orthonormal columns (float64)."""
    return torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]


def shared_factors(
    n: int, d: int, tasks: int, rank: int, dim: int, noise: float, seed: int, dtype: torch.dtype = torch.float32
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`tasks` LoRA factor pairs (B n×r, Aᵀ d×r) whose updates live in shared `dim`-dim
    subspaces (one per side), each factor with relative Frobenius noise `noise` added.

    Every task gets a random gauge G (r×r, condition ≤ 4): B = U C G, Aᵀ = V D G⁻ᵀ, so
    ΔW = B A is unchanged but the factors themselves are rotated, as two trainings of the same
    LoRA would be. A basis that only works for gauge-aligned factors fails here.
    """
    g = torch.Generator().manual_seed(seed)
    u, v = orthonormal(n, dim, g), orthonormal(d, dim, g)
    out = []
    for _ in range(tasks):
        q = orthonormal(rank, rank, g)
        s = torch.empty(rank, dtype=torch.float64).uniform_(0.5, 2.0, generator=g)
        b = u @ torch.randn(dim, rank, generator=g, dtype=torch.float64) @ (q * s)
        a = v @ torch.randn(dim, rank, generator=g, dtype=torch.float64) @ (q / s)
        b, a = _noisy(b, noise, g), _noisy(a, noise, g)
        out.append((b.to(dtype), a.to(dtype)))
    return out


def _noisy(x: torch.Tensor, rel: float, g: torch.Generator) -> torch.Tensor:
    if rel == 0:
        return x
    e = torch.randn(x.shape, generator=g, dtype=x.dtype)
    return x + e * (rel * x.norm() / e.norm())


def minilm_layers(model: torch.nn.Module, targets: list[str]) -> dict[str, tuple[int, int]]:
    """{module path: (n_out, d_in)} of the model's Linears that PEFT would target."""
    return {
        name: (m.out_features, m.in_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)
    }


def synthetic_adapters(
    model: torch.nn.Module,
    tasks: int,
    *,
    targets: list[str],
    heads: list[str],
    base_model_id: str,
    rank: int = 8,
    lora_alpha: float = 16.0,
    dim: int = 24,
    noise: float = 0.05,
    num_labels: int = 2,
    rel_update: float = 0.05,
    seed: int = 0,
) -> list:
    """`tasks` LoraAdapters for `model` without training: factors from `shared_factors` per
    layer, scaled so each ‖ΔW‖_F is `rel_update`·‖W0‖_F (a visible but plausible update), and a
    random classifier head per task (so tasks give different outputs)."""
    from share_core.peft_io import LoraAdapter

    layers = minilm_layers(model, targets)
    per_layer = {
        ln: shared_factors(n, d, tasks, rank, dim, noise, seed + 101 * i)
        for i, (ln, (n, d)) in enumerate(sorted(layers.items()))
    }
    g = torch.Generator().manual_seed(seed)
    hidden = model.get_submodule(heads[0]).in_features
    scale = lora_alpha / rank
    out = []
    for t in range(tasks):
        factors = {}
        for ln, fs in per_layer.items():
            b, a = fs[t]
            w0 = model.get_submodule(ln).weight.detach().float().norm()
            c = math.sqrt(float(rel_update * w0 / (scale * (b @ a.T).norm())))
            factors[ln] = ((b * c).contiguous(), (a * c).T.contiguous())  # B n×r, A r×d
        head = {
            f"{heads[0]}.weight": torch.randn(num_labels, hidden, generator=g) * 0.1,
            f"{heads[0]}.bias": torch.randn(num_labels, generator=g) * 0.1,
        }
        out.append(
            LoraAdapter(
                name=f"task{t:03d}",
                rank=rank,
                lora_alpha=lora_alpha,
                scale=scale,
                target_modules=list(targets),
                factors=factors,
                heads=head,
                modules_to_save=list(heads),
                base_model_name=base_model_id,
            )
        )
    return out
