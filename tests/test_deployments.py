"""flows.deployments: what `share serve` serves — chain-scoped names, tags and trigger, the cron
schedules and the one-at-a-time limits."""

from flows.deployments import build_deployments
from flows.watcher import EVENT


def test_deployments_trigger_schedule_and_serialise_updates(tmp_path):
    from flows.lock import chain_id
    from pipelines.workspace import Workspace

    built = build_deployments("file:///tmp/bucket", str(tmp_path), absorb_cron="*/30 * * * *")
    chain = chain_id(Workspace(tmp_path))
    deps = {d.flow_name: d for d in built}
    assert set(deps) == {"continual-update", "batch-absorb", "reevaluate-champion", "rollback", "evaluate-version"}
    assert {d.name for d in built} == {f"chain-{chain}"} and all(d.tags == [f"share-chain:{chain}"] for d in built)
    update = deps["continual-update"]
    [trigger] = update.triggers
    assert trigger.expect == {EVENT} and trigger.parameters["key"] == "{{ event.payload.key }}"
    assert trigger.match.root["prefect.resource.id"] == f"share.landing.{chain}.*"  # this chain's landings only
    assert update.concurrency_limit == 1 and deps["batch-absorb"].concurrency_limit == 1
    assert deps["batch-absorb"].schedules[0].schedule.cron == "*/30 * * * *"
    assert deps["reevaluate-champion"].schedules[0].schedule.cron == "30 3 * * *"
