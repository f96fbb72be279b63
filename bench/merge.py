"""Speed and accuracy of building and updating the subspace: share_core.subspace (ours) against
recomputing it from every task's factors, by a thin SVD of the n×(T·r) stack or, as the paper's
code does, by an eigendecomposition of the n×n covariance F Fᵀ (torch.linalg.eigh).

Ours never forms anything n×n or n×(T·r) when updating: a merge QRs the k+c columns
[basis, new] and SVDs the small coordinate matrix, so its cost is O(n(k+c)²) plus a per-task
coefficient update of O(T·r·(k+c)²) that does not depend on n. The recompute baselines redo
everything from the stack at every arrival (and need every task's factors kept around).

Factors have the structure the method assumes: T tasks' updates drawn from shared 24-dim
subspaces per side, each factor with 5 % relative noise and a random gauge rotation
(B G, Aᵀ G⁻ᵀ). Layers are n×d with n ∈ {384, 1024, 4096} on the B side and d = 384 (the
A side), r = 8, k = 32. All three methods compute in float64 from float32 factors.
Error = relative ΔW error over all tasks, sqrt(Σ_j ‖ΔW_j − ΔŴ_j‖²_F / Σ_j ‖ΔW_j‖²_F), against
the original factors (so a merge is charged for everything it truncated, now and before).

Single-threaded by default: a merge is a chain of small ops that extra threads only slow down
(wake-up latency); every contender gets the same core.

The 24-module target (issue 8 item 6) is measured at k = 16 (the peers' setup: 200 synthetic
adapters, r = 8, 24 modules, n = d = 384) and at this grid's k = 32: absorbing one adapter into
all 24 modules in one `merge_layers` call, absorbing 100 adapters at once, and building from the
200 adapters, each build contender in a fresh process of its own (same factors, same threads)
so that its time and peak RSS (VmHWM reset before the build) are its own: ours, a float32
centred-covariance eigendecomposition as lorashare 0.1.3's compression.py does it, the float64
covariance eigendecomposition (the paper code's route) and the float64 thin SVD. `--tasks N` runs
the absorb and the build at N tasks instead of 200.
"""

from __future__ import annotations

import math
import multiprocessing
import statistics
import time
from pathlib import Path

import torch

from share_core import subspace as S

from .common import (
    Target,
    Timing,
    dur,
    environment,
    fmt,
    md_table,
    parse_args,
    rss_bytes,
    shared_factors,
    time_adaptive,
    time_interleaved,
    write_report,
)

R, K, PHI, DIM, NOISE, D_IN = 8, 32, 2, 24, 0.05, 384
EIGH_ALL_T_MAX_N = 1024  # above this n the n×n eigh (minutes, independent of T) runs at the largest T only

Factors = list[tuple[torch.Tensor, torch.Tensor]]  # per task (B n×r, Aᵀ d×r)


# ---- the recompute baselines ------------------------------------------------------------------
def _stack(fs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([f.double() for f in fs], dim=1)


def top_k_svd(fs: list[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Basis U (m×k): top-k left singular vectors of the m×(T·r) stack; coefficients Uᵀ·stack (k×T·r)."""
    stack = _stack(fs)
    u = torch.linalg.svd(stack, full_matrices=False)[0][:, :k]
    return u, u.T @ stack


def top_k_eigh(fs: list[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """As top_k_svd via the m×m covariance F Fᵀ and torch.linalg.eigh (the paper code's route)."""
    stack = _stack(fs)
    _, v = torch.linalg.eigh(stack @ stack.T)
    u = v[:, -k:].flip(1)
    return u, u.T @ stack


def recompute(method, factors: Factors, k: int = K) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(β n×k, coefficients k×T·r, α d×k, coefficients k×T·r) from scratch, both sides."""
    b, eb = method([f for f, _ in factors], k)
    a, ea = method([f for _, f in factors], k)
    return b, eb, a, ea


# ---- reconstruction error ---------------------------------------------------------------------
def _pair_grams(orig: list[torch.Tensor], basis: torch.Tensor, coefs: torch.Tensor, sign: float) -> torch.Tensor:
    """Per task the Gram matrix of [F_j, sign·U E_j] (T×2r×2r); orig F_j: m×r, coefs k×T·r."""
    x, y = _stack(orig), sign * (basis.double() @ coefs.double())
    m, t, r = x.shape[0], len(orig), orig[0].shape[1]
    z = torch.cat([x.view(m, t, r), y.view(m, t, r)], dim=2)
    return torch.einsum("mtr,mts->trs", z, z)


def delta_errors(factors: Factors, basis_b, coefs_b, basis_a, coefs_a) -> tuple[torch.Tensor, torch.Tensor]:
    """Per task (‖ΔW_j − ΔŴ_j‖², ‖ΔW_j‖²) with ΔW_j = B_j A_j, ΔŴ_j = (βE_B,j)(αE_A,j)ᵀ, from r×r
    Grams only (‖PQᵀ‖² = Σ (PᵀP)∘(QᵀQ) with P = [B, B̂], Q = [Aᵀ, −Â]): nothing n×d is formed."""
    gp = _pair_grams([f for f, _ in factors], basis_b, coefs_b, 1.0)
    gq = _pair_grams([f for _, f in factors], basis_a, coefs_a, -1.0)
    r = factors[0][0].shape[1]
    return (gp * gq).sum((1, 2)), (gp[:, :r, :r] * gq[:, :r, :r]).sum((1, 2))


def rel(err2: torch.Tensor, ref2: torch.Tensor) -> float:
    return math.sqrt(float(err2.sum().clamp_min(0) / ref2.sum()))


def fold_error(factors: Factors, f: S.Fold) -> float:
    return rel(*delta_errors(factors, f.basis_b, torch.cat(f.coefs_b, 1), f.basis_a, torch.cat(f.coefs_a, 1)))


# ---- one grid cell ----------------------------------------------------------------------------
def trained_task(state: S.Fold, n: int, seed: int) -> tuple[torch.Tensor, ...]:
    """What training a new task leaves in each layer: φ temporary directions per side (n×φ,
    d×φ) and factors B̂ = βE + dirs·t (n×r), Â likewise (d×r), at the scale of the others."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for basis, m in ((state.basis_b, n), (state.basis_a, D_IN)):
        dirs = torch.randn(m, PHI, generator=g) / math.sqrt(m)
        f = basis @ torch.randn(basis.shape[1], R, generator=g) + dirs @ torch.randn(PHI, R, generator=g)
        ref = state.coefs_b[0] if basis is state.basis_b else state.coefs_a[0]
        out += [dirs, f * (ref.norm() / f.norm())]
    return out[0], out[2], out[1], out[3]


def cell(fs: Factors, n: int, t: int, with_eigh: bool) -> tuple[dict, dict]:
    """Build from T+1 adapters, absorb the (T+1)-th into a subspace of T, merge a trained task
    into it; the recomputes over T+1 tasks. Returns (times in s and ΔW errors, {"absorb": fn,
    "merge": fn}): the two fast updates are timed later, interleaved across T (see main)."""
    policy = S.KPolicy(k_max=K)
    old, new, everything = fs[:t], fs[t], fs[: t + 1]
    res: dict = {"n": n, "T": t}
    tm, built = time_adaptive(lambda: S.build([b for b, _ in everything], [a for _, a in everything], policy))
    res["build"] = {"time": tm, "error": fold_error(everything, built)}
    state = S.build([b for b, _ in old], [a for _, a in old], policy)
    (nb, na), (db, da, tb, ta) = new, trained_task(state, n, seed=t)
    updates = {
        "absorb": lambda: S.merge(
            state.basis_b, state.basis_a, state.coefs_b, state.coefs_a, nb, na, [nb], [na], policy
        ),
        "merge": lambda: S.merge(
            state.basis_b, state.basis_a, state.coefs_b, state.coefs_a, db, da, [tb], [ta], policy
        ),
    }
    res["absorb"] = {"error": fold_error(everything, updates["absorb"]())}
    res["merge"] = {"new_task_error": updates["merge"]().errors[-1]}
    for name, method, run in (("svd", top_k_svd, True), ("eigh", top_k_eigh, with_eigh)):
        if run:
            tm, (b, eb, a, ea) = time_adaptive(lambda: recompute(method, everything))
            res[name] = {"time": tm, "error": rel(*delta_errors(everything, b, eb, a, ea))}
    print(
        f"n={n} T={t}: "
        + ", ".join(f"{k} {v['time'].median:.4f}s" for k, v in res.items() if isinstance(v, dict) and "time" in v),
        flush=True,
    )
    return res, updates


def time_updates(cells: list[tuple[dict, dict]], repeats: int = 9) -> None:
    """Time absorb and merge for every T of one n, interleaved, so that a load spike (or a
    first-use cost) on the shared machine cannot masquerade as a dependence on T."""
    for op in ("absorb", "merge"):
        times = time_interleaved({str(res["T"]): fns[op] for res, fns in cells}, repeats, warmup=2)
        for res, _ in cells:
            res[op]["time"] = times[str(res["T"])]


# ---- the 24-module target ---------------------------------------------------------------------
def _aggregate(errors: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    return rel(torch.cat([e for e, _ in errors]), torch.cat([r for _, r in errors]))


def cpu_interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict[str, tuple[Timing, Timing]]:
    """(wall, CPU) seconds per call of each fn, rounds interleaved as in `time_interleaved`. With
    one torch thread the CPU time is the call's own work; wall time adds whatever the other jobs
    on these shared cores take from it."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0, c0 = time.perf_counter(), time.thread_time()
            fns[name]()
            cpu[name].append(time.thread_time() - c0)
            wall[name].append(time.perf_counter() - t0)
    return {name: (Timing.of(wall[name]), Timing.of(cpu[name])) for name in names}


def many_modules(n: int, tasks: int, modules: int, k: int, batch: int) -> dict:
    """Absorb one adapter into `tasks` tasks in each of `modules` independent n×n layers (both
    sides, one `merge_layers` call), against a full SVD recompute of every layer; then `batch`
    adapters at once. Total time and aggregate ΔW error of each."""
    policy = S.KPolicy(k_max=k)
    layers = [shared_factors(n, n, tasks + batch, R, DIM, NOISE, seed=1000 + i) for i in range(modules)]
    states = [S.build([b for b, _ in fs[:tasks]], [a for _, a in fs[:tasks]], policy) for fs in layers]

    def absorb(first: int, count: int, side_by_side: bool):
        items = []
        for s, fs in zip(states, layers):
            nb, na = [b for b, _ in fs[first : first + count]], [a for _, a in fs[first : first + count]]
            old = (s.side_by_side_b, s.side_by_side_a) if side_by_side else (s.coefs_b, s.coefs_a)
            items.append((s.basis_b, s.basis_a, *old, torch.cat(nb, 1), torch.cat(na, 1), nb, na))
        return S.merge_layers(items, policy)

    res = {"n": n, "tasks": tasks, "modules": modules, "k": k, "batch": batch}
    for name, count in (("one", 1), ("batch", batch)):
        everything = [fs[: tasks + count] for fs in layers]
        times = cpu_interleaved(
            {"side_by_side": lambda: absorb(tasks, count, True), "lists": lambda: absorb(tasks, count, False)},
            repeats=15 if count == 1 else 3,
            warmup=2 if count == 1 else 1,
        )
        folds = absorb(tasks, count, True)
        t_full, full = time_adaptive(lambda: [recompute(top_k_svd, fs, k) for fs in everything], budget_s=0.0)
        e_ours = [delta_errors(fs, f.basis_b, f.stacked_b, f.basis_a, f.stacked_a) for fs, f in zip(everything, folds)]
        e_full = [delta_errors(fs, *bases) for fs, bases in zip(everything, full)]
        res[name] = {
            "ours": times["side_by_side"][1],
            "ours_wall": times["side_by_side"][0],
            "ours_lists": times["lists"][1],
            "full_svd": t_full,
            "error_ours": _aggregate(e_ours),
            "error_full": _aggregate(e_full),
            "adapters": count,
        }
    # the batch against absorbing the same adapters one merge at a time (a version each)
    t0, current = time.perf_counter(), states
    for j in range(tasks, tasks + batch):
        current = S.merge_layers(
            [
                (f.basis_b, f.basis_a, f.side_by_side_b, f.side_by_side_a, fs[j][0], fs[j][1], [fs[j][0]], [fs[j][1]])
                for f, fs in zip(current, layers)
            ],
            policy,
        )
    res["batch"]["one_at_a_time_s"] = time.perf_counter() - t0
    res["batch"]["error_one_at_a_time"] = _aggregate(
        [delta_errors(fs, f.basis_b, f.stacked_b, f.basis_a, f.stacked_a) for fs, f in zip(layers, current)]
    )
    return res


# ---- building from adapters, each contender in its own process --------------------------------
def lorashare_style(fs: list[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """As lorashare 0.1.3's compression.py: float32 stack (m×T·r), centred, covariance X Xᵀ,
    torch.linalg.eigh, the top-k eigenvectors; coefficients = Uᵀ·stack (lorashare projects each
    adapter the same way)."""
    stack = torch.cat([f.float() for f in fs], dim=1)
    centred = stack - stack.mean(dim=1, keepdim=True)
    _, v = torch.linalg.eigh(centred @ centred.T)
    u = v[:, -k:].flip(1)
    return u, u.T @ stack


def _ours(fs: Factors, k: int):
    f = S.build([b for b, _ in fs], [a for _, a in fs], S.KPolicy(k_max=k))
    return f.basis_b, f.stacked_b, f.basis_a, f.stacked_a


BUILDERS = {
    "ours": _ours,
    "lorashare (float32 centred covariance + eigh)": lambda fs, k: recompute(lorashare_style, fs, k),
    "float64 covariance + eigh (paper code)": lambda fs, k: recompute(top_k_eigh, fs, k),
    "float64 thin SVD": lambda fs, k: recompute(top_k_svd, fs, k),
}


def _status_kib(field: str) -> int | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def _build_child(name: str, n: int, tasks: int, modules: int, k: int, threads: int, runs: int, conn) -> None:
    """One contender in a fresh process: generate the factors, then build every module `runs`
    times. Peak RSS is VmHWM over the first (cold) build, reset to the current RSS just before it
    (/proc/self/clear_refs), so it is what the build itself adds on top of the loaded factors."""
    torch.set_num_threads(threads)
    layers = [shared_factors(n, n, tasks, R, DIM, NOISE, seed=1000 + i) for i in range(modules)]
    rss_before = rss_bytes()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    times, cpu, built, warm = [], [], None, None
    for _ in range(runs):
        if times and reset:
            built = None
            rss_warm = rss_bytes()
            Path("/proc/self/clear_refs").write_text("5")
        t0, c0 = time.perf_counter(), time.process_time()
        built = [BUILDERS[name](fs, k) for fs in layers]
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if len(times) == 1:
            peak = (_status_kib("VmHWM") or 0) * 1024
        elif len(times) == 2 and reset:
            warm = (_status_kib("VmHWM") or 0) * 1024 - rss_warm
    errors = [delta_errors(fs, *b) for fs, b in zip(layers, built)]
    conn.send(
        {
            "times": times,
            "cpu": cpu,
            "rss_before": rss_before,
            "peak_rss": peak,
            "warm_adds": warm,
            "peak_reset": reset,
            "error": _aggregate(errors),
        }
    )
    conn.close()


def build_contest(n: int, tasks: int, modules: int, k: int, threads: int, rounds: int = 3, runs: int = 3) -> dict:
    """Every builder in `rounds` fresh processes (the contenders' order rotating per round): time
    = median over rounds of each process's median over its `runs` builds (the first one cold);
    peak RSS = the median over rounds of the cold build's peak."""
    ctx = multiprocessing.get_context("spawn")
    names, samples = list(BUILDERS), {name: [] for name in BUILDERS}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_build_child, args=(name, n, tasks, modules, k, threads, runs, send))
            proc.start()
            send.close()
            samples[name].append(recv.recv())
            proc.join()
            print(
                f"build {name}: {statistics.median(samples[name][-1]['times']):.3f} s (CPU "
                f"{statistics.median(samples[name][-1]['cpu']):.3f} s), peak RSS "
                f"{samples[name][-1]['peak_rss'] / 2**20:.0f} MiB",
                flush=True,
            )
    out = {}
    for name, rows in samples.items():
        out[name] = {
            "time": Timing.of([statistics.median(x["times"]) for x in rows]),
            "cpu": Timing.of([statistics.median(x["cpu"]) for x in rows]),
            "cold_time": statistics.median(x["times"][0] for x in rows),
            "peak_rss": statistics.median(x["peak_rss"] for x in rows),
            "rss_before": statistics.median(x["rss_before"] for x in rows),
            "peak_reset": all(x["peak_reset"] for x in rows),
            "warm_adds": statistics.median(x["warm_adds"] for x in rows)
            if all(x["warm_adds"] is not None for x in rows)
            else None,
            "error": rows[0]["error"],
        }
    return {"n": n, "tasks": tasks, "modules": modules, "k": k, "threads": threads, "contenders": out}


# ---- report -----------------------------------------------------------------------------------
def ms(tm) -> str:
    return dur(tm.median)


def ratio(a, b) -> str:
    return fmt(a.median / b.median) + "×" if a and b else "—"


def fit_line(ts: list[int], secs: list[float]) -> tuple[float, float]:
    """Least-squares time = a + b·T: (a seconds, b seconds per task)."""
    x = torch.tensor(ts, dtype=torch.float64)
    y = torch.tensor(secs, dtype=torch.float64)
    b = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    return float(y.mean()) - b * float(x.mean()), b


def report(cells: list[dict], mods: list[dict], builds: dict, args, env: dict, wall: float) -> None:
    get = lambda c, k: c.get(k, {}).get("time")  # noqa: E731
    t_abs = md_table(
        [
            "n",
            "T",
            "ours absorb",
            "SVD recompute",
            "eigh recompute",
            "SVD / ours",
            "eigh / ours",
            "error ours",
            "error SVD",
            "error eigh",
            "ours / SVD error",
        ],
        [
            [
                c["n"],
                c["T"],
                ms(c["absorb"]["time"]),
                ms(c["svd"]["time"]),
                ms(c["eigh"]["time"]) if "eigh" in c else "—",
                ratio(get(c, "svd"), get(c, "absorb")),
                ratio(get(c, "eigh"), get(c, "absorb")),
                fmt(c["absorb"]["error"]),
                fmt(c["svd"]["error"]),
                fmt(c["eigh"]["error"]) if "eigh" in c else "—",
                fmt(c["absorb"]["error"] / c["svd"]["error"], 4),
            ]
            for c in cells
        ],
    )
    t_build = md_table(
        ["n", "T+1", "ours build", "SVD", "eigh", "ours / SVD", "ours / eigh", "error ours", "error SVD"],
        [
            [
                c["n"],
                c["T"] + 1,
                ms(c["build"]["time"]),
                ms(c["svd"]["time"]),
                ms(c["eigh"]["time"]) if "eigh" in c else "—",
                ratio(get(c, "build"), get(c, "svd")),
                ratio(get(c, "build"), get(c, "eigh")),
                fmt(c["build"]["error"]),
                fmt(c["svd"]["error"]),
            ]
            for c in cells
        ],
    )
    t_merge = md_table(
        ["n", "T", "ours merge", "SVD recompute / ours", "new task's ΔW error"],
        [
            [
                c["n"],
                c["T"],
                ms(c["merge"]["time"]),
                ratio(get(c, "svd"), get(c, "merge")),
                fmt(c["merge"]["new_task_error"]),
            ]
            for c in cells
        ],
    )
    ns, ts = sorted({c["n"] for c in cells}), sorted({c["T"] for c in cells})
    fits, rows = {}, []
    for n in ns:
        secs = [next(c["absorb"]["time"].median for c in cells if c["n"] == n and c["T"] == t) for t in ts]
        fits[n] = fit_line(ts, secs)
        rows.append([n, *[dur(s) for s in secs], dur(fits[n][0]), dur(fits[n][1])])
    t_flat = md_table(["n", *[f"T={t}" for t in ts], "fit: fixed part", "fit: per task"], rows)
    slope_ratio = fits[ns[-1]][1] / fits[ns[0]][1]
    t_mods = md_table(
        [
            "k",
            "adapters absorbed",
            "modules",
            "n",
            "tasks",
            "ours, all modules (CPU)",
            "ours (wall)",
            "ours, old coefficients as per-task lists (CPU)",
            "full SVD recompute (wall)",
            "recompute / ours",
            "error ours",
            "error recompute",
            "ours / recompute error",
        ],
        [
            [
                m["k"],
                m[c]["adapters"],
                m["modules"],
                m["n"],
                m["tasks"],
                ms(m[c]["ours"]),
                ms(m[c]["ours_wall"]),
                ms(m[c]["ours_lists"]),
                ms(m[c]["full_svd"]),
                ratio(m[c]["full_svd"], m[c]["ours"]),
                fmt(m[c]["error_ours"]),
                fmt(m[c]["error_full"]),
                fmt(m[c]["error_ours"] / m[c]["error_full"], 4),
            ]
            for m in mods
            for c in ("one", "batch")
        ],
    )
    contenders = builds["contenders"]
    mib = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
    t_builds = md_table(
        [
            "builder",
            "CPU time (median)",
            "wall time (median)",
            "first (cold) build, wall",
            "peak RSS during the first build",
            "RSS before (factors loaded)",
            "first build adds",
            "a later build adds",
            "ΔW error",
        ],
        [
            [
                name,
                ms(c["cpu"]),
                ms(c["time"]),
                dur(c["cold_time"]),
                mib(c["peak_rss"]),
                mib(c["rss_before"]),
                mib(c["peak_rss"] - c["rss_before"]),
                mib(c["warm_adds"]) if c["warm_adds"] is not None else "—",
                fmt(c["error"]),
            ]
            for name, c in contenders.items()
        ],
    )
    ours = contenders["ours"]
    peers = {name: c for name, c in contenders.items() if name != "ours"}
    fastest = min(peers, key=lambda name: peers[name]["cpu"].median)
    leanest = min(peers, key=lambda name: peers[name]["peak_rss"])
    targets = []
    for m in mods:
        one, batch = m["one"], m["batch"]
        err_ratio = one["error_ours"] / one["error_full"]
        targets += [
            Target(
                f"k = {m['k']}: absorb one adapter into {m['tasks']} tasks × {m['modules']} modules at n = {m['n']} "
                "in ≤ 0.02 s",
                one["ours"].median <= 0.02,
                f"CPU {one['ours'].median:.4f} s (wall {one['ours_wall'].median:.4f} s) with the old coefficients "
                f"side by side as a fold returns them, CPU {one['ours_lists'].median:.4f} s from per-task lists "
                f"(full SVD recompute {one['full_svd'].median:.2f} s, {ratio(one['full_svd'], one['ours'])} ours)",
            ),
            Target(
                f"k = {m['k']}: … with ΔW error ≤ 1.01× a full recompute",
                err_ratio <= 1.01,
                f"{fmt(one['error_ours'])} vs {fmt(one['error_full'])} = {err_ratio:.4f}×",
            ),
            Target(
                f"k = {m['k']}: batch absorb of {batch['adapters']} adapters into one version, ΔW error ≤ absorbing "
                "them one version at a time",
                batch["error_ours"] <= batch["error_one_at_a_time"] * (1 + 1e-9),
                f"{batch['ours'].median:.3f} s for the batch vs {batch['one_at_a_time_s']:.2f} s one at a time; "
                f"error {fmt(batch['error_ours'])} vs "
                f"{fmt(batch['error_one_at_a_time'])} one at a time; a full recompute from every original factor "
                f"reaches {fmt(batch['error_full'])} "
                f"({batch['error_ours'] / batch['error_full']:.4f}×: the {m['tasks']} tasks were truncated to k "
                "before the batch arrived)",
            ),
        ]
    targets += [
        Target(
            f"build from {builds['tasks']} adapters × {builds['modules']} modules (n = {builds['n']}, k = "
            f"{builds['k']}) in ≤ the fastest peer's time",
            ours["cpu"].median <= peers[fastest]["cpu"].median,
            "CPU time (one thread each, so the work itself, whatever else shares the cores): ours "
            f"{ms(ours['cpu'])}, fastest peer {fastest} {ms(peers[fastest]['cpu'])} "
            f"({ours['cpu'].median / peers[fastest]['cpu'].median:.2f}×); wall {ms(ours['time'])} vs "
            f"{ms(peers[fastest]['time'])}",
        ),
        Target(
            "… at ≤ the leanest peer's peak memory (whole-process peak RSS over the first build in a fresh process)",
            ours["peak_rss"] <= peers[leanest]["peak_rss"],
            f"ours {mib(ours['peak_rss'])} (+{mib(ours['peak_rss'] - ours['rss_before'])} over the loaded factors), "
            f"leanest peer {leanest} {mib(peers[leanest]['peak_rss'])} "
            f"(+{mib(peers[leanest]['peak_rss'] - peers[leanest]['rss_before'])}); a later build in the same process "
            "adds "
            + (
                f"{mib(ours['warm_adds'])} (ours) vs {mib(peers[leanest]['warm_adds'])}"
                if ours["warm_adds"] is not None and peers[leanest]["warm_adds"] is not None
                else "—"
            ),
        ),
        Target(
            "merge cost flat in T apart from the coefficient update (per-task cost independent of n: slope at the "
            "largest n ≤ 1.5× slope at the smallest)",
            0 < slope_ratio <= 1.5,
            f"per-task slope {fmt(fits[ns[0]][1] * 1e6)} µs at n={ns[0]}, {fmt(fits[ns[-1]][1] * 1e6)} µs at "
            f"n={ns[-1]} ({slope_ratio:.2f}×)",
        ),
    ]
    intro = (
        f"r = {R}, k = {K}, φ = {PHI}; B side n×(T·r), A side d = {D_IN}; factors from shared {DIM}-dim subspaces + "
        f"{NOISE:.0%} noise, random gauges; "
        f"float64 compute, {env['torch_threads']} torch thread(s). Ours = `share_core.subspace.build` / `merge`. "
        "Times are medians "
        "(absorb and merge: 9 rounds interleaved across T after 2 warm-ups; other fast calls repeated up to 9×, "
        "calls over 0.5 s run once); "
        "compare them within this run only: small-op code like a merge slows down far more than big LAPACK calls "
        "when other jobs share the cores. "
        f"The eigh recompute (n×n covariance) runs at every T for n ≤ {EIGH_ALL_T_MAX_N} and at the largest T "
        "otherwise (its n×n eigendecomposition does not depend on T). "
        "Errors: relative ΔW error over all tasks against the original factors."
    )
    build_intro = (
        f"**Build from {builds['tasks']} adapters × {builds['modules']} modules** (n = d = {builds['n']}, r = {R}, k "
        f"= {builds['k']}; {builds['threads']} torch thread(s)): "
        "each builder in a fresh process (rounds with the order rotating); times = median over processes of each "
        "one's median build "
        "(CPU time of the process: with one thread that is the build's own work, unlike wall time on cores shared "
        "with other jobs); "
        "peak RSS = VmHWM over the process's first build, reset just before it (the first build also pays each "
        "library routine's first use); "
        "'a later build adds' = VmHWM over the second build minus the RSS before it (its results from the first "
        "build dropped)"
        + ("" if all(c["peak_reset"] for c in contenders.values()) else " (reset refused here: whole-process peak)")
        + ". lorashare centres the stack, so its ΔW error is its own; the others are the same truncated SVD."
    )
    sections = [
        "**Absorb one adapter into T tasks (T → T+1), against recomputing the subspace from all T+1 factors**",
        t_abs,
        "**Build from T+1 adapters** (the recompute baselines are exactly this computation)",
        t_build,
        f"**Merge after training a task** (new task in [basis, φ = {PHI} temporary directions]; the recompute costs "
        "as in the absorb table)",
        t_merge,
        "**Absorb time against T** (ours): a fixed part that grows with n, plus a per-task coefficient update that "
        "should not",
        t_flat,
        f"**The target case: {mods[0]['modules']} independent modules**, n = d = {mods[0]['n']}, {mods[0]['tasks']} "
        f"tasks; one adapter, then {mods[0]['batch']['adapters']} at once, "
        "absorbed into every module by one `merge_layers` call (modules of equal shapes batched). Medians of 15 "
        "interleaved rounds (3 for the batch); "
        "CPU time of the one torch thread is the call's own work, wall time adds what other jobs on these shared "
        "cores take",
        t_mods,
        build_intro,
        t_builds,
    ]
    results = {
        "cells": cells,
        "modules": mods,
        "builds": builds,
        "fits_s": {str(n): {"fixed": a, "per_task": b} for n, (a, b) in fits.items()},
    }
    write_report(
        args.out,
        "merge",
        "Merge: build, absorb and merge against full recomputes",
        intro,
        sections,
        targets,
        results,
        env,
        wall,
        args.quick,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(
        __doc__.split("\n")[0],
        argv,
        threads=1,
        extra=lambda p: p.add_argument(
            "--tasks", type=int, default=200, help="tasks in the 24-module absorb and the build contest (default 200)"
        ),
    )
    t0 = time.perf_counter()
    env = environment(torch.device("cpu"))
    grid_n, grid_t = ((64, 128), (4, 12)) if args.quick else ((384, 1024, 4096), (10, 100, 500))
    cells = []
    for n in grid_n:
        fs = shared_factors(n, D_IN, max(grid_t) + 1, R, DIM, NOISE, seed=n)
        row = [cell(fs, n, t, with_eigh=n <= EIGH_ALL_T_MAX_N or t == max(grid_t)) for t in grid_t]
        time_updates(row)
        cells += [res for res, _ in row]
    if args.quick:
        mods = [many_modules(64, 20, 4, k, 10) for k in (8, 16)]
        builds = build_contest(64, 20, 4, 8, args.threads or 1, rounds=1, runs=2)
    else:
        mods = [many_modules(384, args.tasks, 24, k, 100) for k in (16, 32)]
        builds = build_contest(384, args.tasks, 24, 16, args.threads or 1, rounds=5)
    report(cells, mods, builds, args, env, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
