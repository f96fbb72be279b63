"""Scale: what one landing costs after T tasks of history, through the real chain, in two regimes.

- exact: T synthetic adapter landings in one shared 16-dim subspace per layer (k_max 32): every
  merge is exact and every old task is certified unchanged (the regime in which a landing's cost
  must not depend on the history).
- saturated: trained-like adapters — the shared part plus a private part of the same size per
  task (`synthetic.shared_subspace_adapters(private=1.0)`), so the union needs far more than
  k_max 32 and every merge truncates, moving every old task's ΔW by ~6 %: old tasks are
  checked per row (pipelines.evaluate: certified rows, re-scored rows, a seeded screen).

For each regime and T a fresh process grows a workspace to T tasks in one version (the
`batch-absorb` flow: one merge, one evaluation of everything), then lands adapters one by one
with `continual-update` (local-directory bucket → validate → ingest → absorb → DVC
stage → evaluate → MLflow run + model version → HEAD → `dvc push`), on the embedded stack
(Prefect ephemeral server, sqlite MLflow, DVC with a local remote). Per landing: wall and
process CPU seconds (this process plus its finished children: git, dvc), by part; the version
loads (count, CPU; a landing should load once: the parent, the evaluation reuses the built
model); the evaluation's CPU; tasks and rows re-scored; peak RSS (sampled every 20 ms, the
grow's freed heap handed back first); bytes the landing added on disk (workspace, DVC cache
and remote, MLflow, bucket; a hard-linked file counted once). In the saturated regime every
audited landing's version is also re-scored in full (the scheduled re-evaluation), timed beside
the landing's evaluation, and compared: a task
whose recorded score is above its full re-score by more than the gate tolerance is a missed
drop. In the exact regime the last version is re-scored in full and timed against one bare
mixed-task forward over the same rows (T ≤ 300).

Targets: exact regime, per-landing CPU at the largest T ≤ 1.5× T = 10, peak RSS ≤ 1.3×, bytes ≤
1.5×; a version load at the largest T ≤ 1 s CPU; saturated regime at T = 300, evaluation per
landing ≤ 0.2× a full re-score and no missed drop over ≥ 20 landings. `--quick`: T = 5, 20;
default T = 10, 100, 300; `--full`: adds T = 1,000.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .common import Target, environment, fmt, md_table, parse_args, time_interleaved, write_report


def disk_bytes(root: Path) -> int:
    """Bytes of every file under `root`, a hard-linked inode counted once."""
    seen, total = set(), 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            try:
                st = os.lstat(os.path.join(dirpath, f))
            except FileNotFoundError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


class PeakRss:
    """The largest RSS of this process while the block runs (sampled every 20 ms)."""

    def __enter__(self):
        import psutil

        self._proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(0.02)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


SIZES = {"quick": [5, 20], "default": [10, 100, 300], "full": [10, 100, 300, 1000]}
PARTS = ["train", "stage", "evaluate", "register", "push"]
REGIMES = {"exact": 0.0, "saturated": 1.0}  # the adapters' private part (synthetic.shared_subspace_adapters)
AUDIT_T = 300  # the saturated T whose landings are all audited against a full re-score
TOLERANCE = 0.01  # the forgetting gate's tolerance (flows' default): a drop beyond it must not be missed


def write_adapter_landings(dest: Path, tmp: Path, model_path: str | None, count: int, eval_rows: int, regime: str):
    """`count` adapter landings task0000… in `dest` (rank 8, in one 16-dim subspace per layer plus
    the regime's private part), each with a sentiment eval set of `eval_rows`; their names."""
    from share_core.base import BaseSpec, load_base
    from share_core.synthetic import shared_subspace_adapters, write_landing
    from share_core.tasks import generate_tasks

    template = generate_tasks(tmp / "template", names=["sentiment"], n_train=4, n_eval=eval_rows)[0]
    base = BaseSpec(model_path=model_path)
    model, _ = load_base(base)
    names = [f"task{i:04d}" for i in range(count)]
    adapters = shared_subspace_adapters(
        model,
        names,
        2,
        targets=base.targets(),
        heads=base.heads(),
        base_model_id=base.model_id,
        rank=8,
        dim=16,
        private=REGIMES[regime],
    )
    for a in adapters:
        write_landing(dest, a, template)
    return names


def release_freed_memory() -> None:
    """Collect garbage and hand the freed heap back to the OS (glibc `malloc_trim`): growing the
    history (T adapters read, merged and scored in this process) leaves a high-water heap that
    RSS would otherwise report during every later landing, though no landing holds or needs it."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS keeps the high-water mark
        pass


def cpu_s() -> float:
    """CPU seconds of this process and of its children that have finished (git, dvc)."""
    import resource

    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + c.ru_utime + c.ru_stime


class Meter:
    """Wall and CPU seconds (and calls) of a module-level function, accumulated while it is patched in."""

    def __init__(self, module, name: str) -> None:
        self.module, self.name, self.fn = module, name, getattr(module, name)
        self.calls, self.wall, self.cpu = 0, 0.0, 0.0

        def timed(*a, **kw):
            w, c = time.perf_counter(), time.process_time()
            try:
                return self.fn(*a, **kw)
            finally:
                self.calls += 1
                self.wall += time.perf_counter() - w
                self.cpu += time.process_time() - c

        setattr(module, name, timed)

    def take(self) -> dict:
        out = {"calls": self.calls, "wall_s": self.wall, "cpu_s": self.cpu}
        self.calls, self.wall, self.cpu = 0, 0.0, 0.0
        return out


def run_one(tasks: int, landings: int, eval_rows: int, model_path: str | None, regime: str, audit: bool) -> dict:
    """Grow a workspace to `tasks` tasks, then land `landings` adapters one by one (each audited
    against a full re-score when `audit`)."""
    tmp = Path(tempfile.mkdtemp(prefix=f"share-bench-scale-{regime}-{tasks}-"))
    os.environ["PREFECT_HOME"] = str(tmp / "prefect")
    for k, v in {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "DVC_NO_ANALYTICS": "1",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    }.items():
        os.environ.setdefault(k, v)
    import torch

    import flows.continual as fc
    from pipelines import evaluate as ev
    from pipelines import lineage
    from pipelines.params import edit_params, load_params
    from pipelines.storage import LocalStorage
    from pipelines.workspace import Workspace
    from share_core import state as st

    ws = Workspace(tmp / "ws")
    lineage.init_workspace(ws.root, remote=str(tmp / "dvc-remote"))
    edit_params(ws.params_path, base={"model_path": model_path})
    src, storage = tmp / "landings-src", LocalStorage(tmp / "bucket")
    names = write_adapter_landings(src, tmp, model_path, tasks + landings, eval_rows, regime)
    for n in names[:tasks]:
        storage.upload_task(src / n, "adapter", n)

    t0, c0 = time.perf_counter(), cpu_s()
    grown = fc.batch_absorb(storage_url=storage.describe(), workspace=str(ws.root))
    grow = {"wall_s": time.perf_counter() - t0, "cpu_s": cpu_s() - c0}
    release_freed_memory()  # the grow's garbage is not the landings' memory
    assert grown["version"] == "v0001" and len(grown["absorbed"]) == tasks, grown
    cfg = load_params(ws.params_path).evaluate

    loads, evals = Meter(st, "load"), Meter(fc, "evaluate_all")  # looked up at call time by their callers
    disk_loads = ev.loads()
    per = []
    for n in names[tasks:]:
        before = disk_bytes(tmp)
        storage.upload_task(src / n, "adapter", n)
        uploaded = disk_bytes(tmp) - before
        loads.take(), evals.take()
        with PeakRss() as rss:
            t0, c0 = time.perf_counter(), cpu_s()
            out = fc.continual_update(
                key=f"incoming/adapters/{n}/task.yaml", storage_url=storage.describe(), workspace=str(ws.root)
            )
            wall, cpu = time.perf_counter() - t0, cpu_s() - c0
        assert out["status"] == "processed", out
        version = out["version"]
        rec = ev.read_record(ws, version)
        manifest = st.read_manifest(ws.version_dir(version))
        moved = manifest.reconstruction_error
        row = {
            "version": version,
            "wall_s": wall,
            "cpu_s": cpu,
            "parts_s": {p: out["seconds"][p] for p in PARTS},
            "load": loads.take(),
            "evaluation": evals.take(),
            "evaluation_loads": ev.loads() - disk_loads,
            "peak_rss": rss.peak,
            "threads": threading.active_count(),
            "bytes": disk_bytes(tmp) - before - uploaded,
            "rescored": len(rec.rescored),
            "rows_rescored": rec.rows_rescored,
            "checks": rec.checks,
            "old_task_drift_median": statistics.median([v for k, v in moved.items() if k != n] or [0.0]),
        }
        disk_loads = ev.loads()
        if audit:  # the same version re-scored in full, as the scheduled re-evaluation does
            t0, c0 = time.perf_counter(), time.process_time()
            fresh = fc.score(str(ws.root), version, rec.tasks, cfg)
            full = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
            audit_rec = ev.compare(rec, fresh, 1e-9)
            missed = sorted(
                t
                for t, d in audit_rec["disagreements"].items()
                if d["recorded"] - d["now"] > TOLERANCE  # the record claims more than the model does
            )
            row["audit"] = {
                "full": full,
                "rows": sum(len(r["rows"]["value"]) for r in fresh if r.get("rows")),
                "disagreements": len(audit_rec["disagreements"]),
                "certificates_wrong": audit_rec["certificates_wrong"],
                "missed_drops": missed,
                "true_drops": sum(
                    1
                    for r in fresh
                    if r["score"] is not None
                    and rec.first_scores.get(r["task"]) is not None
                    and rec.first_scores[r["task"]] - r["score"] > TOLERANCE
                ),
            }
        per.append(row)

    result = {"regime": regime, "tasks": tasks, "grow": grow, "landings": per, "eval_rows_per_task": eval_rows}
    if regime == "exact" and tasks <= AUDIT_T:  # the scheduled full re-evaluation against one bare mixed forward
        version = ws.head()
        all_tasks = ev.read_record(ws, version).tasks
        manifest = st.read_manifest(ws.version_dir(version))
        share, tok, p = ev.loaded(str(ws.root), version, manifest.content_hash)
        rows = [(e.name, r["text"]) for e in manifest.tasks for r in ev.eval_data(ws, e).eval]

        def full() -> None:  # the whole evaluation path: read every task's data, batch, score, count
            fc.score(str(ws.root), version, all_tasks, cfg)

        @torch.no_grad()
        def bare() -> None:  # the same rows through the same loaded model, nothing else
            for i in range(0, len(rows), cfg.batch_size):
                b = rows[i : i + cfg.batch_size]
                enc = tok(
                    [r[1] for r in b],
                    padding=True,
                    truncation=True,
                    max_length=p.train.max_length,
                    return_tensors="pt",
                )
                share.forward_mixed([r[0] for r in b], **enc)

        timing = time_interleaved({"full": full, "bare": bare}, repeats=1, warmup=0)
        result.update(full_rescore_s=timing["full"].median, bare_forward_s=timing["bare"].median, eval_rows=len(rows))
    return result


def audit_run(tasks: int, landings: int, eval_rows: int, model_path: str | None) -> dict:
    """The saturated regime's evaluation against full re-scores, on the pipeline's steps in this
    process (build_version + evaluate_version: what the chain's build and evaluate steps run,
    without Prefect, DVC and MLflow around them): grow to `tasks` in one version, then
    `landings` adapter landings, each version's evaluation timed and then audited by a full
    re-score of the same version (same loaded model)."""
    from pipelines import evaluate as ev
    from pipelines.params import Params, load_params, save_params
    from pipelines.update import build_version
    from pipelines.workspace import Workspace

    tmp = Path(tempfile.mkdtemp(prefix=f"share-bench-scale-audit-{tasks}-"))
    ws = Workspace(tmp / "ws")
    ws.root.mkdir(parents=True)
    save_params(ws.params_path, Params().replace(base={"model_path": model_path}))
    params = load_params(ws.params_path)
    names = write_adapter_landings(ws.landings, tmp, model_path, tasks + landings, eval_rows, "saturated")
    t0, c0 = time.perf_counter(), time.process_time()
    build_version([ws.landings / n for n in names[:tasks]], "adapter", ws.version_dir("v0001"), None, params)
    ev.evaluate_version(ws, "v0001")
    grow = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
    per = []
    for i, n in enumerate(names[tasks:], start=2):
        version, parent = f"v{i:04d}", f"v{i - 1:04d}"
        t0, c0 = time.perf_counter(), time.process_time()
        manifest = build_version([ws.landings / n], "adapter", ws.version_dir(version), ws.version_dir(parent), params)
        build = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
        t0, c0 = time.perf_counter(), time.process_time()
        rec = ev.evaluate_version(ws, version)
        evaluation = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
        t0, c0 = time.perf_counter(), time.process_time()
        fresh = ev.score_tasks(ws, version, rec.tasks)
        full = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
        audit = ev.compare(rec, fresh, 1e-9)
        moved = manifest.reconstruction_error
        per.append(
            {
                "version": version,
                "build": build,
                "evaluation": evaluation,
                "full": full,
                "rows_rescored": rec.rows_rescored,
                "rows_full": sum(len(r["rows"]["value"]) for r in fresh if r.get("rows")),
                "checks": rec.checks,
                "old_task_drift_median": statistics.median([v for k, v in moved.items() if k != n]),
                "disagreements": len(audit["disagreements"]),
                "certificates_wrong": audit["certificates_wrong"],
                "missed_drops": sorted(
                    t for t, d in audit["disagreements"].items() if d["recorded"] - d["now"] > TOLERANCE
                ),
                "true_drops": sum(
                    1
                    for r in fresh
                    if r["score"] is not None
                    and rec.first_scores.get(r["task"]) is not None
                    and rec.first_scores[r["task"]] - r["score"] > TOLERANCE
                ),
            }
        )
        print(
            f"  audit {version}: evaluation {evaluation['cpu_s']:.2f} s CPU vs full {full['cpu_s']:.2f} s; rows "
            f"{rec.rows_rescored}/{per[-1]['rows_full']}; checks {rec.checks}; missed "
            f"{per[-1]['missed_drops']}",
            flush=True,
        )
    return {"tasks": tasks, "grow": grow, "landings": per, "eval_rows_per_task": eval_rows}


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def _summary(r: dict) -> dict:
    ls = r["landings"]
    s = {
        "wall_s": _median([x["wall_s"] for x in ls]),
        "cpu_s": _median([x["cpu_s"] for x in ls]),
        "evaluate_cpu_s": _median([x["evaluation"]["cpu_s"] for x in ls]),
        "evaluate_wall_s": _median([x["evaluation"]["wall_s"] for x in ls]),
        "load_cpu_s": _median([x["load"]["cpu_s"] for x in ls]),
        "loads": max(x["load"]["calls"] for x in ls),
        "evaluation_loads": max(x["evaluation_loads"] for x in ls),
        "peak_rss": max(x["peak_rss"] for x in ls),
        "bytes": _median([x["bytes"] for x in ls]),
        "threads": max(x["threads"] for x in ls),
        **{p: _median([x["parts_s"][p] for x in ls]) for p in PARTS},
        "rescored": _median([x["rescored"] for x in ls]),
        "rows_rescored": _median([x["rows_rescored"] for x in ls]),
        "drift": _median([x["old_task_drift_median"] for x in ls]),
        "grow_wall_s": r["grow"]["wall_s"],
        "grow_cpu_s": r["grow"]["cpu_s"],
    }
    audited = [x for x in ls if "audit" in x]
    if audited:
        s["audit"] = {
            "landings": len(audited),
            "evaluate_cpu_s": _median([x["evaluation"]["cpu_s"] for x in audited]),
            "evaluate_wall_s": _median([x["evaluation"]["wall_s"] for x in audited]),
            "full_cpu_s": _median([x["audit"]["full"]["cpu_s"] for x in audited]),
            "full_wall_s": _median([x["audit"]["full"]["wall_s"] for x in audited]),
            "rows_rescored": sum(x["rows_rescored"] or 0 for x in audited),
            "rows_full": sum(x["audit"]["rows"] for x in audited),
            "disagreements": sum(x["audit"]["disagreements"] for x in audited),
            "certificates_wrong": sum(len(x["audit"]["certificates_wrong"]) for x in audited),
            "missed_drops": sum(len(x["audit"]["missed_drops"]) for x in audited),
            "true_drops": sum(x["audit"]["true_drops"] for x in audited),
        }
    return s


def main(argv: list[str] | None = None) -> None:
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--one", type=int)
    pre.add_argument("--regime", choices=sorted(REGIMES), default="exact")
    pre.add_argument("--audit", action="store_true")
    pre.add_argument("--audit-run", action="store_true", help="child: the saturated audit on the pipeline steps")
    pre.add_argument("--sizes", default=None, help="comma-separated T (overrides --quick/--full)")
    pre.add_argument("--saturated-sizes", default=None, help="comma-separated T of the saturated regime's chain runs")
    pre.add_argument(
        "--report-only", action="store_true", help="with --keep: report the results kept there, run nothing more"
    )
    pre.add_argument("--full", action="store_true")
    pre.add_argument("--regimes", default="exact,saturated")
    pre.add_argument("--landings", type=int, default=None)
    pre.add_argument("--audit-landings", type=int, default=None)
    pre.add_argument("--eval-rows", type=int, default=None)
    pre.add_argument(
        "--model-path", default=None, help="a local Hugging Face classifier directory (default: the packaged MiniLM)"
    )
    pre.add_argument("--json", type=Path)
    pre.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="keep each child's result in this directory (<regime>-<T>.json, audit-<T>.json) and reuse the ones "
        "already there: a long run can be done in pieces and reported once",
    )
    known, rest = pre.parse_known_args(argv)
    args = parse_args(__doc__.splitlines()[0], rest)
    landings = known.landings or (2 if args.quick else 3)
    audit_landings = known.audit_landings or (3 if args.quick else 20)
    eval_rows = known.eval_rows or (8 if args.quick else 16)
    if known.one is not None and known.audit_run:  # the child: the saturated audit
        known.json.write_text(json.dumps(audit_run(known.one, audit_landings, eval_rows, known.model_path)))
        return
    if known.one is not None:  # the child: one regime and T, results as JSON
        known.json.write_text(
            json.dumps(run_one(known.one, landings, eval_rows, known.model_path, known.regime, known.audit))
        )
        return
    sizes = SIZES["quick" if args.quick else "full" if known.full else "default"]
    if known.sizes:
        sizes = [int(x) for x in known.sizes.split(",")]
    audit_t = sizes[-1] if args.quick else AUDIT_T
    regimes = known.regimes.split(",")
    if known.keep:
        known.keep.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    results: dict[str, list[dict]] = {g: [] for g in regimes}
    per_regime = {g: sizes for g in regimes}
    if known.saturated_sizes:
        per_regime["saturated"] = [int(x) for x in known.saturated_sizes.split(",")]
    for regime in regimes:
        for t in per_regime[regime]:  # one process per T: peak memory and threads are the landing's, not the history's
            out = known.keep / f"{regime}-{t}.json" if known.keep else Path(tempfile.mkstemp(suffix=".json")[1])
            if known.keep and out.is_file():
                results[regime].append(json.loads(out.read_text()))
                print(f"{regime} T = {t}: reused {out}", flush=True)
                continue
            if known.report_only:
                print(f"{regime} T = {t}: not run (no {out})", flush=True)
                continue
            audit = regime == "saturated" and t <= AUDIT_T  # a full re-score after each chain landing
            cmd = [
                sys.executable,
                "-m",
                "bench.scale",
                "--one",
                str(t),
                "--regime",
                regime,
                "--landings",
                str(landings),
            ]
            cmd += ["--eval-rows", str(eval_rows), "--json", str(out)]
            cmd += ["--audit"] if audit else []
            cmd += ["--model-path", known.model_path] if known.model_path else []
            cmd += ["--threads", str(args.threads)] if args.threads else []
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True)
            results[regime].append(json.loads(out.read_text()))
            r = results[regime][-1]
            print(
                f"{regime} T = {t}: {time.perf_counter() - t0:.0f} s; median landing "
                f"{_median([x['wall_s'] for x in r['landings']]):.1f} s wall, "
                f"{_median([x['cpu_s'] for x in r['landings']]):.1f} s CPU",
                flush=True,
            )

    audit_result = None
    kept_audit = known.keep / f"audit-{audit_t}.json" if known.keep else None
    if known.report_only:  # only what was kept
        per_regime = {g: [r["tasks"] for r in results[g]] for g in regimes}
        sizes = sorted({t for g in regimes for t in per_regime[g]})
    if "saturated" in regimes and not (
        known.report_only and not (kept_audit and kept_audit.is_file())
    ):  # the saturated regime's evaluation against full re-scores, ≥ 20 landings
        out = known.keep / f"audit-{audit_t}.json" if known.keep else Path(tempfile.mkstemp(suffix=".json")[1])
        cmd = [sys.executable, "-m", "bench.scale", "--one", str(audit_t), "--audit-run"]
        cmd += ["--audit-landings", str(audit_landings), "--eval-rows", str(eval_rows), "--json", str(out)]
        cmd += ["--model-path", known.model_path] if known.model_path else []
        cmd += ["--threads", str(args.threads)] if args.threads else []
        t0 = time.perf_counter()
        if not (known.keep and out.is_file()):
            subprocess.run(cmd, check=True)
        audit_result = json.loads(out.read_text())
        print(f"saturated audit T = {audit_t}: {time.perf_counter() - t0:.0f} s", flush=True)
    summary = {g: {r["tasks"]: _summary(r) for r in rs} for g, rs in results.items()}
    tables, targets = [], []
    header = [
        "T",
        "landing wall s",
        "landing CPU s",
        *[f"{p} s" for p in PARTS],
        "evaluate CPU s",
        "loads (CPU s)",
        "tasks re-scored",
        "rows re-scored",
        "old-task drift",
        "peak RSS MB",
        "MB written",
        "grow to T: wall / CPU s",
    ]
    for regime in regimes:
        rows = []
        for t in per_regime[regime]:
            s = summary[regime][t]
            rows.append(
                [
                    str(t),
                    fmt(s["wall_s"], 2),
                    fmt(s["cpu_s"], 2),
                    *[fmt(s[p], 2) for p in PARTS],
                    fmt(s["evaluate_cpu_s"], 2),
                    f"{s['loads']} + {s['evaluation_loads']} ({s['load_cpu_s']:.2f})",
                    fmt(s["rescored"], 0),
                    fmt(s["rows_rescored"], 0),
                    f"{s['drift']:.1e}",
                    f"{s['peak_rss'] / 2**20:.0f}",
                    f"{s['bytes'] / 2**20:.2f}",
                    f"{s['grow_wall_s']:.0f} / {s['grow_cpu_s']:.0f}",
                ]
            )
        tables.append(f"**{regime} regime**\n\n" + md_table(header, rows))
    if summary.get("exact"):
        ex = summary["exact"]
        lo, hi = min(ex), max(ex)
        small, big = ex[lo], ex[hi]
        targets += [
            Target(
                f"exact regime: per-landing CPU at T = {hi} ≤ 1.5× T = {lo}",
                big["cpu_s"] <= 1.5 * small["cpu_s"],
                f"{big['cpu_s']:.2f} s vs {small['cpu_s']:.2f} s = {big['cpu_s'] / small['cpu_s']:.2f}× "
                f"(wall {big['wall_s']:.2f} vs {small['wall_s']:.2f} s = {big['wall_s'] / small['wall_s']:.2f}×)",
            ),
            Target(
                f"exact regime: peak RSS during a landing at T = {hi} ≤ 1.3× T = {lo}",
                big["peak_rss"] <= 1.3 * small["peak_rss"],
                f"{big['peak_rss'] / 2**20:.0f} MB vs {small['peak_rss'] / 2**20:.0f} MB = "
                f"{big['peak_rss'] / small['peak_rss']:.2f}×",
            ),
            Target(
                f"exact regime: bytes written per landing at T = {hi} ≤ 1.5× T = {lo}",
                big["bytes"] <= 1.5 * small["bytes"],
                f"{big['bytes'] / 2**20:.2f} MB vs {small['bytes'] / 2**20:.2f} MB = "
                f"{big['bytes'] / small['bytes']:.2f}×",
            ),
            Target(
                f"a version load at T = {hi} ≤ 1 s CPU, once per landing (the parent; the evaluation reuses "
                "the built model)",
                big["load_cpu_s"] <= 1.0 and big["loads"] <= 1 and big["evaluation_loads"] == 0,
                f"{big['load_cpu_s']:.2f} s CPU; {big['loads']} load(s) by the build, "
                f"{big['evaluation_loads']} by the evaluation",
            ),
        ]
        timed = [r for r in results["exact"] if "full_rescore_s" in r]
        if timed:
            r = timed[-1]
            targets.append(
                Target(
                    "full re-scoring of every task ≤ 1.2× one bare mixed forward over all eval rows "
                    f"(T = {r['tasks']})",
                    r["full_rescore_s"] <= 1.2 * r["bare_forward_s"],
                    f"{r['full_rescore_s']:.1f} s vs {r['bare_forward_s']:.1f} s = "
                    f"{r['full_rescore_s'] / r['bare_forward_s']:.2f}×",
                )
            )
    if audit_result is not None:
        ls = audit_result["landings"]
        a = {
            "landings": len(ls),
            "evaluate_cpu_s": _median([x["evaluation"]["cpu_s"] for x in ls]),
            "evaluate_wall_s": _median([x["evaluation"]["wall_s"] for x in ls]),
            "full_cpu_s": _median([x["full"]["cpu_s"] for x in ls]),
            "full_wall_s": _median([x["full"]["wall_s"] for x in ls]),
            "build_cpu_s": _median([x["build"]["cpu_s"] for x in ls]),
            "rows_rescored": sum(x["rows_rescored"] for x in ls),
            "rows_full": sum(x["rows_full"] for x in ls),
            "drift": _median([x["old_task_drift_median"] for x in ls]),
            "true_drops": sum(x["true_drops"] for x in ls),
            "disagreements": sum(x["disagreements"] for x in ls),
            "certificates_wrong": sum(len(x["certificates_wrong"]) for x in ls),
            "missed_drops": sum(len(x["missed_drops"]) for x in ls),
            "checks": {c: sum(x["checks"].get(c, 0) for x in ls) for c in ("scored", "rows", "screened", "certified")},
        }
        summary["saturated_audit"] = a
        chain_audits = [
            [
                f"chain, T = {t}",
                str(s["audit"]["landings"]),
                f"{s['audit']['evaluate_cpu_s']:.2f} / {s['audit']['evaluate_wall_s']:.2f}",
                f"{s['audit']['full_cpu_s']:.2f} / {s['audit']['full_wall_s']:.2f}",
                f"{s['audit']['evaluate_cpu_s'] / s['audit']['full_cpu_s']:.2f}×",
                f"{s['audit']['rows_rescored']} / {s['audit']['rows_full']}",
                "",
                str(s["audit"]["true_drops"]),
                str(s["audit"]["disagreements"]),
                str(s["audit"]["certificates_wrong"]),
                str(s["audit"]["missed_drops"]),
            ]
            for t, s in summary.get("saturated", {}).items()
            if "audit" in s
        ]
        tables.append(
            "**saturated regime: each landing's evaluation against a full re-score of the same version** (CPU / wall "
            "seconds, medians; counts summed over the landings; checks: tasks scored / rows re-scored / screened / "
            "certified, summed)\n\n"
            + md_table(
                [
                    "run",
                    "landings",
                    "evaluation CPU / wall s",
                    "full re-score CPU / wall s",
                    "CPU ratio",
                    "rows re-scored / full (sum)",
                    "checks",
                    f"tasks below their first score by > {TOLERANCE}",
                    "scores ≠ full re-score",
                    "wrong certificates",
                    "missed drops",
                ],
                [
                    [
                        f"pipeline steps, T = {audit_t}",
                        str(a["landings"]),
                        f"{a['evaluate_cpu_s']:.2f} / {a['evaluate_wall_s']:.2f}",
                        f"{a['full_cpu_s']:.2f} / {a['full_wall_s']:.2f}",
                        f"{a['evaluate_cpu_s'] / a['full_cpu_s']:.2f}×",
                        f"{a['rows_rescored']} / {a['rows_full']}",
                        " / ".join(str(a["checks"][c]) for c in ("scored", "rows", "screened", "certified")),
                        str(a["true_drops"]),
                        str(a["disagreements"]),
                        str(a["certificates_wrong"]),
                        str(a["missed_drops"]),
                    ],
                    *chain_audits,
                ],
            )
        )
        targets += [
            Target(
                f"saturated regime, T = {audit_t}: evaluation per landing ≤ 0.2× a full re-score (CPU, medians)",
                a["evaluate_cpu_s"] <= 0.2 * a["full_cpu_s"],
                f"{a['evaluate_cpu_s']:.2f} s vs {a['full_cpu_s']:.2f} s = "
                f"{a['evaluate_cpu_s'] / a['full_cpu_s']:.2f}× (old tasks moved {a['drift']:.1%} per merge, median)",
            ),
            Target(
                f"saturated regime, T = {audit_t}: no drop beyond {TOLERANCE} missed over ≥ 20 landings",
                a["missed_drops"] == 0 and (a["landings"] >= 20 or args.quick),
                f"{a['missed_drops']} missed over {a['landings']} landings ({a['true_drops']} task-landings below "
                f"their first score by > {TOLERANCE}; {a['certificates_wrong']} wrong certificates, "
                f"{a['disagreements']} scores ≠ the full re-score)",
            ),
        ]
    intro = (
        f"MiniLM (or --model-path), rank-8 adapters, {eval_rows} eval rows per task, k_max 32. Exact regime: "
        "one shared 16-dim subspace per layer. Saturated regime: the same plus a private part per task of the same "
        "size (every merge truncates; old-task drift = the median relative ΔW change of an old task per merge). "
        f"{landings} adapter landings per T through `continual-update` after `batch-absorb` grew the history to T "
        f"in one version (saturated regime, T ≤ {AUDIT_T}: each also audited by a full re-score); and the "
        f"saturated audit: {audit_landings} landings at T = {audit_t} on the pipeline steps (build_version + "
        "evaluate_version, no Prefect/DVC/MLflow around them), each version then re-scored in full. Medians over "
        "the landings; peak RSS and threads are the worst landing's. CPU = this process + its finished children "
        "(git, dvc); loads = versions loaded from disk by the build + by the evaluation."
    )
    write_report(
        args.out,
        "scale",
        "Scale: per-landing cost against the history length, exact and saturated",
        intro,
        tables,
        targets,
        {
            "results": results,
            "audit": audit_result,
            "summary": {g: ({str(k): v for k, v in x.items()} if g in results else x) for g, x in summary.items()},
        },
        environment(),
        time.perf_counter() - t_start,
        args.quick,
    )


if __name__ == "__main__":
    main()
