"""Prefect flows of the continual chain. Orchestration only: every step is a pipelines/ call;
Prefect adds retries on transient storage/registry errors, parallel evaluation, and runs.

continual_update   one landing → validate → ingest → train/absorb → evaluate all → lineage → register
batch_absorb       every pending adapter landing → one absorbed version
evaluate_version   re-score a version and compare with what was recorded
rollback           move champion + HEAD to a version, verify it by re-evaluation
train_version      the training step alone: the "GPU job" deployment on a work pool
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from prefect import flow, get_run_logger, task, unmapped
from prefect.deployments import run_deployment

from pipelines import evaluate as ev
from pipelines import lineage, register
from pipelines.storage import Landing, open_storage
from pipelines.update import build_version, load_params
from pipelines.validate import LandingRejected, validate_landing
from pipelines.workspace import Workspace
from share_core import state as st

TRANSIENT = dict(retries=2, retry_delay_seconds=2)


@task(**TRANSIENT)
def find_landing(storage_url: str, key: str) -> Landing | None:
    return next((lnd for lnd in open_storage(storage_url).list_landings() if lnd.key == key), None)


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
        validate_landing(Path(local), landing.kind, landing.task, manifest, load_params(ws.root / "params.yaml").model_id, list(landing.files))
    except LandingRejected as e:
        return e.reason
    return None


def reject(ws: Workspace, storage_url: str, landing: Landing, reason: str) -> dict:
    get_run_logger().warning("rejected %s: %s", landing.key, reason)
    mark(storage_url, landing, "rejected", {"reason": reason})
    ws.record_landing(landing.key, {"etag": landing.etag, "status": "rejected", "reason": reason})
    return {"status": "rejected", "reason": reason}


@task
def ingest(workspace: str, landing: Landing, local: str) -> str:
    """Move the validated landing into the workspace (DVC-tracked); returns its dir name."""
    ws = Workspace(workspace)
    name = f"{landing.task}-{landing.etag[:8]}"
    dest = ws.landings / name
    if not dest.exists():
        ws.landings.mkdir(parents=True, exist_ok=True)
        tmp = ws.landings / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(local, tmp)
        tmp.rename(dest)
    lineage.track_landing(ws.root, name)
    return name


@flow(name="train-version", log_prints=True)
def train_version(workspace: str, landings: list[str], kind: str, version: str, parent: str | None = None, provenance: dict | None = None) -> dict:
    """The training/absorb step. Runs in-process, or as its own deployment on a (GPU) work pool;
    share_core picks CUDA when the worker has it."""
    ws = Workspace(workspace)
    existing = _version_for(ws, provenance)
    if existing:
        return {"version": existing, "reused": True}
    build_version([ws.landings / n for n in landings], kind, ws.version_dir(version), ws.version_dir(parent) if parent else None, load_params(ws.root / "params.yaml"), provenance)
    return {"version": version, "reused": False}


def _version_for(ws: Workspace, provenance: dict | None) -> str | None:
    """A version already built from exactly this landing (a retried run resumes, never duplicates)."""
    if not provenance:
        return None
    for v in ws.version_ids():
        if st.read_manifest(ws.version_dir(v))["extra"].get("provenance") == provenance:
            return v
    return None


@task
def score(workspace: str, version: str, task_name: str) -> dict:
    return ev.score_task(Workspace(workspace), version, task_name)


@task
def summarize(workspace: str, version: str, results: list[dict]) -> dict:
    return ev.summarize(Workspace(workspace), version, results)


def evaluate_all(workspace: str, version: str) -> dict:
    """Score every task of the version in parallel (mapped), then summarize."""
    tasks = [t["name"] for t in st.read_manifest(Workspace(workspace).version_dir(version))["tasks"]]
    futures = score.map(unmapped(workspace), unmapped(version), tasks)
    return summarize(workspace, version, [f.result() for f in futures])


@task(**TRANSIENT)
def record_and_register(workspace: str, version: str, model_name: str, landing: dict, tolerance: float, tracking_uri: str | None) -> dict:
    ws = Workspace(workspace)
    lin = lineage.record_version(ws.root, version, f"{version}: {landing.get('task', 'update')}")
    return register.register_version(ws, version, model_name=model_name, landing=landing, lineage=lin, tolerance=tolerance, tracking_uri=tracking_uri)


@task(**TRANSIENT)
def push_lineage(workspace: str) -> None:
    lineage.push(Workspace(workspace).root)


def _build_and_publish(workspace: str, names: list[str], kind: str, provenance: dict, model_name: str, tolerance: float, tracking_uri: str | None, train_deployment: str | None) -> dict:
    """Shared tail of every update: train/absorb → stage → evaluate → register → HEAD → push."""
    ws = Workspace(workspace)
    t0 = time.perf_counter()
    parent, version = ws.head(), ws.next_version_id()
    params = dict(workspace=workspace, landings=names, kind=kind, version=version, parent=parent, provenance=provenance)
    if train_deployment:
        run = run_deployment(train_deployment, parameters=params, timeout=3600)
        if not run.state.is_completed():
            raise RuntimeError(f"training deployment {train_deployment} ended {run.state.name}")
        built = run.state.result()
    else:
        built = train_version(**params)
    t_train = time.perf_counter()
    version = built["version"]
    lineage.add_version_stage(ws.root, version, names, kind, parent)
    scores = evaluate_all(workspace, version)
    t_eval = time.perf_counter()
    reg = record_and_register(workspace, version, model_name, {**provenance, "task": ",".join(names)}, tolerance, tracking_uri)
    ws.set_head(version)
    push_lineage(workspace)
    seconds = {"train": t_train - t0, "evaluate": t_eval - t_train, "total": time.perf_counter() - t0}
    return {"status": "processed", "version": version, "acc": scores["acc"], "bwt": scores["bwt"], "seconds": seconds, **reg}


@flow(name="continual-update", log_prints=True)
def continual_update(key: str, storage_url: str, workspace: str, etag: str | None = None, model_name: str = "share-subspace", tolerance: float = 0.01, tracking_uri: str | None = None, train_deployment: str | None = None) -> dict:
    """Process one landing, idempotently on (key, ETag). `etag` is the one the event saw; the
    landing's current content is what gets processed (an overwrite has its own event)."""
    with Workspace(workspace).lock():
        return _continual_update(key, etag, storage_url, workspace, model_name, tolerance, tracking_uri, train_deployment)


def _continual_update(key, etag, storage_url, workspace, model_name, tolerance, tracking_uri, train_deployment) -> dict:
    log = get_run_logger()
    ws = Workspace(workspace)
    landing = find_landing(storage_url, key)
    if landing is None:
        raise ValueError(f"no complete landing with task.yaml key {key!r} in {open_storage(storage_url).describe()}")
    if etag and etag != landing.etag:
        log.info("landing %s changed since its event (etag %s → %s): processing the current one", key, etag[:8], landing.etag[:8])
    seen = ws.ledger().get(key)
    if seen and seen["etag"] == landing.etag:
        log.info("landing %s (etag %s) already %s: nothing to do", key, landing.etag[:8], seen["status"])
        return {"status": "duplicate", "version": seen.get("version"), "previous": seen}
    with tempfile.TemporaryDirectory() as tmp:
        local = download(storage_url, landing, tmp)
        reason = validate(workspace, landing, local)
        if reason:
            return reject(ws, storage_url, landing, reason)
        name = ingest(workspace, landing, local)
    provenance = {"key": key, "etag": landing.etag}
    out = _build_and_publish(workspace, [name], landing.kind, provenance, model_name, tolerance, tracking_uri, train_deployment)
    ws.record_landing(key, {"etag": landing.etag, "status": "processed", "version": out["version"]})
    mark(storage_url, landing, "processed", {"version": out["version"]})
    return out


@flow(name="batch-absorb", log_prints=True)
def batch_absorb(storage_url: str, workspace: str, model_name: str = "share-subspace", tolerance: float = 0.01, tracking_uri: str | None = None) -> dict:
    """Absorb every pending adapter landing in one merge (asynchronous learning)."""
    with Workspace(workspace).lock():
        return _batch_absorb(storage_url, workspace, model_name, tolerance, tracking_uri)


def _batch_absorb(storage_url, workspace, model_name, tolerance, tracking_uri) -> dict:
    ws = Workspace(workspace)
    ledger = ws.ledger()
    pending = [lnd for lnd in open_storage(storage_url).list_landings() if lnd.kind == "adapter" and ledger.get(lnd.key, {}).get("etag") != lnd.etag]
    accepted, rejected = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for lnd in pending:
            local = download(storage_url, lnd, str(Path(tmp) / lnd.task))
            reason = validate(workspace, lnd, local)
            if reason:
                rejected[lnd.key] = reject(ws, storage_url, lnd, reason)["reason"]
                continue
            accepted.append((lnd, ingest(workspace, lnd, local)))
    if not accepted:
        return {"status": "nothing-to-absorb", "rejected": rejected}
    provenance = {"batch": sorted(f"{lnd.key}@{lnd.etag}" for lnd, _ in accepted)}
    out = _build_and_publish(workspace, [n for _, n in accepted], "adapter", provenance, model_name, tolerance, tracking_uri, None)
    for lnd, _ in accepted:
        ws.record_landing(lnd.key, {"etag": lnd.etag, "status": "processed", "version": out["version"]})
        mark(storage_url, lnd, "processed", {"version": out["version"]})
    return {**out, "absorbed": [n for _, n in accepted], "rejected": rejected}


@flow(name="evaluate-version", log_prints=True)
def evaluate_version(workspace: str, version: str, tolerance: float = 1e-6) -> dict:
    """Re-score `version` and compare with its recorded evaluation (drift means the stored
    version, the data or the code changed)."""
    ws = Workspace(workspace)
    recorded = json.loads((ws.root / "evaluations" / f"{version}.json").read_text())
    fresh = [score(workspace, version, t) for t in recorded["tasks"]]
    diffs = {r["task"]: (r["score"] - recorded["scores"][r["task"]]) for r in fresh if r["score"] is not None}
    worst = max((abs(d) for d in diffs.values()), default=0.0)
    return {"version": version, "matches": worst <= tolerance, "worst_abs_diff": worst, "scores": {r["task"]: r["score"] for r in fresh}}


@flow(name="rollback", log_prints=True)
def rollback(workspace: str, version: str, model_name: str = "share-subspace", reason: str = "", tracking_uri: str | None = None) -> dict:
    """Champion and HEAD move to `version` (recorded in MLflow), then it is re-evaluated."""
    ws = Workspace(workspace)
    with ws.lock():
        lineage.checkout_version(ws.root, version)
        moved = register.rollback(ws, version, model_name=model_name, reason=reason, tracking_uri=tracking_uri)
    check = evaluate_version(workspace, version)
    return {**moved, "verified": check["matches"], "worst_abs_diff": check["worst_abs_diff"]}
