"""The deployments `share serve` runs: the event-triggered continual update (concurrency 1:
versions form a chain), cron batch-absorb and champion re-evaluation, and on-demand rollback
and evaluate-version; with a training pool, train-version as its own deployment on that work
pool (picked up by a `prefect worker`)."""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import flow
from prefect.events import DeploymentEventTrigger

from pipelines import register
from pipelines.workspace import Workspace

from .continual import batch_absorb, continual_update, evaluate_version, rollback, train_version
from .watcher import EVENT, RESOURCE_PREFIX


@flow(name="reevaluate-champion", log_prints=True)
def reevaluate_champion(workspace: str, model_name: str = "share-subspace", tracking_uri: str | None = None) -> dict:
    """Scheduled check that the serving version still scores what it scored when registered."""
    ws = Workspace(workspace)
    version = register.champion_version(model_name, tracking_uri=tracking_uri or ws.tracking_uri)
    if version is None:
        return {"status": "no-champion"}
    return evaluate_version(workspace, version)


def deploy_train_version(work_pool: str, *, name: str = "train", source: str | Path | None = None) -> str:
    """Deploy the `train-version` flow onto `work_pool` and return the name to pass as
    `train_deployment` (runs of continual-update then wait for its run on the pool's worker).
    The deployment points at this checkout's source (`source`, default the repository root):
    the worker must see the same path and the same workspace path (same image, shared volume)."""
    root = Path(source) if source else Path(__file__).resolve().parents[1]
    train_version.from_source(source=str(root), entrypoint="flows/continual.py:train_version").deploy(
        name=name, work_pool_name=work_pool, print_next_steps=False, ignore_warnings=True
    )
    return f"{train_version.name}/{name}"


def landing_trigger() -> DeploymentEventTrigger:
    return DeploymentEventTrigger(
        expect={EVENT},
        match={"prefect.resource.id": f"{RESOURCE_PREFIX}.*"},
        parameters={"key": "{{ event.payload.key }}", "etag": "{{ event.payload.etag }}"},
    )


def build_deployments(
    storage_url: str,
    workspace: str,
    *,
    model_name: str = "share-subspace",
    tracking_uri: str | None = None,
    tolerance: float = 0.01,
    absorb_cron: str = "0 * * * *",
    reeval_cron: str = "30 3 * * *",
    train_deployment: str | None = None,
) -> list:
    common = {"workspace": workspace, "model_name": model_name, "tracking_uri": tracking_uri}
    return [
        continual_update.to_deployment(
            name="continual-update",
            triggers=[landing_trigger()],
            concurrency_limit=1,
            parameters={
                **common,
                "storage_url": storage_url,
                "tolerance": tolerance,
                "train_deployment": train_deployment,
            },
        ),
        batch_absorb.to_deployment(
            name="batch-absorb",
            cron=absorb_cron,
            concurrency_limit=1,
            parameters={**common, "storage_url": storage_url, "tolerance": tolerance},
        ),
        reevaluate_champion.to_deployment(name="reevaluate-champion", cron=reeval_cron, parameters=common),
        rollback.to_deployment(name="rollback", parameters=common),
        evaluate_version.to_deployment(name="evaluate-version", parameters={"workspace": workspace}),
    ]


class _QueueingIsNotNews(logging.Filter):
    """A landing waiting for the chain's concurrency slot is offered to the runner again every
    few seconds, and Prefect logs each offer as "Aborted submission … non-pending state
    'SCHEDULED'": that is the queue working, not an event."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("Aborted submission" in text and "non-pending" in text)


def quiet_queueing() -> None:
    """Drop the runner's per-poll queueing notices (called by `share serve`)."""
    for name in ("prefect.runner.state_proposer", "prefect.runner"):
        logging.getLogger(name).addFilter(_QueueingIsNotNews())
