"""Orchestration pieces that need no training: the watcher (polling with its {key: ETag} ledger
and S3 notifications through SQS on a moto server) and the deployments `share serve` runs."""

import json

import boto3
import pytest

from flows.deployments import build_deployments
from flows.watcher import EVENT, Watcher
from pipelines.storage import open_storage
from share_core.tasks import generate_tasks


@pytest.fixture
def bucket(moto_s3, tmp_path):
    name = f"w{tmp_path.name[-20:].lower().replace('_', '-')}"
    boto3.client("s3", endpoint_url=moto_s3).create_bucket(Bucket=name)
    return name


def test_polling_emits_once_per_landing_and_again_on_overwrite(moto_s3, bucket, prefect_harness, tmp_path):
    url = f"s3://{bucket}/p?endpoint_url={moto_s3}"
    storage = open_storage(url)
    a, b = generate_tasks(tmp_path / "t", names=["sentiment", "topic"], n_train=16, n_eval=8)
    watcher = Watcher(storage, url, tmp_path / "ledger.json")
    storage.upload_task(a, "dataset", "sentiment")
    assert [x.task for x in watcher.poll_once()] == ["sentiment"]
    storage.upload_task(b, "dataset", "topic")
    assert [x.task for x in watcher.poll_once()] == ["topic"]
    assert watcher.poll_once() == []
    assert Watcher(storage, url, tmp_path / "ledger.json").poll_once() == []  # the ledger survives a restart
    (a / "eval.jsonl").write_text((a / "eval.jsonl").read_text().splitlines(keepends=True)[0])
    storage.upload_task(a, "dataset", "sentiment")  # an overwrite is a new landing
    assert [x.task for x in watcher.poll_once()] == ["sentiment"]
    record = json.loads((tmp_path / "ledger.json").read_text())["landings"]
    assert len(record) == 2 and record["p/incoming/datasets/sentiment/task.yaml"]["attempts"] == 1  # a new ETag


def test_s3_notifications_from_sqs_emit_task_yaml_landings_only(moto_s3, bucket, prefect_harness, tmp_path):
    sqs = boto3.client("sqs", endpoint_url=moto_s3)
    queue = sqs.create_queue(QueueName=f"q-{bucket}")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    s3 = boto3.client("s3", endpoint_url=moto_s3)
    s3.put_bucket_notification_configuration(
        Bucket=bucket,
        NotificationConfiguration={"QueueConfigurations": [{"QueueArn": arn, "Events": ["s3:ObjectCreated:*"]}]},
    )
    url = f"s3://{bucket}/p?endpoint_url={moto_s3}"
    storage = open_storage(url)
    [task] = generate_tasks(tmp_path / "t", names=["tense"], n_train=16, n_eval=8)
    storage.upload_task(task, "dataset", "tense")
    watcher = Watcher(storage, url, tmp_path / "ledger.json")
    got = watcher.consume_sqs(sqs, queue, wait_seconds=0)
    assert [x.key for x in got] == [
        "p/incoming/datasets/tense/task.yaml"
    ]  # train/eval objects and the TestEvent ignored
    assert watcher.poll_once() == []  # polling and notifications share one ledger: no second event
    assert sqs.receive_message(QueueUrl=queue, WaitTimeSeconds=0).get("Messages") is None  # drained


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


def test_workspace_init_is_idempotent_and_commits_only_its_own_files(tmp_path):
    from pipelines import lineage

    lineage.init_workspace(tmp_path / "ws")
    (tmp_path / "ws" / "notes.txt").write_text("a user's file")  # untracked, not ignored
    lineage.init_workspace(tmp_path / "ws")  # `share serve` on an existing workspace
    assert len(lineage._git(tmp_path / "ws", "log", "--oneline").splitlines()) == 1
    assert "notes.txt" not in lineage._git(tmp_path / "ws", "ls-files")
