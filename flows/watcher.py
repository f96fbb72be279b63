"""The storage → Prefect bridge: one `share.task.landed` event per new or overwritten landing.

Two sources, one dedupe: polling (works on any S3 or a local dir; a persisted {key: ETag}
ledger makes restarts safe) and S3 event notifications consumed from SQS (keys arrive
URL-encoded; `s3:TestEvent` and non-task.yaml objects are ignored; a multipart upload can
notify twice — the (key, ETag) ledger absorbs that).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from urllib.parse import unquote_plus

from prefect.events import emit_event

from pipelines.storage import Landing, Storage
from pipelines.workspace import write_atomic

EVENT = "share.task.landed"
RESOURCE_PREFIX = "share.landing"


def resource_id(landing: Landing) -> str:
    return f"{RESOURCE_PREFIX}.{landing.kind}.{landing.task}"


class Watcher:
    def __init__(self, storage: Storage, storage_url: str, ledger: Path) -> None:
        self.storage, self.storage_url, self.ledger = storage, storage_url, Path(ledger)

    def _seen(self) -> dict[str, str]:
        return json.loads(self.ledger.read_text()) if self.ledger.is_file() else {}

    def _emit_new(self, landings: list[Landing]) -> list[Landing]:
        seen = self._seen()
        new = [lnd for lnd in landings if seen.get(lnd.key) != lnd.etag]
        for lnd in new:
            self.emit(lnd)
            seen[lnd.key] = lnd.etag
            write_atomic(
                self.ledger, json.dumps(seen, indent=2, sort_keys=True)
            )  # after each emit: a crash re-emits at most one
        return new

    def emit(self, lnd: Landing) -> None:
        """The landing event that triggers the continual-update deployment."""
        emit_event(
            event=EVENT,
            resource={"prefect.resource.id": resource_id(lnd), "share.key": lnd.key},
            payload={
                "key": lnd.key,
                "etag": lnd.etag,
                "kind": lnd.kind,
                "task": lnd.task,
                "storage": self.storage.describe(),
            },
        )

    def poll_once(self) -> list[Landing]:
        """Emit an event for every landing not yet seen with its current ETag."""
        return self._emit_new(self.storage.list_landings())

    def consume_sqs(self, sqs, queue_url: str, wait_seconds: int = 1) -> list[Landing]:
        """Drain S3 notifications from SQS once; emit for the task.yaml objects among them."""
        keys = set()
        while True:
            resp = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=wait_seconds)
            msgs = resp.get("Messages", [])
            if not msgs:
                break
            for m in msgs:
                body = json.loads(m["Body"])
                if "Message" in body:  # delivered through SNS
                    body = json.loads(body["Message"])
                for rec in body.get("Records", []):
                    key = unquote_plus(rec.get("s3", {}).get("object", {}).get("key", ""))
                    if rec.get("eventName", "").startswith("ObjectCreated") and key.endswith("/task.yaml"):
                        keys.add(key)
                sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=m["ReceiptHandle"])
        if not keys:
            return []
        return self._emit_new([lnd for lnd in self.storage.list_landings() if lnd.key in keys])

    def run(self, interval: float, stop: threading.Event, sqs=None, queue_url: str | None = None) -> None:
        """Poll (and drain SQS, when given) every `interval` seconds until `stop` is set."""
        while not stop.is_set():
            if sqs is not None and queue_url:
                self.consume_sqs(sqs, queue_url)
            self.poll_once()
            stop.wait(interval)
