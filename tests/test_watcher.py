"""flows.watcher: polling with its {key: ETag} ledger and S3 notifications through SQS on a moto
server emit one landing event per landing (and again on an overwrite)."""

import json

import boto3
import pytest

from flows.watcher import Watcher
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
