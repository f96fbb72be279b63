"""Prefect flows of the continual chain. Orchestration only: every step is a pipelines/ call;
Prefect adds retries on transient storage/registry errors, parallel evaluation, and runs.

continual_update   one landing → validate → ingest → train/absorb → evaluate → lineage → register
                   → HEAD → push → ledger, as a journaled transaction (pipelines.journal) that a
                   re-run resumes, or discards when its parent is no longer HEAD
batch_absorb       every pending adapter landing → one absorbed version (journaled the same way)
recover_updates    at `share serve` start: discard stale updates, end abandoned rollback runs, list
                   the landings to run again (resumable updates, and discarded ones: processed afresh)
evaluate_version   re-score a version and compare with what was recorded
rollback           move champion + HEAD to a version, verify it by re-evaluation
train_version      the training step alone: the "GPU job" deployment on a work pool

Why one module of ~600 lines: these are the flows of one chain, and they share its placement
choices (Prefect tasks with retries, training in process or on a pool, evaluation in process or on
Dask) and its crash handling (take-over, discard, marking dead runs Crashed); the steps themselves
are pipelines.transaction's.
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.runtime import deployment, flow_run
from prefect.states import Failed
from prefect.utilities.annotations import quote

from pipelines import evaluate as ev
from pipelines import register, transaction
from pipelines.journal import DISCARDED, OPEN, PUBLISHED, ROLLBACK, Journal, fault_point, next_version
from pipelines.params import EvalParams, load_params
from pipelines.register import DEFAULT_MODEL_NAME, Registry
from pipelines.storage import Landing, kind_and_task, open_storage, redact_url
from pipelines.update import build_version
from pipelines.validate import LandingRejected, validate_landing
from pipelines.workspace import Workspace
from share_core import state as st

from .lock import chain_lock, crash_runs

TRANSIENT = dict(retries=2, retry_delay_seconds=2)


@task(**TRANSIENT)
def find_landing(storage_url: str, key: str) -> Landing | None:
    return open_storage(storage_url).landing(key)


@task(**TRANSIENT)
def download(storage_url: str, landing: Landing, dest: str) -> str:
    open_storage(storage_url).download(landing, Path(dest))
    return dest


@task(**TRANSIENT)
def mark(storage_url: str, landing: Landing, status: str, detail: dict) -> None:
    open_storage(storage_url).mark(landing, status, detail)


@task
def validate(workspace: str, landing: Landing, local: str) -> str | None:
    """The rejection reason, or None: checked against the HEAD version; nothing changes.
    A rejection is an outcome of the run, not a failure of the task."""
    ws = Workspace(workspace)
    head = ws.head()
    manifest = st.read_manifest(ws.version_dir(head)) if head else None
    try:
        validate_landing(
            Path(local), landing.kind, landing.task, manifest, load_params(ws.params_path).base, list(landing.files)
        )
    except LandingRejected as e:
        return e.reason
    return None


def reject(ws: Workspace, storage_url: str, landing: Landing, reason: str) -> dict:
    get_run_logger().warning("rejected %s: %s", landing.key, reason)
    mark(storage_url, landing, "rejected", {"reason": reason})
    ws.record_landing(landing.key, {"etag": landing.etag, "status": "rejected", "reason": reason})
    return {"status": "rejected", "reason": reason}


class _RunLogHandler(logging.Handler):
    """Forwards share_core's training progress (loss every few steps) to the flow run's logs."""

    def __init__(self, run_logger) -> None:
        super().__init__(logging.INFO)
        self.run_logger = run_logger

    def emit(self, record: logging.LogRecord) -> None:
        self.run_logger.log(record.levelno, record.getMessage())


def _train_run_name() -> str:
    p = flow_run.parameters
    return f"train {p.get('version')} ← {p.get('kind')} {', '.join(p.get('landings') or [])}"


@flow(name="train-version", log_prints=True, flow_run_name=_train_run_name)
def train_version(
    workspace: str,
    landings: list[str],
    kind: str,
    version: str,
    parent: str | None = None,
    provenance: dict | None = None,
) -> dict:
    """The training/absorb step. Runs in-process, or as its own deployment on a (GPU) work pool;
    share_core picks CUDA when the worker has it."""
    ws = Workspace(workspace)
    print(
        f"building {version} in process {os.getpid()} (parent {os.getppid()})"
    )  # where training runs (a pool's worker)
    progress, handler = logging.getLogger("share_core.train"), _RunLogHandler(get_run_logger())
    level, propagate = progress.level, progress.propagate
    progress.addHandler(handler)
    progress.setLevel(logging.INFO)
    progress.propagate = False  # into the run's logs only, not once more on the console
    try:
        build_version(
            [ws.landings / n for n in landings],
            kind,
            ws.version_dir(version),
            ws.version_dir(parent) if parent else None,
            load_params(ws.params_path),
            provenance,
        )
    finally:
        progress.removeHandler(handler)
        progress.setLevel(level)
        progress.propagate = propagate
    return {"version": version}


@task
def score_shard(workspace: str, version: str, tasks: list[str]) -> list[dict]:
    """One shard of tasks, scored where the task runs (in-process or a Dask worker) with one
    load of the version per worker process."""
    return ev.score_tasks(Workspace(workspace), version, tasks)


@flow(name="score-shards")
def score_shards(workspace: str, version: str, tasks: list[str], workers: int) -> list[dict]:
    """Fan the tasks out in `workers` shards on this flow's task runner (Dask when sent there)."""
    futures = [score_shard.submit(workspace, version, shard) for shard in ev.shards(tasks, workers)]
    return [r for f in futures for r in f.result()]


def dask_address(cfg: EvalParams) -> str | None:
    """The Dask scheduler evaluation is sent to: $SHARE_DASK_ADDRESS, else params' evaluate.dask_address."""
    return os.environ.get("SHARE_DASK_ADDRESS") or cfg.dask_address


def score(workspace: str, version: str, tasks: list[str], cfg: EvalParams) -> list[dict]:
    """Score `tasks` of `version`: on the Dask cluster when one is configured, else in this
    process in one shard (one model in memory, however many tasks)."""
    if not tasks:
        return []
    address = dask_address(cfg)
    if address:
        from prefect_dask import DaskTaskRunner  # noqa: PLC0415 - prefect_dask loads dask.distributed (~1 s), needed only with a Dask cluster

        return score_shards.with_options(task_runner=DaskTaskRunner(address=address))(
            workspace, version, tasks, cfg.workers
        )
    return score_shard(workspace, version, tasks)


@task(cache_policy=NO_CACHE)
def summarize(workspace: str, version: str, results: list[dict], certified: dict, mode: str) -> ev.EvaluationRecord:
    return ev.summarize(Workspace(workspace), version, results, certified, mode)


def evaluate_all(workspace: str, version: str) -> dict:
    """Re-score the tasks the version changed, certify the others (pipelines.evaluate.plan)."""
    ws = Workspace(workspace)
    cfg = load_params(ws.params_path).evaluate
    p = ev.plan(ws, version, cfg)
    scored = score(workspace, version, p["score"], cfg)
    # quoted: Prefect walks a task's inputs looking for futures, ~0.4 s CPU for 1,000 certified entries
    record = summarize(workspace, version, quote(scored), quote(p["certified"]), cfg.mode)
    get_run_logger().info(
        "%s: re-scored %d task(s), %d certified unchanged", version, len(record.rescored), len(record.certified)
    )
    return record


def _flow_run_id() -> str | None:
    return flow_run.id


def _landing_run_name_for(key: str) -> str:
    kind, task = kind_and_task(key) or ("landing", key)
    return f"landing: {kind} {task}"


def _landing_run_name() -> str:
    """A continual-update run's name before its version is planned: what landed (the watcher
    gives queued runs the same name)."""
    return _landing_run_name_for(str(flow_run.parameters.get("key", "")))


def _best_effort(what: str, fn) -> None:
    """Run names and artifacts are for people: an API hiccup there never fails an update."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        get_run_logger().warning("could not %s: %s", what, e)


def _rename_run(name: str) -> None:
    """Once the version is planned the run says what it builds: `v0003 ← dataset tense`."""
    run_id = _flow_run_id()
    if run_id is None:
        return

    def rename() -> None:
        with get_client(sync_client=True) as c:
            c.update_flow_run(flow_run_id=run_id, name=name)

    _best_effort("rename the flow run", rename)


def _version_artifact(reg: Registry, out: dict) -> None:
    """A markdown artifact of the run: the version, its gate, ACC/BWT and the tasks scored now
    (certified ones are counted, not listed: the artifact stays O(changed tasks))."""
    rec = ev.read_record(reg.ws, out["version"])
    gate = out.get("gate", {})
    fmt = lambda x: "—" if x is None else f"{x:.3f}"  # noqa: E731
    rows = "\n".join(f"| {t} | {fmt(rec.scores[t])} | {fmt(rec.majority[t])} |" for t in rec.rescored[:50])
    uri = redact_url(reg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or reg.uri)
    link = (
        f"{uri.rstrip('/')}/#/models/{reg.model_name}/versions/{out['model_version']}"
        if uri.startswith("http")
        else f"model version {out['model_version']} in {uri}"
    )
    acc = "n/a" if rec.acc is None else f"{rec.acc:.3f}"
    md = (
        f"# {out['version']} ← {rec.task}\n\nParent {rec.parent or '—'}; {len(rec.tasks)} tasks: re-scored "
        f"{len(rec.rescored)}, certified unchanged {len(rec.certified)}.\n\n"
        f"**ACC {acc}, BWT {rec.bwt:+.3f}**. Forgetting gate: {'passed' if gate.get('passed') else 'failed'} "
        f"against {gate.get('against') or 'no champion'}"
        f" (worst drop {gate.get('worst_drop', 0.0):+.3f}); champion moved: {out.get('promoted')}.\n\nMLflow: "
        f"{link}\n\n"
        f"| task scored now | score | baseline |\n|---|---|---|\n{rows}\n"
    )
    create_markdown_artifact(
        md, key=f"share-{out['version']}", description=f"{out['version']}: scores, gate, MLflow link"
    )


def _mark_crashed(
    run_ids: list[str], message: str = "the process running this update died; a later run took the update over"
) -> None:
    """Flow runs of a crashed update that the server still shows Pending/Running end Crashed,
    and so do their subflows (train-version in-process). Best effort: a server hiccup leaves
    them for `share serve`'s start-up recovery."""
    _best_effort("end the crashed update's runs", lambda: crash_runs(run_ids, message))


def end_abandoned_rollbacks(reg: Registry) -> list[str]:
    """Rollbacks killed on the way: their MLflow runs still RUNNING end FAILED and their journals
    close (a rollback is run again by whoever asked for it, never resumed behind their back).
    Called under the chain lock (every rollback runs under it, so none of them is alive)."""
    for j in Journal.open_journals(reg.ws, rollbacks=True):
        j.close(DISCARDED, reason="killed before it finished; the next rollback decides where champion and HEAD go")
    c = reg.client()
    exp = c.get_experiment_by_name(reg.model_name)
    if exp is None:
        return []
    runs = c.search_runs(
        [exp.experiment_id], filter_string="tags.`share.event` = 'rollback' and attributes.status = 'RUNNING'"
    )
    for r in runs:
        c.set_terminated(r.info.run_id, "FAILED")
    return [r.info.run_id for r in runs]


def discard(reg: Registry, j: Journal, *, reason: str) -> None:
    """A stale update (its parent is no longer HEAD): what it published is undone, its version
    is removed from the workspace and the lineage, and the journal says why."""
    get_run_logger().warning("discarding the update of %s to %s: %s", j.provenance, j.version, reason)
    transaction.undo(reg, j, reason=reason)
    _mark_crashed(
        [r for r in j.flow_runs if r != _flow_run_id()],
        f"its update was discarded: {reason}; the landing is processed afresh on the new HEAD",
    )


@flow(name="recover-updates", log_prints=True)
def recover_updates(
    workspace: str, model_name: str = DEFAULT_MODEL_NAME, tracking_uri: str | None = None
) -> list[dict]:
    """Open journals after a crash: the provenance of each landing to run again — updates that
    can resume (their parent is still HEAD) and single-landing updates discarded because their
    parent moved (processed afresh on the new HEAD, as a re-run by hand does; a discarded batch's
    adapters are simply pending again). Rollback runs a kill left RUNNING in MLflow are ended.
    `share serve` runs this when it starts and announces what it returns."""
    ws = Workspace(workspace)
    reg = Registry(ws, model_name, tracking_uri)
    again = []
    with chain_lock(ws):
        _best_effort("end abandoned rollback runs", lambda: end_abandoned_rollbacks(reg))
        for j in Journal.open_journals(ws):
            if j.resumable(ws.head()):
                again.append(j.provenance)
            else:
                discard(reg, j, reason=f"its parent {j.parent} is no longer HEAD ({ws.head()})")
                if j.record.key is not None:
                    again.append(j.provenance)
    return again


# the steps that talk to a server run as Prefect tasks with retries; the others in the flow
_AS_TASK = {
    step: task(name=step.name, cache_policy=NO_CACHE, **TRANSIENT)(step.do)
    for step in transaction.PLAN + transaction.ROLLBACK
    if step.remote
}


def _execute(step: transaction.Step, u: transaction.Update) -> dict | None:
    # quoted: Prefect would otherwise walk the whole update (journal, landings) looking for futures
    return _AS_TASK[step](quote(u)) if step.remote else step.do(u)


def _update(
    reg: Registry,
    j: Journal,
    storage_url: str,
    landings: list[Landing],
    tolerance: float | None,
    train_deployment: str | None = None,
    local: dict[str, str] | None = None,
) -> transaction.Update:
    """The update's context, with this flow's placements: training in process (a subflow) or
    on the training deployment's work pool; evaluation in process or on Dask."""

    def build(u: transaction.Update) -> None:
        params = dict(
            workspace=str(u.ws.root),
            landings=u.names,
            kind=u.journal.kind,
            version=u.version,
            parent=u.journal.parent,
            provenance=u.journal.provenance,
        )
        if not train_deployment:
            train_version(**params)
            return
        run = run_deployment(train_deployment, parameters=params, timeout=3600)
        if not run.state.is_completed():
            raise RuntimeError(f"training deployment {train_deployment} ended {run.state.name}")

    return transaction.Update(
        ws=reg.ws,
        journal=j,
        registry=reg,
        storage_url=storage_url,
        landings=landings,
        tolerance=tolerance,
        local=local or {},
        build=build,
        evaluate=lambda u: evaluate_all(str(u.ws.root), u.version),
    )


# what an update reports as its parts' seconds (the benches and `share land` read them)
PARTS = {
    "train": ("build",),
    "stage": ("stage",),
    "evaluate": ("evaluate",),
    "register": ("lineage", "run", "model_version", "alias"),
    "push": ("head", "push"),
    "outcome": ("ledger", "mark"),
}


def _publish(u: transaction.Update) -> dict:
    """Every step after ingest, journaled (pipelines.transaction); the journal closes and the
    run gets its artifact."""
    took = transaction.run(u, transaction.PUBLISH, _execute)
    u.journal.close(PUBLISHED)
    seconds = {part: sum(took.get(s, 0.0) for s in steps) for part, steps in PARTS.items()}
    seconds["total"] = sum(took.values())
    run, mv = u.journal.result("run"), u.journal.result("model_version")["model_version"]
    out = {
        "status": "processed",
        "version": u.version,
        **{k: u.journal.result("evaluate")[k] for k in ("acc", "bwt")},
        "seconds": seconds,
        **register.registration(u.version, mv, run["run_id"], run["gate"]),
    }
    _best_effort("write the version's artifact", lambda: _version_artifact(u.registry, out))
    return out


def _take_over(reg: Registry, provenance: dict) -> Journal | None:
    """The open journal of this landing, if its update can resume (crashed flow runs that
    worked on it are marked Crashed); a stale one is discarded (None)."""
    ws = reg.ws
    j = Journal.find(ws, provenance)
    if j is None or j.status != OPEN:
        return None
    if not j.resumable(ws.head()):
        discard(reg, j, reason=f"its parent {j.parent} is no longer HEAD ({ws.head()})")
        return None
    get_run_logger().info(
        "resuming the update of %s to %s after %s",
        provenance,
        j.version,
        j.record.last_step or "nothing",
    )
    _mark_crashed(j.join(_flow_run_id()))
    return j


@flow(name="continual-update", log_prints=True, flow_run_name=_landing_run_name)
def continual_update(
    key: str,
    storage_url: str,
    workspace: str,
    etag: str | None = None,
    model_name: str = DEFAULT_MODEL_NAME,
    tolerance: float | None = None,  # None: params.yaml evaluate.gate_tolerance
    tracking_uri: str | None = None,
    train_deployment: str | None = None,
) -> dict:
    """Process one landing, exactly once per (key, ETag), as a journaled transaction that a
    re-run resumes. `etag` is the one the event saw; the landing's current content is what gets
    processed (an overwrite has its own event)."""
    reg = Registry(Workspace(workspace), model_name, tracking_uri)
    with chain_lock(reg.ws):
        out = _continual_update(key, etag, storage_url, workspace, reg, tolerance, train_deployment)
    return _served_outcome(out)


def _served_outcome(out: dict):
    """A rejected landing's run ends Failed with the reason when it runs as a deployment (a
    served run is red in the UI, not a green "Completed"); a direct call gets the dict. A
    rejection is recorded before this: nothing retries it, reconcile sees its outcome."""
    if out.get("status") == "rejected" and deployment.id:
        return Failed(message=f"rejected: {out['reason']}", data=out)
    return out


def _continual_update(key, etag, storage_url, workspace, reg: Registry, tolerance, train_deployment) -> dict:
    fault_point("lock")
    log = get_run_logger()
    ws = reg.ws
    landing = find_landing(storage_url, key)
    if landing is None:
        raise ValueError(f"no complete landing with task.yaml key {key!r} in {open_storage(storage_url).describe()}")
    if etag and etag != landing.etag:
        log.info(
            "landing %s changed since its event (etag %s → %s): processing the current one",
            key,
            etag[:8],
            landing.etag[:8],
        )
    provenance = {"key": key, "etag": landing.etag}
    j = _take_over(reg, provenance)
    seen = ws.seen(key, landing.etag)  # a processed record wins over any later rejection of the same content
    if j is None and seen:
        log.info("landing %s (etag %s) already %s: nothing to do", key, landing.etag[:8], seen["status"])
        return {"status": "duplicate", "version": seen.get("version"), "previous": seen}
    if j is None or not j.done("ingest"):
        with tempfile.TemporaryDirectory() as tmp:
            local = download(storage_url, landing, tmp)
            reason = validate(workspace, landing, local)
            if reason:
                if j is not None:  # a resumed update that no longer validates releases its planned version
                    j.close(DISCARDED, reason=reason)
                return reject(ws, storage_url, landing, reason)
            if j is None:
                j = Journal.open(ws, provenance, landing.kind, next_version(ws), ws.head(), _flow_run_id())
            u = _update(reg, j, storage_url, [landing], tolerance, train_deployment, {landing.key: local})
            transaction.run(u, transaction.LAND, _execute)
    else:
        u = _update(reg, j, storage_url, [landing], tolerance, train_deployment)
    _rename_run(f"{j.version} ← {landing.kind} {landing.task}")
    out = _publish(u)
    log.info(
        "%s ← %s %s: ACC %s, BWT %+.3f, champion moved: %s",
        out["version"],
        landing.kind,
        landing.task,
        "n/a" if out["acc"] is None else f"{out['acc']:.3f}",
        out["bwt"],
        out.get("promoted"),
    )
    return out


@flow(name="batch-absorb", log_prints=True)
def batch_absorb(
    storage_url: str,
    workspace: str,
    model_name: str = DEFAULT_MODEL_NAME,
    tolerance: float | None = None,  # None: params.yaml evaluate.gate_tolerance
    tracking_uri: str | None = None,
) -> dict:
    """Absorb every pending adapter landing in one merge (asynchronous learning)."""
    reg = Registry(Workspace(workspace), model_name, tracking_uri)
    with chain_lock(reg.ws):
        return _batch_absorb(storage_url, workspace, reg, tolerance)


def _resume_batch(reg: Registry, storage_url: str, tolerance: float | None) -> dict | None:
    """A batch absorb a crash left half-done is finished (or discarded) before anything new is
    taken: its landings are the ones it recorded, whatever is pending now."""
    for open_j in [x for x in Journal.open_journals(reg.ws) if x.record.batch]:
        j = _take_over(reg, open_j.provenance)
        if j is None:
            continue
        if not j.done("ingest"):  # nothing of it exists yet: its adapters are simply pending again
            j.close(DISCARDED, reason="interrupted before its landings were ingested")
            continue
        landings = []
        for item in j.record.batch:
            key, etag = item.rsplit("@", 1)
            landings.append(Landing(key=key, etag=etag, kind="adapter", task=key.rstrip("/").split("/")[-2]))
        out = _finish_batch(_update(reg, j, storage_url, landings, tolerance))
        return {**out, "rejected": {}, "resumed": True}
    return None


def _finish_batch(u: transaction.Update) -> dict:
    """The tail of a batch absorb, first run or resumed: the run says what it builds, then the
    journaled steps."""
    _rename_run(f"{u.version} ← {len(u.landings)} adapter(s)")
    return {**_publish(u), "absorbed": u.names}


def _batch_absorb(storage_url, workspace, reg: Registry, tolerance) -> dict:
    ws = reg.ws
    resumed = _resume_batch(reg, storage_url, tolerance)
    if resumed is not None:
        return resumed
    pending = [
        lnd
        for lnd in open_storage(storage_url).list_landings()
        if lnd.kind == "adapter" and ws.seen(lnd.key, lnd.etag) is None
    ]
    accepted, rejected = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for lnd in pending:
            local = download(storage_url, lnd, str(Path(tmp) / lnd.task))
            reason = validate(workspace, lnd, local)
            if reason:
                rejected[lnd.key] = reject(ws, storage_url, lnd, reason)["reason"]
                continue
            accepted[lnd.key] = (lnd, local)
        if not accepted:
            return {"status": "nothing-to-absorb", "rejected": rejected}
        provenance = {"batch": sorted(f"{lnd.key}@{lnd.etag}" for lnd, _ in accepted.values())}
        j = _take_over(reg, provenance) or Journal.open(
            ws, provenance, "adapter", next_version(ws), ws.head(), _flow_run_id()
        )
        landings = [lnd for lnd, _ in accepted.values()]
        local = {key: path for key, (_, path) in accepted.items()}
        u = _update(reg, j, storage_url, landings, tolerance, local=local)
        transaction.run(u, transaction.LAND, _execute)
    return {**_finish_batch(u), "rejected": rejected}


@flow(name="evaluate-version", log_prints=True)
def evaluate_version(workspace: str, version: str, tolerance: float = 1e-6) -> dict:
    """Re-score every task of `version` and compare with its record: drift means the stored
    version, the data or the code changed; a certified task that moved means a wrong certificate."""
    ws = Workspace(workspace)
    recorded = ev.read_record(ws, version)
    if recorded is None:
        raise FileNotFoundError(
            f"{version} has no evaluation record ({ws.evaluation_path(version).relative_to(ws.root)})"
        )
    result = ev.compare(
        recorded, score(workspace, version, recorded.tasks, load_params(ws.params_path).evaluate), tolerance
    )
    if result["certificates_wrong"]:
        get_run_logger().warning(
            "%s: tasks certified unchanged now score differently: %s", version, result["certificates_wrong"]
        )
    return result


@flow(name="rollback", log_prints=True)
def rollback(
    workspace: str,
    version: str,
    model_name: str = DEFAULT_MODEL_NAME,
    reason: str = "",
    tracking_uri: str | None = None,
) -> dict:
    """Champion and HEAD move to `version` (recorded in MLflow), then it is re-evaluated. The
    moves are journaled steps (pipelines.transaction.ROLLBACK); a rollback killed on the way is
    closed by the next rollback or serve's recovery, which also end its MLflow run."""
    ws = Workspace(workspace)
    reg = Registry(ws, model_name, tracking_uri)
    version = register.rollback_target(reg, version)
    with chain_lock(ws):
        ended = end_abandoned_rollbacks(reg)
        if ended:
            get_run_logger().warning("ended %d rollback run(s) a killed rollback left RUNNING", len(ended))
        moved = register.rollback_plan(reg, version)
        if not moved["noop"]:
            provenance = {"rollback": version, "from": moved["previous"], "id": uuid.uuid4().hex}
            j = Journal.open(ws, provenance, ROLLBACK, version, ws.head(), _flow_run_id())
            u = transaction.Update(ws=ws, journal=j, registry=reg, reason=reason)
            transaction.run(u, transaction.ROLLBACK, _execute)
            j.close(PUBLISHED)
            moved["run_id"] = j.result("run")["run_id"]
    check = evaluate_version(workspace, version)
    return {**moved, "verified": check["matches"], "worst_abs_diff": check["worst_abs_diff"]}
