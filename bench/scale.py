"""Scale: what one landing costs after T tasks of history, through the real chain.

For each T a fresh process grows a workspace to T tasks — T synthetic adapter landings
(share_core.synthetic: one shared 16-dim subspace per layer, so merges move no old task)
absorbed by the `batch-absorb` flow into one version — then lands a few more adapters one by
one with `continual-update` (local-directory bucket → validate → ingest (`dvc add`) → absorb →
DVC stage → evaluate → MLflow run + model version → HEAD → `dvc push`), on the embedded stack
(Prefect ephemeral server, sqlite MLflow, DVC with a local remote). Per landing it records
wall time by part, peak RSS (sampled every 20 ms while the landing runs), live threads, and
the bytes the landing added on disk (workspace, DVC cache and remote, MLflow, bucket; a
hard-linked file counted once). Then it re-scores every task of the last version (the
scheduled full re-evaluation) and times it against one bare mixed-task forward pass over the
same eval rows with the same loaded model (interleaved, median of two each).

Targets (ratios within one run): per-landing wall at T = 300 ≤ 1.5× T = 10 (old tasks
unchanged); full re-scoring ≤ 1.2× the bare forward; peak RSS at T = 300 ≤ 1.3× T = 10;
bytes per landing at T = 300 ≤ 1.5× T = 10. `--quick`: T = 5, 20; `--full`: adds T = 1,000.
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

SIZES = {"quick": [5, 20], "default": [10, 100, 300], "full": [10, 100, 300, 1000]}
PARTS = ["train", "stage", "evaluate", "register", "push"]


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


def run_one(tasks: int, landings: int, eval_rows: int, model_path: str | None) -> dict:
    """Grow a workspace to `tasks` tasks, then land `landings` adapters one by one."""
    tmp = Path(tempfile.mkdtemp(prefix=f"share-bench-scale-{tasks}-"))
    os.environ["PREFECT_HOME"] = str(tmp / "prefect")
    for k, v in {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "DVC_NO_ANALYTICS": "1",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    }.items():
        os.environ.setdefault(k, v)
    import torch

    from flows.continual import batch_absorb, continual_update, score
    from pipelines import evaluate as ev
    from pipelines import lineage
    from pipelines.params import edit_params, load_params
    from pipelines.storage import LocalStorage
    from pipelines.workspace import Workspace
    from share_core import state as st
    from share_core.base import BaseSpec, load_base
    from share_core.synthetic import shared_subspace_adapters, write_landing
    from share_core.tasks import generate_tasks

    ws = Workspace(tmp / "ws")
    lineage.init_workspace(ws.root, remote=str(tmp / "dvc-remote"))
    edit_params(ws.params_path, base={"model_path": model_path})
    template = generate_tasks(tmp / "template", names=["sentiment"], n_train=4, n_eval=eval_rows)[0]
    base = BaseSpec(model_path=model_path)
    model, _ = load_base(base)
    names = [f"task{i:04d}" for i in range(tasks + landings)]
    adapters = shared_subspace_adapters(
        model, names, 2, targets=base.targets(), heads=base.heads(), base_model_id=base.model_id, rank=8, dim=16
    )
    del model
    src, storage = tmp / "landings-src", LocalStorage(tmp / "bucket")
    for a in adapters:
        write_landing(src, a, template)
    for n in names[:tasks]:
        storage.upload_task(src / n, "adapter", n)

    t0 = time.perf_counter()
    grown = batch_absorb(storage_url=storage.describe(), workspace=str(ws.root))
    grow_s = time.perf_counter() - t0
    assert grown["version"] == "v0001" and len(grown["absorbed"]) == tasks, grown

    per = []
    for n in names[tasks:]:
        before = disk_bytes(tmp)
        storage.upload_task(src / n, "adapter", n)
        uploaded = disk_bytes(tmp) - before
        with PeakRss() as rss:
            t0 = time.perf_counter()
            out = continual_update(
                key=f"incoming/adapters/{n}/task.yaml", storage_url=storage.describe(), workspace=str(ws.root)
            )
            wall = time.perf_counter() - t0
        assert out["status"] == "processed", out
        rec = ev.read_record(ws, out["version"])
        per.append(
            {
                "version": out["version"],
                "wall_s": wall,
                "parts_s": {p: out["seconds"][p] for p in PARTS},
                "peak_rss": rss.peak,
                "threads": threading.active_count(),
                "bytes": disk_bytes(tmp) - before - uploaded,
                "rescored": len(rec["rescored"]),
                "certified": len(rec["certified"]),
            }
        )

    # the scheduled full re-evaluation against one bare mixed forward over the same rows
    version = ws.head()
    cfg = load_params(ws.params_path).evaluate
    all_tasks = ev.read_record(ws, version)["tasks"]
    manifest = st.read_manifest(ws.version_dir(version))
    share, tok, p = ev.loaded(str(ws.root), version, manifest["content_hash"])
    rows = [(e["name"], r["text"]) for e in manifest["tasks"] for r in ev.eval_data(ws, e).eval]
    fresh = []

    def full() -> None:  # the whole evaluation path: read every task's data, batch, score, count
        fresh[:] = score(str(ws.root), version, all_tasks, cfg)

    @torch.no_grad()
    def bare() -> None:  # the same rows through the same loaded model, nothing else
        for i in range(0, len(rows), cfg.batch_size):
            b = rows[i : i + cfg.batch_size]
            enc = tok(
                [r[1] for r in b], padding=True, truncation=True, max_length=p.train.max_length, return_tensors="pt"
            )
            share.forward_mixed([r[0] for r in b], **enc)

    timing = time_interleaved({"full": full, "bare": bare}, repeats=2, warmup=0)
    full_s, bare_s = timing["full"].median, timing["bare"].median
    return {
        "tasks": tasks,
        "grow_s": grow_s,
        "landings": per,
        "full_rescore_s": full_s,
        "bare_forward_s": bare_s,
        "eval_rows": len(rows),
        "scored": sum(r["score"] is not None for r in fresh),
    }


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def main(argv: list[str] | None = None) -> None:
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--one", type=int)
    pre.add_argument("--full", action="store_true")
    pre.add_argument("--landings", type=int, default=None)
    pre.add_argument("--eval-rows", type=int, default=None)
    pre.add_argument(
        "--model-path", default=None, help="a local Hugging Face classifier directory (default: the packaged MiniLM)"
    )
    pre.add_argument("--json", type=Path)
    known, rest = pre.parse_known_args(argv)
    args = parse_args(__doc__.splitlines()[0], rest)
    landings = known.landings or (2 if args.quick else 3)
    eval_rows = known.eval_rows or (8 if args.quick else 32)
    if known.one is not None:  # the child: one T, results as JSON
        known.json.write_text(json.dumps(run_one(known.one, landings, eval_rows, known.model_path)))
        return
    sizes = SIZES["quick" if args.quick else "full" if known.full else "default"]
    t_start = time.perf_counter()
    results = []
    for t in sizes:  # one process per T: peak memory and threads are the landing's, not the history's
        out = Path(tempfile.mkstemp(suffix=".json")[1])
        cmd = [
            sys.executable,
            "-m",
            "bench.scale",
            "--one",
            str(t),
            "--landings",
            str(landings),
            "--eval-rows",
            str(eval_rows),
            "--json",
            str(out),
        ]
        cmd += ["--model-path", known.model_path] if known.model_path else []
        cmd += ["--threads", str(args.threads)] if args.threads else []
        subprocess.run(cmd, check=True)
        results.append(json.loads(out.read_text()))
        print(f"T = {t}: median landing {_median([x['wall_s'] for x in results[-1]['landings']]):.1f} s", flush=True)

    rows = []
    summary = {}
    for r in results:
        ls = r["landings"]
        s = {
            "wall_s": _median([x["wall_s"] for x in ls]),
            "peak_rss": max(x["peak_rss"] for x in ls),
            "bytes": _median([x["bytes"] for x in ls]),
            "threads": max(x["threads"] for x in ls),
            **{p: _median([x["parts_s"][p] for x in ls]) for p in PARTS},
            "rescored": max(x["rescored"] for x in ls),
            "full_rescore_s": r["full_rescore_s"],
            "bare_forward_s": r["bare_forward_s"],
        }
        summary[r["tasks"]] = s
        rows.append(
            [
                str(r["tasks"]),
                fmt(s["wall_s"], 2),
                *[fmt(s[p], 2) for p in PARTS],
                str(s["rescored"]),
                f"{s['peak_rss'] / 2**20:.0f}",
                f"{s['bytes'] / 2**20:.2f}",
                str(s["threads"]),
                fmt(r["grow_s"], 1),
                f"{r['full_rescore_s']:.1f} / {r['bare_forward_s']:.1f}",
            ]
        )
    small, big = summary[sizes[0]], summary[sizes[-1] if sizes[-1] <= 300 else 300]
    lo, hi = sizes[0], (sizes[-1] if sizes[-1] <= 300 else 300)
    largest = summary[sizes[-1]]
    targets = [
        Target(
            f"per-landing wall at T = {hi} ≤ 1.5× T = {lo} (old tasks unchanged)",
            big["wall_s"] <= 1.5 * small["wall_s"],
            f"{big['wall_s']:.2f} s vs {small['wall_s']:.2f} s = {big['wall_s'] / small['wall_s']:.2f}×",
        ),
        Target(
            f"full re-scoring of every task ≤ 1.2× one bare mixed forward over all eval rows (T = {sizes[-1]})",
            largest["full_rescore_s"] <= 1.2 * largest["bare_forward_s"],
            f"{largest['full_rescore_s']:.1f} s vs {largest['bare_forward_s']:.1f} s = "
            f"{largest['full_rescore_s'] / largest['bare_forward_s']:.2f}×",
        ),
        Target(
            f"peak RSS during a landing at T = {hi} ≤ 1.3× T = {lo}",
            big["peak_rss"] <= 1.3 * small["peak_rss"],
            f"{big['peak_rss'] / 2**20:.0f} MB vs {small['peak_rss'] / 2**20:.0f} MB = "
            f"{big['peak_rss'] / small['peak_rss']:.2f}×",
        ),
        Target(
            f"bytes written per landing at T = {hi} ≤ 1.5× T = {lo}",
            big["bytes"] <= 1.5 * small["bytes"],
            f"{big['bytes'] / 2**20:.2f} MB vs {small['bytes'] / 2**20:.2f} MB = {big['bytes'] / small['bytes']:.2f}×",
        ),
    ]
    table = md_table(
        [
            "T",
            "landing s",
            *[f"{p} s" for p in PARTS],
            "re-scored",
            "peak RSS MB",
            "MB written",
            "threads",
            "grow to T s",
            "full re-score / bare forward s",
        ],
        rows,
    )
    intro = (
        "MiniLM (or --model-path), adapters of rank 8 in one shared 16-dim subspace per layer (k_max 32), "
        f"{eval_rows} eval rows per task, "
        f"{landings} adapter landings per T through `continual-update` after `batch-absorb` grew the history to T. "
        "Medians over the landings; "
        "peak RSS and threads are the worst landing's."
    )
    write_report(
        args.out,
        "scale",
        "Scale: per-landing cost against the history length",
        intro,
        [table],
        targets,
        {"results": results, "summary": {str(k): v for k, v in summary.items()}},
        environment(),
        time.perf_counter() - t_start,
        args.quick,
    )


if __name__ == "__main__":
    main()
