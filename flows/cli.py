"""`share` — the command line of the Share pipeline (typer + rich)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # 2 busy cores: the default 20 s is too tight

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Continual learning in one shared LoRA subspace.")
console = Console()


def matrix_table(scores, title: str) -> Table:
    rows = scores.table()
    table = Table(title=title)
    for h in rows[0]:
        table.add_column(h, justify="right")
    for r in rows[1:]:
        table.add_row(*r)
    return table


@app.command()
def core_demo(
    tasks: int = typer.Option(4, help="how many generated tasks to learn in sequence"),
    steps: int = typer.Option(80, help="training steps per task"),
    k_max: int = typer.Option(32, help="basis columns per side, at most"),
    seed: int = typer.Option(0),
    out: Path | None = typer.Option(None, help="save the final subspace version here"),
) -> None:
    """Learn generated tasks one by one on MiniLM in one subspace (no orchestration) and print
    the accuracy matrix, forgetting and storage against one LoRA per task."""
    from share_core import state as st
    from share_core.continual import run_continual
    from share_core.metrics import accounting
    from share_core.subspace import KPolicy
    from share_core.taskdata import load_task
    from share_core.tasks import TASK_NAMES, generate_tasks
    from share_core.train import TrainConfig

    if not 1 <= tasks <= len(TASK_NAMES):
        raise typer.BadParameter(f"--tasks must be between 1 and {len(TASK_NAMES)}")
    with tempfile.TemporaryDirectory() as tmp:
        dirs = generate_tasks(Path(tmp), names=list(TASK_NAMES[:tasks]), seed=seed)
        data = [load_task(d) for d in dirs]
        cfg = TrainConfig(steps=steps, seed=seed)
        t0 = time.perf_counter()
        run = run_continual(data, cfg, KPolicy(k_max=k_max), on_step=lambda i, s: console.print(f"[green]learned[/] {s.tasks[i]}: score {s.rows[i][i]:.3f} (majority {s.majority[i]:.3f}), ACC {s.acc(i):.3f}, BWT {s.bwt(i):+.3f}"))
        wall = time.perf_counter() - t0
    console.print(matrix_table(run.scores, "Accuracy matrix R[i][j] (Share, strict: no replay)"))
    acct = accounting(run.model.state)
    console.print(
        f"ACC {run.scores.acc():.3f}   BWT {run.scores.bwt():+.3f}   wall {wall:.0f}s "
        f"(train {run.seconds['train']:.0f}s, evaluate {run.seconds['evaluate']:.0f}s)\n"
        f"trainable params for the next task: {acct['trainable_params_next_task']:,}   "
        f"stored: {acct['share_params']:,} params / {acct['share_bytes'] / 1e6:.2f} MB "
        f"vs one LoRA per task {acct['lora_per_task_params']:,} / {acct['lora_per_task_bytes'] / 1e6:.2f} MB "
        f"(×{acct['ratio_vs_lora']:.2f})"
    )
    if out:
        digest = st.save(run.model.state, out)
        console.print(f"saved version {out} (content {digest[:12]})")
    console.print_json(json.dumps({"acc": run.scores.acc(), "bwt": run.scores.bwt(), "matrix": run.scores.rows}))


# ---- the pipeline --------------------------------------------------------------------------
WORKSPACE = typer.Option(Path("share-workspace"), "--workspace", "-w", help="workspace directory (git + DVC repo)")
MODEL_NAME = typer.Option("share-subspace", help="MLflow registered model name")


def _tracking(ws, tracking_uri: str | None) -> str:
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or ws.tracking_uri


@app.command()
def demo(
    workspace: Path = typer.Option(Path("demo-workspace"), "--workspace", "-w"),
    tasks: int = typer.Option(4, help="generated dataset tasks landing one by one"),
    steps: int | None = typer.Option(None, help="training steps per task (default: 60 classification, 150 causal-lm)"),
    seed: int = typer.Option(0),
    family: str = typer.Option("sequence-classification", help="sequence-classification (MiniLM) | causal-lm (a tiny random Llama, instruction tasks)"),
) -> None:
    """The embedded offline demo: generated tasks land in local storage one by one (plus one
    adapter trained elsewhere); the Prefect flows turn each into a registered, evaluated,
    DVC-tracked version on Prefect's ephemeral server and a local sqlite MLflow; then a rollback."""
    from .demo import run_demo

    run_demo(workspace, tasks=tasks, steps=steps, seed=seed, console=console, family=family)


@app.command()
def land(task_dir: Path, storage: str = typer.Option(..., help="file:///path or s3://bucket/prefix[?endpoint_url=…]"), kind: str = typer.Option("dataset", help="dataset | adapter")) -> None:
    """Upload a task directory to the bucket (task.yaml last: it marks the landing complete)."""
    from pipelines.storage import open_storage

    open_storage(storage).upload_task(task_dir, kind, task_dir.name)
    console.print(f"landed {kind} [bold]{task_dir.name}[/] in {open_storage(storage).describe()}")


@app.command()
def versions(workspace: Path = WORKSPACE, model_name: str = MODEL_NAME, tracking_uri: str | None = None) -> None:
    """The registered versions with their aliases, scores and parents."""
    from pipelines import register
    from pipelines.workspace import Workspace

    ws = Workspace(workspace)
    rows = register.list_versions(model_name, tracking_uri=_tracking(ws, tracking_uri))
    table = Table(title=f"{model_name} (HEAD: {ws.head()})")
    for col in ("version", "model version", "aliases", "task", "parent", "ACC", "BWT"):
        table.add_column(col)
    for r in rows:
        fmt = lambda v: "" if v is None else f"{float(v):.3f}"  # noqa: E731
        table.add_row(r["version"], str(r["model_version"]), ",".join(r["aliases"]), r.get("task") or "", r.get("parent") or "", fmt(r.get("acc")), fmt(r.get("bwt")))
    console.print(table)


@app.command()
def rollback(version: str, workspace: Path = WORKSPACE, model_name: str = MODEL_NAME, reason: str = "", tracking_uri: str | None = None) -> None:
    """Make VERSION (v3, 3 or v0003) the champion and the base of the next update; verify by
    re-evaluation. An unknown VERSION fails with the list of existing ones; the current
    champion (when it is also HEAD) is a no-op."""
    from pipelines import register
    from pipelines.workspace import VersionIdError, Workspace

    ws = Workspace(workspace)
    uri = _tracking(ws, tracking_uri)
    try:
        version = register.rollback_target(ws, version, model_name=model_name, tracking_uri=uri)
    except VersionIdError as e:
        Console(stderr=True).print(f"rollback: {e}", style="red", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    if register.champion_version(model_name, uri) == version and ws.head() == version:
        console.print(f"{version} is already the champion and HEAD: nothing to do")
        return
    from .continual import rollback as rollback_flow

    out = rollback_flow(str(ws.root), version, model_name=model_name, reason=reason, tracking_uri=uri)
    console.print_json(json.dumps(out, default=str))


@app.command(name="eval")
def eval_cmd(version: str, workspace: Path = WORKSPACE) -> None:
    """Re-score VERSION on all its tasks and compare with what was recorded."""
    from pipelines.workspace import Workspace

    from .continual import evaluate_version

    console.print_json(json.dumps(evaluate_version(str(Workspace(workspace).root), version)))


@app.command()
def export(version: str, task: str, out: Path, workspace: Path = WORKSPACE) -> None:
    """Write TASK of VERSION as a standard PEFT LoRA directory."""
    from pipelines.params import load_params
    from pipelines.workspace import Workspace
    from share_core import state as st
    from share_core.base import load_base
    from share_core.model import ShareModel

    ws = Workspace(workspace)
    params = load_params(ws.params_path)
    model, _ = load_base(params.base, params.train.seed)
    ShareModel(model, st.load(ws.version_dir(version))).export_task(task, out, params.base.family_impl().peft_task_type)
    console.print(f"exported {version}/{task} → {out} (load with peft.PeftModel.from_pretrained)")


@app.command()
def info(version: str | None = typer.Argument(None), workspace: Path = WORKSPACE) -> None:
    """A version's manifest summary: tasks, k per layer, storage against one LoRA per task."""
    from pipelines.workspace import Workspace
    from share_core import state as st
    from share_core.metrics import accounting

    ws = Workspace(workspace)
    version = version or ws.head()
    if version is None:
        raise typer.BadParameter("the workspace has no versions yet")
    state = st.load(ws.version_dir(version))
    acct = accounting(state)
    table = Table(title=f"{version} (parent {state.parent}) on {state.base_model_id}")
    for col in ("task", "rank p", "scale", "source"):
        table.add_column(col)
    for t in state.tasks:
        table.add_row(t.name, str(t.rank), f"{t.scale:g}", t.info.get("source", ""))
    console.print(table)
    ks = sorted({tuple(v) for v in acct["k"].values()})
    console.print(f"layers {len(state.bases)}, (k_B, k_A) {ks}, φ {state.phi}; stored {acct['share_params']:,} params vs one LoRA per task {acct['lora_per_task_params']:,} (×{acct['ratio_vs_lora']:.2f})")


@app.command()
def serve(
    storage: str = typer.Option(..., help="file:///path or s3://bucket/prefix[?endpoint_url=…]"),
    workspace: Path = WORKSPACE,
    model_name: str = MODEL_NAME,
    tracking_uri: str | None = None,
    poll_seconds: float = typer.Option(5.0, help="watcher polling interval"),
    sqs_queue_url: str | None = typer.Option(None, help="also consume S3 notifications from this SQS queue"),
    train_pool: str | None = typer.Option(None, help="run training as its own deployment on this work pool (e.g. share-gpu)"),
    absorb_cron: str = "0 * * * *",
    reeval_cron: str = "30 3 * * *",
) -> None:
    """Serve the deployments (event-triggered continual update, cron batch-absorb and
    re-evaluation, rollback, evaluate-version) and run the storage watcher. Needs a Prefect
    API (PREFECT_API_URL, e.g. from `share stack up`)."""
    import threading

    from prefect import serve as prefect_serve

    from pipelines import lineage
    from pipelines.storage import open_storage
    from pipelines.workspace import Workspace

    from .continual import recover_updates
    from .deployments import build_deployments, deploy_train_version
    from .watcher import Watcher

    ws = Workspace(workspace)
    lineage.init_workspace(ws.root)
    train_deployment = None
    if train_pool:
        train_deployment = deploy_train_version(train_pool)
        console.print(f"training runs on work pool [bold]{train_pool}[/] (start a worker: prefect worker start --pool {train_pool})")
    deployments = build_deployments(storage, str(ws.root), model_name=model_name, tracking_uri=_tracking(ws, tracking_uri), absorb_cron=absorb_cron, reeval_cron=reeval_cron, train_deployment=train_deployment)
    stop = threading.Event()
    sqs = None
    if sqs_queue_url:
        import boto3

        sqs = boto3.client("sqs")
    watcher = Watcher(open_storage(storage), storage, ws.root / "watcher-ledger.json")
    # updates a crash left half-done: stale ones are discarded, the others fire again and resume
    for provenance in recover_updates(str(ws.root), model_name, _tracking(ws, tracking_uri)):
        landing = watcher.storage.landing(provenance["key"]) if "key" in provenance else None
        if landing is not None and landing.etag == provenance["etag"]:
            console.print(f"resuming the interrupted update of [bold]{landing.key}[/]")
            watcher.emit(landing)
    thread = threading.Thread(target=watcher.run, args=(poll_seconds, stop, sqs, sqs_queue_url), daemon=True)
    thread.start()
    try:
        prefect_serve(*deployments)
    finally:
        stop.set()


stack_app = typer.Typer(help="The local stack: moto S3, MLflow server, Prefect server on 127.0.0.1.")
app.add_typer(stack_app, name="stack")
DATA_DIR = typer.Option(Path(".share-stack"), help="where the stack keeps its data, logs and pids")


@stack_app.command("up")
def stack_up(data_dir: Path = DATA_DIR) -> None:
    from infra import stack

    stack.up(stack.StackConfig(data_dir=data_dir))
    stack_status(data_dir)
    console.print("# moto accepts any credentials: the AWS values below are its dummies, never real ones")
    for k, v in stack.env(stack.StackConfig(data_dir=data_dir)).items():
        console.print(f"export {k}={v}")


@stack_app.command("down")
def stack_down(data_dir: Path = DATA_DIR) -> None:
    from infra import stack

    stack.down(stack.StackConfig(data_dir=data_dir))
    console.print("stack stopped")


@stack_app.command("status")
def stack_status(data_dir: Path = DATA_DIR) -> None:
    from infra import stack

    table = Table(title="local stack")
    for col in ("service", "pid", "running", "healthy", "url"):
        table.add_column(col)
    for name, s in stack.status(stack.StackConfig(data_dir=data_dir)).items():
        table.add_row(name, str(s.get("pid") or ""), str(s.get("running")), str(s.get("healthy")), s.get("url", ""))
    console.print(table)


if __name__ == "__main__":
    app()
