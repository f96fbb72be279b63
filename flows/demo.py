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
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from pipelines import evaluate as ev
from pipelines import lineage, register
from pipelines.params import Params
from pipelines.realtasks import generate_real_tasks
from pipelines.storage import LocalStorage
from pipelines.workspace import Workspace
from share_core.base import SMOLLM2_ID, load_base
from share_core.families import FAMILIES
from share_core.families import family as family_of
from share_core.peft_io import write_adapter
from share_core.synthetic import tiny_causal_lm
from share_core.taskdata import CAUSAL_LM, load_task
from share_core.tasks import INSTRUCTION_TASK_NAMES, TASK_NAMES, generate_tasks
from share_core.train import train_lora

if TYPE_CHECKING:
    from pipelines.evaluate import EvaluationRecord

MARKER = ".share-demo"
# the causal-LM demo's base: the packaged SmolLM2-135M-Instruct learning real CLDR tasks
# (pipelines.realtasks), or, with SHARE_DEMO_BASE=tiny, a tiny random Llama on generated word games
TINY_TRAIN = {"lr": 5e-3, "max_length": 24}  # the tiny Llama's recipe (tests/test_tasks.py)
SMOLLM2_TRAIN = {"lr": 5e-3, "max_length": 64, "batch_size": 4, "steps": 24}  # a pretrained 135M model learns fast
SMOLLM2_EVAL = {"max_new_tokens": 20, "batch_size": 16}  # "27,40,781.812": one token per digit
REAL_DEMO_TASKS = ("date_de_short", "list_fr", "list_de", "number_de", "price_de_eur")  # the most learnable (measured)


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


def _adapter_landing(tmp: Path, task_dir: Path, params, seed: int) -> Path:
    """A LoRA adapter 'trained elsewhere' (plain PEFT on the workspace's base model), landed
    with its task.yaml and eval data."""
    task = load_task(task_dir)
    base = params.base
    model, tok = load_base(base, seed)
    adapter = train_lora(model, tok, task, params.train, base.targets(), base.heads(), base.model_id)
    adapter.task_type = base.family_impl().peft_task_type
    out = write_adapter(tmp / "adapters" / task.spec.name, adapter)
    for f in ("eval.jsonl", "task.yaml"):
        shutil.copy(task_dir / f, out / f)
    return out


def _bad_landing(tmp: Path, good: Path, family: str) -> Path:
    """A landing that must be rejected: on a classifier, a dataset whose eval set uses a label
    outside its label set; on a causal LM, a classification task (the other family)."""
    if family == CAUSAL_LM:
        return generate_tasks(tmp / "bad", names=["sentiment"], n_train=32, n_eval=8)[0]
    bad = tmp / "bad" / "broken-labels"
    shutil.copytree(good, bad)
    rows = [json.loads(line) for line in (bad / "eval.jsonl").read_text().splitlines() if line.strip()]
    rows[0]["label"] = "not-a-label"
    (bad / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = (bad / "task.yaml").read_text().replace(f"name: {good.name}", "name: broken-labels")
    (bad / "task.yaml").write_text(spec)
    return bad


def demo_base() -> str:
    """`smollm2` (default) or `tiny` ($SHARE_DEMO_BASE): the causal-LM demo's base model."""
    base = os.environ.get("SHARE_DEMO_BASE", "smollm2").strip().lower()
    if base not in ("smollm2", "tiny"):
        raise SystemExit(f"SHARE_DEMO_BASE must be 'smollm2' or 'tiny', got {base!r}")
    return base


def demo_params(root: Path, family: str, steps: int | None, seed: int):
    """The demo workspace's params: MiniLM for classification; for causal LM the packaged
    SmolLM2-135M-Instruct (its chat template on), or a tiny Llama built from a config with
    random weights in <root>/base-model (no download)."""
    params = Params()
    default_steps = family_of(family).demo_steps
    if family == CAUSAL_LM and demo_base() == "tiny":
        path = tiny_causal_lm(root / "base-model", "llama", seed=seed)
        params = params.replace(
            base={"family": CAUSAL_LM, "model_id": "tiny-llama", "model_path": str(path)}, train=TINY_TRAIN
        )
    elif family == CAUSAL_LM:
        params = params.replace(
            base={"family": CAUSAL_LM, "model_id": SMOLLM2_ID, "chat_template": "auto"},
            train=SMOLLM2_TRAIN,
            evaluate=SMOLLM2_EVAL,
        )
        default_steps = SMOLLM2_TRAIN["steps"]
    return params.replace(train={"steps": steps or default_steps, "seed": seed})


def demo_tasks(out: Path, family: str, count: int, seed: int) -> list[Path]:
    """`count` task directories of the demo: generated classification tasks, real CLDR
    instruction tasks on SmolLM2, generated word games on the tiny Llama."""
    if family == CAUSAL_LM and demo_base() == "smollm2":
        names = list(REAL_DEMO_TASKS)
        _check_count(count, names)
        return generate_real_tasks(out, names[:count], seed=seed, n_train=128, n_eval=16)
    names = INSTRUCTION_TASK_NAMES if family == CAUSAL_LM else TASK_NAMES
    _check_count(count, names)
    return generate_tasks(out, names=list(names[:count]), seed=seed)


def _check_count(count: int, names) -> None:
    if not 3 <= count <= len(names):
        raise SystemExit(f"--tasks must be between 2 and {len(names) - 1} (one more task lands as an adapter)")


def run_demo(
    workspace: Path, tasks: int, steps: int | None, seed: int, console: Console, family: str = "sequence-classification"
) -> dict:
    if family not in FAMILIES:
        raise SystemExit(f"--family must be one of {sorted(FAMILIES)}")
    with tempfile.TemporaryDirectory() as check:  # the count is checked before anything is created
        demo_tasks(Path(check), family, tasks + 1, seed)
    root = _prepare(workspace)
    from .continual import continual_update, rollback  # noqa: PLC0415 - after _prepare: Prefect reads PREFECT_HOME and its settings when imported
    from .watcher import Watcher  # noqa: PLC0415 - after _prepare: Prefect reads PREFECT_HOME and its settings when imported

    t_start = time.perf_counter()
    ws = Workspace(root)
    params = demo_params(root, family, steps, seed)
    lineage.init_workspace(ws.root, remote=str(root / "dvc-remote"), params=params)
    with open(root / ".gitignore", "a") as f:
        f.write("bucket/\ndvc-remote/\n.prefect/\nmlflow.db\nmlartifacts/\nbase-model/\n" + MARKER + "\n")
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
                console.print(
                    f"[green]{out['version']}[/] ← {kind} [bold]{landing.task}[/]: ACC {out['acc']:.3f}, BWT "
                    f"{out['bwt']:+.3f}, champion moved: {out['promoted']} ({took:.0f}s)"
                )
            else:
                console.print(f"[yellow]{out['status']}[/] {kind} [bold]{landing.task}[/]: {out.get('reason', '')}")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dirs = demo_tasks(tmp / "datasets", family, tasks + 1, seed)
        for d in dirs[:tasks]:
            process("dataset", d)
        process("dataset", _bad_landing(tmp, dirs[0], family))
        process("adapter", _adapter_landing(tmp, dirs[tasks], params, seed))
        process("dataset", dirs[0])  # the same landing again: a no-op (its key/ETag is in the ledger)

    last = ev.read_record(ws, ws.head())
    console.print(_matrix(ev.accuracy_matrix(ws, ws.head()), last))
    versions = register.list_versions(register.Registry(ws))
    champion = next((v["version"] for v in versions if "champion" in v["aliases"]), None)
    console.print(
        f"champion: [bold]{champion}[/]   candidate: [bold]{versions[-1]['version']}[/]   versions registered: "
        f"{len(versions)}"
    )
    target = ws.version_ids()[-2]
    rb = rollback(str(root), target, reason="demo: roll back the adapter absorb")
    console.print(
        f"rollback → [bold]{target}[/]: champion {rb.get('previous')} → {rb.get('champion')}, HEAD {ws.head()}, "
        f"re-evaluation matches the recorded metrics: {rb['verified']}"
    )
    timings["total_demo"] = time.perf_counter() - t_start
    orchestration = timings["total"] - timings["train"] - timings["evaluate"]
    console.print(
        f"wall {timings['total_demo']:.0f}s; updates {timings['total']:.0f}s = training {timings['train']:.0f}s + "
        f"evaluation {timings['evaluate']:.0f}s + orchestration {orchestration:.0f}s"
    )
    console.print(
        f"\nBrowse the versions: [bold]mlflow ui --backend-store-uri {ws.tracking_uri} --host 127.0.0.1 --port 5000[/]"
    )
    console.print(f"Lineage: [bold]cd {root} && dvc dag[/]")
    return {"results": results, "matrix": last, "timings": timings, "rollback": rb}


def _matrix(matrix: dict, record: EvaluationRecord) -> Table:
    tasks, rows, versions = matrix["tasks"], matrix["rows"], matrix["versions"]
    table = Table(title="Score matrix R[version][task] (strict: no replay)")
    table.add_column("after")
    for t in tasks:
        table.add_column(t, justify="right")
    for v, r in zip(versions, rows):
        table.add_row(v, *[("—" if x is None else f"{x:.3f}") for x in r] + [""] * (len(tasks) - len(r)))
    if any(record.majority[t] is not None for t in tasks):
        table.add_row(
            "majority",
            *[("" if record.majority[t] is None else f"{record.majority[t]:.3f}") for t in tasks],
            style="dim",
        )
    return table
