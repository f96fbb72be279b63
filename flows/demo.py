"""The embedded demo: everything offline on one laptop CPU, through the real flows.

Local-directory storage, Prefect's ephemeral server, MLflow on a local sqlite store, a DVC
workspace and MiniLM. The watcher emits a `share.task.landed` event per landing exactly as in
`share serve`; here the demo then calls the continual-update flow itself (an ephemeral server
runs no triggers — `share serve` on a Prefect server does).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

MARKER = ".share-demo"


def _prepare(workspace: Path) -> Path:
    """A fresh demo workspace; only ever deletes a directory this demo created."""
    workspace = workspace.resolve()
    if workspace.exists():
        if not (workspace / MARKER).exists():
            raise SystemExit(f"{workspace} exists and is not a demo workspace; pick another --workspace")
        shutil.rmtree(workspace)
    workspace.mkdir(parents=True)
    (workspace / MARKER).write_text("created by `share demo`; safe to delete\n")
    os.environ["PREFECT_HOME"] = str(workspace / ".prefect")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workspace / 'mlflow.db'}"
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # the demo prints one line per landing itself
    return workspace


def _adapter_landing(tmp: Path, task_dir: Path, steps: int, seed: int) -> Path:
    """A LoRA adapter 'trained elsewhere' (plain PEFT on MiniLM), landed with its task.yaml."""
    from share_core.continual import CLASSIFIER_HEADS, CLASSIFIER_TARGETS, MINILM_ID, load_classifier
    from share_core.peft_io import write_adapter
    from share_core.taskdata import load_task
    from share_core.train import TrainConfig, train_lora

    task = load_task(task_dir)
    model, tok = load_classifier(seed=seed)
    adapter = train_lora(model, tok, task, TrainConfig(steps=steps, seed=seed, progress=False), CLASSIFIER_TARGETS, CLASSIFIER_HEADS, MINILM_ID)
    out = write_adapter(tmp / "adapters" / task.spec.name, adapter)
    for f in ("eval.jsonl", "task.yaml"):
        shutil.copy(task_dir / f, out / f)
    return out


def _bad_landing(tmp: Path, good: Path) -> Path:
    """A dataset whose eval set uses a label outside its label set: must be rejected."""
    bad = tmp / "bad" / "broken-labels"
    shutil.copytree(good, bad)
    rows = [json.loads(line) for line in (bad / "eval.jsonl").read_text().splitlines() if line.strip()]
    rows[0]["label"] = "not-a-label"
    (bad / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = (bad / "task.yaml").read_text().replace(f"name: {good.name}", "name: broken-labels")
    (bad / "task.yaml").write_text(spec)
    return bad


def run_demo(workspace: Path, tasks: int, steps: int, seed: int, console: Console) -> dict:
    root = _prepare(workspace)
    from pipelines import evaluate as ev
    from pipelines import lineage, register
    from pipelines.storage import LocalStorage
    from pipelines.workspace import Workspace
    from share_core.tasks import TASK_NAMES, generate_tasks

    from .continual import continual_update, rollback
    from .watcher import Watcher

    if not 2 <= tasks < len(TASK_NAMES):
        raise SystemExit(f"--tasks must be between 2 and {len(TASK_NAMES) - 1} (one more task lands as an adapter)")
    t_start = time.perf_counter()
    ws = Workspace(root)
    lineage.init_workspace(ws.root, remote=str(root / "dvc-remote"))
    with open(root / ".gitignore", "a") as f:
        f.write("bucket/\ndvc-remote/\n.prefect/\nmlflow.db\nmlartifacts/\n" + MARKER + "\n")
    params = (root / "params.yaml").read_text().replace("steps: 80", f"steps: {steps}")
    (root / "params.yaml").write_text(params)
    storage_url = (root / "bucket").as_uri()
    storage = LocalStorage(root / "bucket")
    watcher = Watcher(storage, storage_url, root / "watcher-ledger.json")
    results, timings = [], {"train": 0.0, "evaluate": 0.0, "total": 0.0}

    def process(kind: str, task_dir: Path) -> None:
        storage.upload_task(task_dir, kind, task_dir.name)
        for landing in watcher.poll_once():
            t0 = time.perf_counter()
            out = continual_update(key=landing.key, etag=landing.etag, storage_url=storage_url, workspace=str(root))
            took = time.perf_counter() - t0
            for k, v in out.get("seconds", {}).items():
                timings[k] = timings.get(k, 0.0) + v
            results.append({"landing": landing.task, "kind": kind, **out})
            if out["status"] == "processed":
                console.print(f"[green]{out['version']}[/] ← {kind} [bold]{landing.task}[/]: ACC {out['acc']:.3f}, BWT {out['bwt']:+.3f}, champion moved: {out['promoted']} ({took:.0f}s)")
            else:
                console.print(f"[yellow]{out['status']}[/] {kind} [bold]{landing.task}[/]: {out.get('reason', '')}")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dirs = generate_tasks(tmp / "datasets", names=list(TASK_NAMES[: tasks + 1]), seed=seed)
        for d in dirs[:tasks]:
            process("dataset", d)
        process("dataset", _bad_landing(tmp, dirs[0]))
        process("adapter", _adapter_landing(tmp, dirs[tasks], steps, seed))
        process("dataset", dirs[0])  # the same landing again: a no-op (its key/ETag is in the ledger)

    last = ev.read_record(ws, ws.head())
    console.print(_matrix(ev.accuracy_matrix(ws, ws.head()), last))
    versions = register.list_versions("share-subspace", tracking_uri=ws.tracking_uri)
    champion = next((v["version"] for v in versions if "champion" in v["aliases"]), None)
    console.print(f"champion: [bold]{champion}[/]   candidate: [bold]{versions[-1]['version']}[/]   versions registered: {len(versions)}")
    target = ws.version_ids()[-2]
    rb = rollback(str(root), target, reason="demo: roll back the adapter absorb")
    console.print(f"rollback → [bold]{target}[/]: champion {rb.get('previous')} → {rb.get('champion')}, HEAD {ws.head()}, re-evaluation matches the recorded metrics: {rb['verified']}")
    timings["total_demo"] = time.perf_counter() - t_start
    orchestration = timings["total"] - timings["train"] - timings["evaluate"]
    console.print(f"wall {timings['total_demo']:.0f}s; updates {timings['total']:.0f}s = training {timings['train']:.0f}s + evaluation {timings['evaluate']:.0f}s + orchestration {orchestration:.0f}s")
    console.print(f"\nBrowse the versions: [bold]mlflow ui --backend-store-uri {ws.tracking_uri} --host 127.0.0.1 --port 5000[/]")
    console.print(f"Lineage: [bold]cd {root} && dvc dag[/]")
    return {"results": results, "matrix": last, "timings": timings, "rollback": rb}


def _matrix(matrix: dict, record: dict) -> Table:
    tasks, rows, versions = matrix["tasks"], matrix["rows"], matrix["versions"]
    table = Table(title="Accuracy matrix R[version][task] (strict: no replay)")
    table.add_column("after")
    for t in tasks:
        table.add_column(t, justify="right")
    for v, r in zip(versions, rows):
        table.add_row(v, *[("—" if x is None else f"{x:.3f}") for x in r] + [""] * (len(tasks) - len(r)))
    table.add_row("majority", *[("" if record["majority"][t] is None else f"{record['majority'][t]:.3f}") for t in tasks], style="dim")
    return table
