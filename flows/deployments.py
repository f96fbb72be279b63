"""The deployments `share serve` runs: the event-triggered continual update (concurrency 1:
versions form a chain), cron batch-absorb and champion re-evaluation, and on-demand rollback
and evaluate-version; with a training pool, train-version as its own deployment on that work
pool (picked up by a `prefect worker`).

A chain is an address: every deployment of a chain is named `<flow>/chain-<chain id>` and
tagged `share-chain:<chain id>`, and the landing trigger matches only events whose resource is
`share.landing.<chain id>.*`, so any number of chains share one Prefect server without running
each other's landings. The helpers below read the chain's runs: the landings queued or running
(the watcher's reconcile), runs a dead `share serve` left Running (ended Crashed, which frees
the deployment's concurrency slot at once instead of after its 300 s lease), queued runs named
after their landing."""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterParentFlowRunId,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.events import DeploymentEventTrigger
from prefect.states import Crashed

from pipelines import register
from pipelines.register import DEFAULT_MODEL_NAME, Registry
from pipelines.workspace import Workspace

from .continual import _landing_run_name_for, batch_absorb, continual_update, evaluate_version, rollback, train_version
from .lock import chain_id, with_retries
from .watcher import EVENT, RESOURCE_PREFIX

log = logging.getLogger(__name__)
NOT_ENDED = ("SCHEDULED", "PENDING", "RUNNING", "CANCELLING", "PAUSED")


@flow(name="reevaluate-champion", log_prints=True)
def reevaluate_champion(workspace: str, model_name: str = DEFAULT_MODEL_NAME, tracking_uri: str | None = None) -> dict:
    """Scheduled check that the serving version still scores what it scored when registered."""
    version = register.champion_version(Registry(Workspace(workspace), model_name, tracking_uri))
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


def deployment_name(chain: str) -> str:
    """The deployment name of every flow of `chain`: `continual-update/chain-<id>` etc."""
    return f"chain-{chain}"


def chain_tag(chain: str) -> str:
    return f"share-chain:{chain}"


def landing_trigger(chain: str | None = None) -> DeploymentEventTrigger:
    """Landing events of `chain` only (all landing events without one: a single-chain server)."""
    scope = f"{RESOURCE_PREFIX}.{chain}" if chain else RESOURCE_PREFIX
    return DeploymentEventTrigger(
        expect={EVENT},
        match={"prefect.resource.id": f"{scope}.*"},
        parameters={"key": "{{ event.payload.key }}", "etag": "{{ event.payload.etag }}"},
    )


def build_deployments(
    storage_url: str,
    workspace: str,
    *,
    model_name: str = DEFAULT_MODEL_NAME,
    tracking_uri: str | None = None,
    tolerance: float | None = None,  # None: the workspace's evaluate.gate_tolerance
    absorb_cron: str = "0 * * * *",
    reeval_cron: str = "30 3 * * *",
    train_deployment: str | None = None,
    chain: str | None = None,
) -> list:
    """The chain's deployments (`chain` defaults to the workspace's chain id)."""
    chain = chain or chain_id(Workspace(workspace))
    name, tags = deployment_name(chain), [chain_tag(chain)]
    common = {"workspace": workspace, "model_name": model_name, "tracking_uri": tracking_uri}
    return [
        continual_update.to_deployment(
            name=name,
            tags=tags,
            triggers=[landing_trigger(chain)],
            concurrency_limit=1,
            parameters={
                **common,
                "storage_url": storage_url,
                "tolerance": tolerance,
                "train_deployment": train_deployment,
            },
        ),
        batch_absorb.to_deployment(
            name=name,
            tags=tags,
            cron=absorb_cron,
            concurrency_limit=1,
            parameters={**common, "storage_url": storage_url, "tolerance": tolerance},
        ),
        reevaluate_champion.to_deployment(name=name, tags=tags, cron=reeval_cron, parameters=common),
        rollback.to_deployment(name=name, tags=tags, parameters=common),
        evaluate_version.to_deployment(name=name, tags=tags, parameters={"workspace": workspace}),
    ]


def _chain_runs(client, chain: str, states: tuple[str, ...]) -> list:
    return client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=[chain_tag(chain)]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=list(states))),
        )
    )


def landings_in_flight(chain: str) -> set[str]:
    """The landing keys of the chain's runs that have not ended (queued, waiting for the
    chain's slot, running). Queued runs are named after their landing on the way."""

    def read() -> set[str]:
        keys = set()
        with get_client(sync_client=True) as client:
            for run in _chain_runs(client, chain, NOT_ENDED):
                key = (run.parameters or {}).get("key")
                if not key:
                    continue
                keys.add(key)
                name = _landing_run_name_for(key)
                if run.state_type is not None and run.state_type.value == "SCHEDULED" and run.name != name:
                    try:
                        client.update_flow_run(flow_run_id=run.id, name=name)
                    except Exception as e:  # noqa: BLE001 - a name is for people
                        log.debug("could not name run %s: %s", run.id, e)
        return keys

    return with_retries("read the chain's runs", read, seconds=30)


def crash_dead_runs(chain: str, message: str) -> list[str]:
    """At `share serve` start: the chain's runs a dead serve left Pending/Running (and their
    subflows, e.g. train-version) end Crashed. Nothing else runs the chain's deployments, so
    none of them is alive; ending them frees the deployment's concurrency slot now."""

    def crash() -> list[str]:
        done = []
        with get_client(sync_client=True) as client:
            runs = _chain_runs(client, chain, ("PENDING", "RUNNING", "CANCELLING"))
            ids = [r.id for r in runs]
            if ids:
                runs += client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=ids))
                )
            for run in runs:
                if run.state is not None and not run.state.is_final():
                    client.set_flow_run_state(run.id, Crashed(message=message), force=True)
                    done.append(str(run.id))
        return done

    return with_retries("end the chain's dead runs", crash, seconds=60)


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
