"""`share` — the command line of the Share pipeline (typer + rich).

Errors a user can act on (a bad version id or storage URL, a server that is down, a missing
workspace) print one line, sometimes a `hint:` line, on stderr and exit non-zero; unexpected
ones print one line too. `share --debug …` (or SHARE_DEBUG=1) adds the traceback.

Imports of torch (share_core and most of pipelines), MLflow and Prefect (the flows) stay inside
the commands that use them, so that `share --help` and the quick commands (land, status, stack)
start in a fraction of a second; Prefect is also imported only after this module has set the
PREFECT_* defaults below. Each such import is marked `# noqa: PLC0415 - start-up: …`.

Why one module of ~660 lines: it is the `share` command tree (typer needs the commands registered
on one app); server probes and the one-line error mapping are flows/servers.py, the stack is
infra/stack.py, and each command body is a few lines calling them.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
import traceback
from pathlib import Path

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from infra import stack
from pipelines.journal import Journal
from pipelines.storage import LocalStorage, S3Storage, StorageError, kind_and_task, open_storage, redact_url
from pipelines.workspace import DEFAULT_MODEL_NAME, Workspace, parse_version_id

from .servers import (
    STACK_HINT,
    CLIError,
    explain,
    first_line,
    prefect_api_url,
    require_mlflow,
    require_prefect,
    require_server,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault(
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"
)  # 2 busy cores: the default 20 s is too tight

STORAGE_FORMS = "accepted: file:///abs/dir or a directory path (it must exist), s3://bucket/prefix[?endpoint_url=http://host:port&region=…]"
WATCHER_LEDGER = "watcher-ledger.json"  # in the workspace: {key: ETag} of the landings `share serve` has announced


class ShareGroup(TyperGroup):
    """The `share` group: an exception from any command becomes one or two lines on stderr and
    a non-zero exit (with the traceback first under --debug)."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except (typer.exceptions.TyperException, typer.Exit, typer.Abort):  # usage errors, --help, exits: typer's own
            raise
        except BrokenPipeError:  # `share status | head`: typer exits quietly
            raise
        except Exception as e:
            if ctx.params.get("debug"):
                traceback.print_exception(e)
            message, hint, code = explain(e)
            typer.secho(f"error: {message}", err=True, fg="red")
            if hint:
                typer.echo(f"hint: {hint}", err=True)
            raise typer.Exit(code) from None


app = typer.Typer(
    cls=ShareGroup, add_completion=False, no_args_is_help=True, help="Continual learning in one shared LoRA subspace."
)
console = Console()


@app.callback()
def main(
    debug: bool = typer.Option(False, "--debug", envvar="SHARE_DEBUG", help="show the traceback when a command fails"),
) -> None:
    """Continual learning in one shared LoRA subspace."""


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
    seed: int = typer.Option(0, help="random seed of the generated tasks and the training"),
    out: Path | None = typer.Option(None, help="save the final subspace version here"),
) -> None:
    """Learn generated tasks one by one on MiniLM in one subspace (no orchestration) and print
    the accuracy matrix, forgetting and storage against one LoRA per task."""
    from share_core import state as st  # noqa: PLC0415 - start-up: loads torch
    from share_core.continual import run_continual  # noqa: PLC0415 - start-up: loads torch
    from share_core.metrics import accounting  # noqa: PLC0415 - start-up: loads torch
    from share_core.subspace import KPolicy  # noqa: PLC0415 - start-up: loads torch
    from share_core.taskdata import load_task  # noqa: PLC0415 - start-up: loads torch
    from share_core.tasks import TASK_NAMES, generate_tasks  # noqa: PLC0415 - start-up: loads torch
    from share_core.train import TrainConfig  # noqa: PLC0415 - start-up: loads torch

    if not 1 <= tasks <= len(TASK_NAMES):
        raise typer.BadParameter(f"--tasks must be between 1 and {len(TASK_NAMES)}")
    with tempfile.TemporaryDirectory() as tmp:
        dirs = generate_tasks(Path(tmp), names=list(TASK_NAMES[:tasks]), seed=seed)
        data = [load_task(d) for d in dirs]
        cfg = TrainConfig(steps=steps, seed=seed)
        t0 = time.perf_counter()
        run = run_continual(
            data,
            cfg,
            KPolicy(k_max=k_max),
            on_step=lambda i, s: console.print(
                f"[green]learned[/] {s.tasks[i]}: score {s.rows[i][i]:.3f} (majority {s.majority[i]:.3f}), ACC "
                f"{s.acc(i):.3f}, BWT {s.bwt(i):+.3f}"
            ),
        )
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
MODEL_NAME = typer.Option(DEFAULT_MODEL_NAME, help="MLflow registered model name")
TRACKING_URI = typer.Option(
    None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the workspace's sqlite store)"
)
STORAGE = typer.Option(
    None,
    "--storage",
    envvar="SHARE_STORAGE",
    show_envvar=True,
    help="where landings arrive: file:///path or s3://bucket/prefix[?endpoint_url=…]",
)


def _tracking(ws, tracking_uri: str | None) -> str:
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or ws.tracking_uri


def open_workspace(path: Path):
    """The workspace at `path`; one line naming it when there is none (nothing is created)."""
    ws = Workspace(path)
    marks = (ws.params_path, ws.versions, ws.ledger_path, ws.root / "HEAD")
    if not ws.root.is_dir() or not any(m.exists() for m in marks):
        raise CLIError(
            f"no workspace at {ws.root}",
            hint="pass --workspace/-w DIR: the directory `share serve` or `share demo` works in",
            code=2,
        )
    return ws


def version_arg(ws, text: str) -> str:
    """A user's version id (v3, 3, v0003) as the workspace's id; VersionIdError (one line that
    lists the existing versions) when it is malformed or absent."""
    return parse_version_id(text, ws.version_ids())


def open_storage_arg(url: str | None):
    """The storage behind --storage / $SHARE_STORAGE, checked: a local directory must exist and
    an S3 endpoint_url must answer (the AWS default endpoint is not probed)."""
    if not url:
        raise CLIError(f"no storage: pass --storage URL or set SHARE_STORAGE ({STORAGE_FORMS})", code=2)
    try:
        storage = open_storage(url)
    except StorageError as e:
        raise CLIError(f"{first_line(e)}; {STORAGE_FORMS}", code=2) from e
    if isinstance(storage, LocalStorage) and not storage.root.is_dir():
        raise CLIError(f"storage directory {storage.root} does not exist; {STORAGE_FORMS}", code=2)
    if isinstance(storage, S3Storage) and storage.endpoint_url:
        require_server(
            "the S3 endpoint",
            storage.endpoint_url,
            storage.endpoint_url,
            f"{STACK_HINT}; or fix endpoint_url in the storage URL",
        )
    return storage


@app.command()
def demo(
    workspace: Path = typer.Option(
        Path("demo-workspace"),
        "--workspace",
        "-w",
        help="a new directory, or one an earlier demo created (it is replaced)",
    ),
    tasks: int = typer.Option(4, help="generated dataset tasks landing one by one"),
    steps: int | None = typer.Option(None, help="training steps per task (default: 60 classification, 150 causal-lm)"),
    seed: int = typer.Option(0, help="random seed of the generated tasks and the training"),
    family: str = typer.Option(
        "sequence-classification",
        help="sequence-classification (MiniLM) | causal-lm (a tiny random Llama, instruction tasks)",
    ),
) -> None:
    """The embedded offline demo: landings become registered, evaluated versions; then a rollback.

    Generated tasks land in local storage one by one (plus one adapter trained elsewhere); the
    Prefect flows turn each into a registered, evaluated, DVC-tracked version on Prefect's
    ephemeral server and a local sqlite MLflow; then a rollback."""
    require_prefect(prefect_api_url(profile=False))  # the demo uses its own PREFECT_HOME: only the environment counts
    from .demo import run_demo  # noqa: PLC0415 - start-up: loads torch and mlflow

    run_demo(workspace, tasks=tasks, steps=steps, seed=seed, console=console, family=family)


@app.command()
def land(
    task_dir: Path = typer.Argument(..., help="a task directory: task.yaml plus its data (or an adapter)"),
    storage: str | None = STORAGE,
    kind: str = typer.Option("dataset", help="dataset | adapter (a PEFT LoRA directory plus task.yaml)"),
    check: bool = typer.Option(
        True, "--check/--no-check", help="validate the directory before uploading (--no-check: upload as it is)"
    ),
) -> None:
    """Validate a task directory, then upload it to the storage (task.yaml last: it marks the
    landing complete).

    The directory is checked first, as the pipeline will check it (files, task.yaml, rows,
    labels, an adapter's weights): a landing that would be rejected is refused here with the
    reason and nothing is uploaded. What needs the workspace (its base model, the tasks already
    in the chain) is checked when the landing is processed (`share status` shows the outcome)."""
    if not task_dir.is_dir():
        raise CLIError(f"{task_dir} is not a directory", hint="pass a task directory: task.yaml plus its data", code=2)
    if check:
        from pipelines.validate import LandingRejected, precheck_landing  # noqa: PLC0415 - start-up: loads torch

        try:
            precheck_landing(task_dir, kind, task_dir.name)
        except LandingRejected as e:
            raise CLIError(
                f"refused {kind} {task_dir.name}, nothing uploaded: {e.reason}",
                hint="fix the directory and land it again (`python -m pipelines.validate DIR --kind KIND` checks it)",
                code=1,
            ) from None
    s = open_storage_arg(storage)
    key = s.upload_task(task_dir, kind, task_dir.name)
    console.print(f"landed {kind} [bold]{task_dir.name}[/] in {s.describe()} ({key})")


@app.command()
def status(workspace: Path = WORKSPACE) -> None:
    """What became of each landing: processed (its version), rejected (the reason), in progress
    or pending, from the workspace's ledger."""
    ws = open_workspace(workspace)
    rows: list[tuple[str, str, str, str, str]] = []  # (at, key, etag, status, version or reason)
    done: set[tuple[str, str]] = set()
    for key, records in ws.ledger_history().items():
        for etag in dict.fromkeys(r.get("etag") for r in records if isinstance(r.get("etag"), str)):
            rec = ws.seen(key, etag) or {}
            detail = rec.get("version") or rec.get("reason") or ""
            rows.append((rec.get("at", ""), key, etag, rec.get("status", "?"), detail))
            done.add((key, etag))
    later: list[tuple[str, str, str, str, str]] = []
    for j in Journal.open_journals(ws):  # an update under way (or interrupted: `share serve` resumes it)
        prov = j.provenance
        if "key" in prov and (prov["key"], prov.get("etag")) not in done:
            later.append((j.record.opened, prov["key"], str(prov.get("etag", "")), "in progress", f"→ {j.version}"))
            done.add((prov["key"], prov.get("etag")))
    from .watcher import read_record  # noqa: PLC0415 - start-up: loads Prefect

    for key, rec in sorted(read_record(ws.root / WATCHER_LEDGER).items()):
        if (key, rec["etag"]) not in done:
            tries = rec.get("attempts", 1)
            more = f" (announced {tries} times)" if tries > 1 else ""
            later.append(("", key, rec["etag"], "pending", f"announced by `share serve`; no outcome yet{more}"))
    rows = sorted(rows) + later
    out = Console()
    if not rows:
        out.print(f"no landings recorded in {ws.root} yet")
        return
    table = Table(title=f"landings of {ws.root} (HEAD: {ws.head() or 'none'})", box=box.MINIMAL_HEAVY_HEAD)
    for col, kw in (
        ("landing", {"overflow": "fold"}),
        ("kind", {}),
        ("etag", {"no_wrap": True}),
        ("status", {"no_wrap": True}),
        ("version / reason", {"overflow": "fold", "ratio": 1}),
        ("at (UTC)", {"no_wrap": True}),
    ):
        table.add_column(col, **kw)
    style = {"processed": "green", "rejected": "red"}
    for at, key, etag, state, detail in rows:
        kind, task = kind_and_task(key) or ("", key)
        # Text, not markup: a reason may hold brackets ("expected one of ['a', 'b']")
        table.add_row(
            Text(task),
            Text(kind),
            Text(etag[:8]),
            Text(state, style=style.get(state, "yellow")),
            Text(str(detail)),
            Text(at[5:16].replace("T", " ")),
        )
    out.print(table)
    order = dict.fromkeys(["processed", "rejected", "in progress", "pending", *(r[3] for r in rows)])
    out.print(", ".join(f"{n} {s}" for s in order if (n := sum(r[3] == s for r in rows))))


@app.command()
def versions(
    workspace: Path = WORKSPACE, model_name: str = MODEL_NAME, tracking_uri: str | None = TRACKING_URI
) -> None:
    """The registered versions with their aliases, scores and parents."""
    ws = Workspace(workspace)
    uri = _tracking(ws, tracking_uri)
    if uri == ws.tracking_uri:
        ws = open_workspace(workspace)  # its sqlite store: never create one in a mistyped directory
    require_mlflow(uri)
    from pipelines import register  # noqa: PLC0415 - start-up: loads torch and mlflow

    rows = register.list_versions(register.Registry(ws, model_name, uri))
    table = Table(title=f"{model_name} (HEAD: {ws.head()})")
    for col in ("version", "model version", "aliases", "task", "parent", "ACC", "BWT"):
        table.add_column(col)
    for r in rows:
        fmt = lambda v: "" if v is None else f"{float(v):.3f}"  # noqa: E731
        table.add_row(
            r["version"],
            str(r["model_version"]),
            ",".join(r["aliases"]),
            r.get("task") or "",
            r.get("parent") or "",
            fmt(r.get("acc")),
            fmt(r.get("bwt")),
        )
    console.print(table)


@app.command()
def rollback(
    version: str = typer.Argument(..., help="the version to roll back to: v3, 3 or v0003"),
    workspace: Path = WORKSPACE,
    model_name: str = MODEL_NAME,
    reason: str = typer.Option("", help="why (recorded with the rollback run in MLflow)"),
    tracking_uri: str | None = TRACKING_URI,
) -> None:
    """Make VERSION the champion and the base of the next update; verify by re-evaluation.

    An unknown VERSION fails with the list of existing ones; the current champion (when it is
    also HEAD) is a no-op."""
    ws = open_workspace(workspace)
    uri = _tracking(ws, tracking_uri)
    require_mlflow(uri)
    from pipelines import register  # noqa: PLC0415 - start-up: loads torch and mlflow

    reg = register.Registry(ws, model_name, uri)
    version = register.rollback_target(reg, version)
    if register.champion_version(reg) == version and ws.head() == version:
        console.print(f"{version} is already the champion and HEAD: nothing to do")
        return
    require_prefect(prefect_api_url())
    from .continual import rollback as rollback_flow  # noqa: PLC0415 - start-up: loads Prefect

    out = rollback_flow(str(ws.root), version, model_name=model_name, reason=reason, tracking_uri=uri)
    console.print_json(json.dumps(out, default=str))


@app.command(name="eval")
def eval_cmd(version: str = typer.Argument(..., help="v3, 3 or v0003"), workspace: Path = WORKSPACE) -> None:
    """Re-score VERSION on all its tasks and compare with what was recorded."""
    ws = open_workspace(workspace)
    version = version_arg(ws, version)
    if not ws.evaluation_path(version).is_file():
        raise CLIError(
            f"{version} has no evaluation record ({ws.evaluation_path(version).relative_to(ws.root)})",
            hint="only versions the pipeline built and evaluated can be re-scored",
        )
    require_prefect(prefect_api_url())
    from .continual import evaluate_version  # noqa: PLC0415 - start-up: loads Prefect

    console.print_json(json.dumps(evaluate_version(str(ws.root), version)))


@app.command()
def export(
    version: str = typer.Argument(..., help="v3, 3 or v0003"),
    task: str = typer.Argument(..., help="a task of that version (`share info VERSION` lists them)"),
    out: Path = typer.Argument(..., help="the directory to write the PEFT adapter to"),
    workspace: Path = WORKSPACE,
) -> None:
    """Write TASK of VERSION as a standard PEFT LoRA directory."""
    ws = open_workspace(workspace)
    version = version_arg(ws, version)
    from pipelines.params import load_params  # noqa: PLC0415 - start-up: loads torch
    from share_core import state as st  # noqa: PLC0415 - start-up: loads torch
    from share_core.base import load_base  # noqa: PLC0415 - start-up: loads torch
    from share_core.model import ShareModel  # noqa: PLC0415 - start-up: loads torch

    state = st.load(ws.version_dir(version))
    if task not in state.task_names:
        raise CLIError(f"{version} has no task {task!r}; its tasks: {', '.join(state.task_names) or 'none'}", code=2)
    params = load_params(ws.params_path)
    model, _ = load_base(params.base, params.train.seed)
    ShareModel(model, state).export_task(task, out, params.base.family_impl().peft_task_type, base=params.base)
    console.print(f"exported {version}/{task} → {out} (load with peft.PeftModel.from_pretrained)")


@app.command()
def info(
    version: str | None = typer.Argument(None, help="v3, 3 or v0003 (default: HEAD)"), workspace: Path = WORKSPACE
) -> None:
    """A version's manifest summary: tasks, k per layer, storage against one LoRA per task."""
    ws = open_workspace(workspace)
    if version is None:
        version = ws.head()
        if version is None:
            raise CLIError(
                f"the workspace {ws.root} has no versions yet",
                hint="versions appear when landings are processed (`share status`)",
            )
    else:
        version = version_arg(ws, version)
    from share_core import state as st  # noqa: PLC0415 - start-up: loads torch
    from share_core.metrics import accounting  # noqa: PLC0415 - start-up: loads torch

    state = st.load(ws.version_dir(version))
    acct = accounting(state)
    table = Table(title=f"{version} (parent {state.parent}) on {state.base_model_id}")
    for col in ("task", "rank p", "scale", "source"):
        table.add_column(col)
    for t in state.tasks:
        table.add_row(t.name, str(t.rank), f"{t.scale:g}", t.info.get("source", ""))
    console.print(table)
    ks = sorted({tuple(v) for v in acct["k"].values()})
    console.print(
        f"layers {len(state.bases)}, (k_B, k_A) {ks}, φ {state.phi}; stored {acct['share_params']:,} params vs one "
        f"LoRA per task {acct['lora_per_task_params']:,} (×{acct['ratio_vs_lora']:.2f})"
    )


@app.command()
def serve(
    storage: str | None = STORAGE,
    workspace: Path = WORKSPACE,
    model_name: str = MODEL_NAME,
    tracking_uri: str | None = TRACKING_URI,
    poll_seconds: float = typer.Option(5.0, help="watcher polling interval"),
    sqs_queue_url: str | None = typer.Option(None, help="also consume S3 notifications from this SQS queue"),
    train_pool: str | None = typer.Option(
        None, help="run training as its own deployment on this work pool (e.g. share-gpu)"
    ),
    absorb_cron: str = typer.Option("0 * * * *", help="cron schedule of the batch absorb"),
    reeval_cron: str = typer.Option("30 3 * * *", help="cron schedule of the champion's re-evaluation"),
    reconcile_seconds: float = typer.Option(
        60.0,
        help="announce a landing again when it has no outcome this long after its announcement and no run "
        "queued or running for it (doubling with each attempt)",
    ),
    ephemeral: bool = typer.Option(
        False,
        "--ephemeral",
        help="no PREFECT_API_URL: run a temporary Prefect server inside this process (gone when it stops)",
    ),
) -> None:
    """Serve the deployments and run the storage watcher (needs a Prefect server).

    Deployments: event-triggered continual update, cron batch-absorb and re-evaluation,
    rollback, evaluate-version. The Prefect API comes from PREFECT_API_URL (e.g. `share stack
    up`, then eval "$(share stack env)"); --ephemeral runs a temporary one instead."""
    s = open_storage_arg(storage)
    api = prefect_api_url()
    if api and ephemeral:
        raise CLIError(
            f"--ephemeral conflicts with PREFECT_API_URL={redact_url(api)}: unset it, or drop --ephemeral to use "
            "that server",
            code=2,
        )
    if not api and not ephemeral:
        raise CLIError(
            'no Prefect server: set PREFECT_API_URL (`share stack up`, then eval "$(share stack env)"), '
            "or pass --ephemeral for a temporary one",
            code=2,
        )
    require_prefect(api)

    ws = Workspace(workspace)
    uri = _tracking(ws, tracking_uri)
    require_mlflow(uri)

    from prefect import serve as prefect_serve  # noqa: PLC0415 - start-up: loads Prefect

    from pipelines import lineage  # noqa: PLC0415 - start-up: loads torch

    from .continual import recover_updates  # noqa: PLC0415 - start-up: loads Prefect
    from .deployments import (  # noqa: PLC0415 - start-up: loads Prefect
        build_deployments,
        crash_dead_runs,
        deploy_train_version,
        deployment_name,
        landings_in_flight,
        quiet_queueing,
    )
    from .lock import chain_id, reset_stale_slots  # noqa: PLC0415 - start-up: loads Prefect
    from .watcher import Watcher  # noqa: PLC0415 - start-up: loads Prefect

    lineage.init_workspace(ws.root, storage_url=storage)  # a DVC remote beside the landings, if it has none
    chain = chain_id(ws)
    train_deployment = None
    if train_pool:
        train_deployment = deploy_train_version(train_pool)
        console.print(
            f"training runs on work pool [bold]{train_pool}[/] (start a worker: prefect worker start --pool "
            f"{train_pool})"
        )
    deployments = build_deployments(
        storage,
        str(ws.root),
        model_name=model_name,
        tracking_uri=uri,
        absorb_cron=absorb_cron,
        reeval_cron=reeval_cron,
        train_deployment=train_deployment,
        chain=chain,
    )
    console.print(f"chain [bold]{chain}[/]: deployments <flow>/{deployment_name(chain)}")
    stop = threading.Event()
    sqs = None
    if sqs_queue_url:
        import boto3  # noqa: PLC0415 - start-up: boto3 only with --sqs-queue-url

        sqs = boto3.client("sqs")
    watcher = Watcher(s, storage, ws.root / WATCHER_LEDGER, chain=chain, outcome=ws.seen)
    # recovery after a crash (of serve itself, or of the runs it served):
    # 1. runs a dead serve left Pending/Running end Crashed (frees the deployment's slot now) and the
    #    chain slot a dead holder still leases is released (no wait for a lease to expire)
    for rid in crash_dead_runs(chain, "the `share serve` running this flow run died; recovery took the landing over"):
        console.print(f"ended flow run {rid} of a dead `share serve` as Crashed")
    if reset_stale_slots(ws):
        console.print("freed the chain's concurrency slot held by a dead process")
    # 2. updates a crash left half-done: stale ones are discarded and, like resumable ones, run again
    announced = set()
    for provenance in recover_updates(str(ws.root), model_name, uri):
        landing = watcher.storage.landing(provenance["key"]) if "key" in provenance else None
        if landing is not None and landing.etag == provenance["etag"]:  # (its ledger may say processed: "mark" left)
            console.print(f"running the interrupted update of [bold]{landing.key}[/] again")
            watcher.announce(landing)
            announced.add(landing.key)

    # 3. every landing announced without an outcome (killed before its journal opened, an event
    #    lost, a fault that outlasted the retries) is announced again, now and on every poll
    def in_flight() -> set[str]:
        return landings_in_flight(chain) | announced

    for landing in watcher.reconcile(0.0, in_flight):
        console.print(f"announced [bold]{landing.key}[/] again: it had no outcome")
    announced.clear()
    thread = threading.Thread(
        target=watcher.run,
        args=(poll_seconds, stop, sqs, sqs_queue_url),
        kwargs={
            "reconcile_seconds": reconcile_seconds,
            "in_flight": in_flight,
            "each_round": lambda: landings_in_flight(chain),  # queued runs get their landing's name
        },
        daemon=True,
    )
    thread.start()
    quiet_queueing()
    try:
        prefect_serve(*deployments)
    finally:
        stop.set()


stack_app = typer.Typer(
    no_args_is_help=True,
    help="The local stack: S3 (moto, on disk), MLflow server, Prefect server on 127.0.0.1; durable in --data-dir.",
)
app.add_typer(stack_app, name="stack")
DATA_DIR = typer.Option(Path(".share-stack"), help="where the stack keeps its data, logs and pids")
S3_PORT = typer.Option(None, help="S3 port (default: the data dir's last `up`, else 9100)")
MLFLOW_PORT = typer.Option(None, help="MLflow port (default: the data dir's last `up`, else 5000)")
PREFECT_PORT = typer.Option(None, help="Prefect port (default: the data dir's last `up`, else 4200)")


def _stack_table(cfg) -> Table:
    table = Table(title=f"local stack ({cfg.data_dir})")
    for col in ("service", "pid", "running", "healthy", "url"):
        table.add_column(col)
    for name, s in stack.status(cfg).items():
        table.add_row(name, str(s.get("pid") or ""), str(s.get("running")), str(s.get("healthy")), s.get("url", ""))
    return table


@stack_app.command("up")
def stack_up(
    data_dir: Path = DATA_DIR,
    s3_port: int | None = S3_PORT,
    mlflow_port: int | None = MLFLOW_PORT,
    prefect_port: int | None = PREFECT_PORT,
) -> None:
    """Start the stack (what is not running yet) and wait until it is healthy.

    stdout gets only `export KEY=value` lines, so `eval "$(share stack up)"` configures the
    shell; progress and the status table go to stderr."""
    cfg = stack.config(data_dir, s3_port=s3_port, mlflow_port=mlflow_port, prefect_port=prefect_port)
    err = Console(stderr=True)
    err.print(f"starting the local stack in {cfg.data_dir} (up to a minute the first time) …")
    stack.up(cfg)
    err.print(_stack_table(cfg))
    err.print("moto accepts any credentials: the AWS values exported are its dummies, never real ones")
    typer.echo(stack.shell_exports(cfg), nl=False)


@stack_app.command("env")
def stack_env(data_dir: Path = DATA_DIR) -> None:
    """Print `export KEY=value` lines for the stack's clients: eval "$(share stack env)".

    MLflow, Prefect and S3 endpoints, SHARE_STORAGE and moto's dummy AWS credentials; values
    are shell-quoted. A note on stderr says when the stack is not running."""
    cfg = stack.config(data_dir)
    typer.echo(stack.shell_exports(cfg), nl=False)
    down = [name for name, s in stack.status(cfg).items() if not s["healthy"]]
    if down:
        typer.echo(f"note: not running: {', '.join(down)} (start the stack with `share stack up`)", err=True)


@stack_app.command("down")
def stack_down(data_dir: Path = DATA_DIR) -> None:
    """Stop every service of the stack (what it stores stays in --data-dir for the next `up`)."""
    stack.down(stack.config(data_dir))
    console.print("stack stopped")


@stack_app.command("status")
def stack_status(data_dir: Path = DATA_DIR) -> None:
    """Each service's pid, whether it runs and answers its health check, and its URL."""
    console.print(_stack_table(stack.config(data_dir)))


if __name__ == "__main__":
    app()
