"""The storage → Prefect bridge: one `share.task.landed` event per new or overwritten landing,
and a record that makes every landing reach an outcome.

Two sources, one dedupe: polling (works on any S3 or a local dir) and S3 event notifications
consumed from SQS (keys arrive URL-encoded; `s3:TestEvent` and non-task.yaml objects are
ignored; a multipart upload can notify twice — the (key, ETag) record absorbs that). A poll
lists the bucket once (S3: one request per 1,000 keys, ETags included, no per-object request;
a local dir: a stat per file, its MD5 cached): O(objects) per round, since S3 lists by key, not
by time, so a `StartAfter` cursor would miss new task names that sort earlier. Notifications
are O(1) per landing: only the notified landing's prefix is listed.

The watcher's durable record of a landing goes *announced → outcome*: announcing (emitting the
event) is not the end of it. The record (`watcher-ledger.json` in the workspace)

    {"format": 2, "landings": {key: {"etag", "announced": epoch seconds, "attempts": n}}}

says what was announced and when; the outcome is the workspace ledger's (processed → version,
rejected → reason), looked up through `outcome(key, etag)`. `reconcile` announces again every
landing that has no outcome `timeout` seconds after its last announcement and no run queued or
running for it (`in_flight`): an event lost in flight, a run that crashed or was killed before
its journal opened, an update discarded because its parent moved, a Prefect fault that outlasted
the retries. It is idempotent: the update is exactly-once per (key, ETag) through the journal
and the ledger, so a second run of a processed landing is a no-op. The n-th re-announcement waits
timeout·2^(n-1) (capped at 32·timeout), and after MAX_ATTEMPTS the landing is left for a person
(`share status` shows it pending with its attempts).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote_plus

from prefect.events import emit_event

from pipelines.storage import Landing, Storage
from pipelines.workspace import write_atomic

EVENT = "share.task.landed"
RESOURCE_PREFIX = "share.landing"
RECORD_FORMAT = 2
MAX_ATTEMPTS = 8
log = logging.getLogger(__name__)


def resource_id(landing: Landing, chain: str | None = None) -> str:
    """The event's resource: `share.landing.<chain>.<kind>.<task>` (the chain's trigger matches
    only its own prefix, so chains on one Prefect server never run each other's landings)."""
    scope = f"{RESOURCE_PREFIX}.{chain}" if chain else RESOURCE_PREFIX
    return f"{scope}.{landing.kind}.{landing.task}"


def read_record(path: Path) -> dict[str, dict]:
    """{key: {"etag", "announced", "attempts"}} of a watcher record (the first format,
    {key: etag}, is read as announced long ago, once)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    if data.get("format") == RECORD_FORMAT and isinstance(data.get("landings"), dict):
        return {
            k: dict(v) for k, v in data["landings"].items() if isinstance(v, dict) and isinstance(v.get("etag"), str)
        }
    return {k: {"etag": v, "announced": 0.0, "attempts": 1} for k, v in data.items() if isinstance(v, str)}


class Watcher:
    def __init__(
        self,
        storage: Storage,
        storage_url: str,
        ledger: Path,
        *,
        chain: str | None = None,
        outcome: Callable[[str, str], dict | None] | None = None,
    ) -> None:
        self.storage, self.storage_url, self.ledger = storage, storage_url, Path(ledger)
        self.chain, self.outcome = chain, outcome
        self._lock = threading.Lock()  # the polling thread and serve's recovery both announce

    # ---- the record ------------------------------------------------------------------------
    def record(self) -> dict[str, dict]:
        return read_record(self.ledger)

    def _write(self, rec: dict[str, dict]) -> None:
        write_atomic(self.ledger, json.dumps({"format": RECORD_FORMAT, "landings": rec}, indent=1, sort_keys=True))

    def announce(self, lnd: Landing) -> None:
        """Emit the landing's event and record it as announced (after the emit: a crash
        re-emits at most one; an emit lost in flight is re-announced by `reconcile`)."""
        with self._lock:
            self.emit(lnd)
            rec = self.record()
            prev = rec.get(lnd.key)
            attempts = prev["attempts"] + 1 if prev and prev.get("etag") == lnd.etag else 1
            rec[lnd.key] = {"etag": lnd.etag, "announced": time.time(), "attempts": attempts}
            self._write(rec)

    def _emit_new(self, landings: list[Landing]) -> list[Landing]:
        rec = self.record()
        new = [lnd for lnd in landings if rec.get(lnd.key, {}).get("etag") != lnd.etag]
        for lnd in new:
            self.announce(lnd)
        return new

    def emit(self, lnd: Landing) -> None:
        """The landing event that triggers the chain's continual-update deployment."""
        resource = {"prefect.resource.id": resource_id(lnd, self.chain), "share.key": lnd.key}
        if self.chain:
            resource["share.chain"] = self.chain
        emit_event(
            event=EVENT,
            resource=resource,
            payload={
                "key": lnd.key,
                "etag": lnd.etag,
                "kind": lnd.kind,
                "task": lnd.task,
                "storage": self.storage.describe(),
            },
        )

    # ---- sources ---------------------------------------------------------------------------
    def poll_once(self) -> list[Landing]:
        """Emit an event for every landing not yet announced with its current ETag."""
        return self._emit_new(self.storage.list_landings())

    def consume_sqs(self, sqs, queue_url: str, wait_seconds: int = 1) -> list[Landing]:
        """Drain S3 notifications from SQS once; emit for the task.yaml objects among them
        (each looked up alone: the bucket is not listed)."""
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
        landings = [lnd for lnd in (self.storage.landing(k) for k in sorted(keys)) if lnd is not None]
        return self._emit_new(landings)

    # ---- every landing reaches an outcome ---------------------------------------------------
    def pending(self) -> dict[str, dict]:
        """Announced landings without an outcome: {key: record}."""
        if self.outcome is None:
            return {}
        return {k: r for k, r in self.record().items() if self.outcome(k, r["etag"]) is None}

    def reconcile(
        self, timeout: float, in_flight: Callable[[], set[str]] | None = None, now: float | None = None
    ) -> list[Landing]:
        """Announce again each landing that has no outcome `timeout`·2^(attempts-1) seconds
        after its last announcement and no queued or running run (`in_flight()`: the keys of
        the chain's runs not yet ended). Returns the landings announced again."""
        now = time.time() if now is None else now
        due = {
            k: r
            for k, r in self.pending().items()
            if r.get("attempts", 1) < MAX_ATTEMPTS
            and now - float(r.get("announced", 0.0)) >= timeout * 2 ** min(max(r.get("attempts", 1) - 1, 0), 5)
        }
        if not due:
            return []
        busy = in_flight() if in_flight is not None else set()
        out = []
        for key, r in sorted(due.items()):
            if key in busy:
                continue
            lnd = self.storage.landing(key)
            if lnd is None or lnd.etag != r["etag"]:  # gone, or overwritten: the poll announces the new one
                continue
            log.warning(
                "landing %s has no outcome %.0f s after it was announced: announcing it again",
                key,
                now - r.get("announced", 0.0),
            )
            self.announce(lnd)
            out.append(lnd)
        return out

    def run(
        self,
        interval: float,
        stop: threading.Event,
        sqs=None,
        queue_url: str | None = None,
        *,
        reconcile_seconds: float | None = None,
        in_flight: Callable[[], set[str]] | None = None,
        each_round: Callable[[], object] | None = None,
    ) -> None:
        """Poll (and drain SQS, when given) every `interval` seconds until `stop` is set; with
        `reconcile_seconds`, reconcile on the same beat, and call `each_round` (serve names the
        queued runs). A fault in one round (a server down) is logged and the next round tries again."""
        while not stop.is_set():
            try:
                if sqs is not None and queue_url:
                    self.consume_sqs(sqs, queue_url)
                self.poll_once()
                if reconcile_seconds is not None:
                    self.reconcile(reconcile_seconds, in_flight)
                if each_round is not None:
                    each_round()
            except Exception as e:  # noqa: BLE001 - the watcher outlives a storage or API hiccup
                log.warning("watcher round failed (next round in %.0f s): %s", interval, e)
            stop.wait(interval)
