"""moto's S3 server with its buckets on disk: the local stack's landing bucket (and DVC remote)
survives `share stack down` / `up` and a crash of the server.

moto serves the S3 API (the one every test already speaks); this wraps it in a WSGI layer that,
after each request that can change a bucket (PUT, POST, DELETE), writes the object's current
state to `<data>/buckets/<bucket>/objects/<sha256(key)[:2]>/<sha256(key)>` **before the response
is sent**: a client that got a 200 has its object on disk (written to a temporary file, fsync-ed
and renamed, so a crash leaves the old object or the new one, never half of one). At start-up
every stored object is put back into moto with its ETag, last-modified time and metadata, so the
watcher's (key, ETag) ledger still matches after a restart.

One file per object: a JSON header line (key, ETag, last-modified, metadata), then the bytes.
Versioning, ACLs, tags and in-progress multipart uploads are not kept (the pipeline uses none).

    python infra/s3_server.py --host 127.0.0.1 --port 9100 --data DIR
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import ipaddress
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from urllib.parse import unquote

from moto.core import DEFAULT_ACCOUNT_ID
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from moto.s3.models import FakeKey, s3_backends
from werkzeug.serving import make_server

REGION = "us-east-1"
MUTATING = {"PUT", "POST", "DELETE"}


def _backend():
    return s3_backends[DEFAULT_ACCOUNT_ID]["aws"]


def _bucket(name: str):
    """moto's bucket object, whichever account created it; None when it does not exist."""
    where = s3_backends.bucket_accounts.get(name)
    if where is None:
        return None
    partition, account = where
    return s3_backends[account][partition].buckets.get(name)


class DiskStore:
    """The buckets as files under `root`; `restore` fills moto from them, `sync_*` write moto's
    current state of a key or bucket back (callers hold `lock`)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root) / "buckets"
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self._known: dict[tuple[str, str], tuple[str, str]] = {}  # (bucket, key) → (etag, last-modified) on disk

    def _path(self, bucket: str, key: str) -> Path:
        h = hashlib.sha256(key.encode()).hexdigest()
        return self.root / bucket / "objects" / h[:2] / h

    def restore(self) -> int:
        """Put every stored bucket and object into moto; returns the number of objects."""
        backend, n = _backend(), 0
        for bdir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if _bucket(bdir.name) is None:
                backend.create_bucket(bdir.name, REGION)
            for f in sorted(bdir.glob("objects/*/*")):
                if f.name.startswith("."):  # a temporary file a crash left behind
                    continue
                with open(f, "rb") as fh:
                    head = json.loads(fh.readline())
                    data = fh.read()
                fk = backend.put_object(bdir.name, head["key"], data, etag=head["etag"], disable_notification=True)
                fk.last_modified = dt.datetime.fromisoformat(head["last_modified"])
                if head.get("metadata"):
                    fk.set_metadata(dict(head["metadata"]), replace=True)
                self._known[(bdir.name, head["key"])] = (fk.etag, head["last_modified"])
                n += 1
        return n

    def sync_key(self, bucket: str, key: str) -> None:
        b = _bucket(bucket)
        if b is None:
            return self.sync_bucket(bucket)
        fk = b.keys.get(key)
        path = self._path(bucket, key)
        if not isinstance(fk, FakeKey):  # deleted (or a delete marker)
            path.unlink(missing_ok=True)
            self._known.pop((bucket, key), None)
            return
        stamp = (fk.etag, fk.last_modified.isoformat())
        if self._known.get((bucket, key)) == stamp and path.exists():
            return
        head = {"key": key, "etag": fk.etag.strip('"'), "last_modified": stamp[1], "metadata": dict(fk.metadata)}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(json.dumps(head).encode() + b"\n")
                out.write(fk.value)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._known[(bucket, key)] = stamp

    def sync_bucket(self, bucket: str) -> None:
        """The whole bucket: created, deleted, or many keys changed at once (DeleteObjects)."""
        b = _bucket(bucket)
        if b is None:
            shutil.rmtree(self.root / bucket, ignore_errors=True)
            self._known = {k: v for k, v in self._known.items() if k[0] != bucket}
            return
        (self.root / bucket / "objects").mkdir(parents=True, exist_ok=True)
        live = set(b.keys.keys())
        for key in live | {k for (bk, k) in self._known if bk == bucket}:
            self.sync_key(bucket, key)


def _bucket_and_key(environ: dict) -> tuple[str, str]:
    """(bucket, key) of a request, path-style (http://127.0.0.1:P/bucket/key) or virtual-host style."""
    path = unquote(environ.get("PATH_INFO", ""))
    host = environ.get("HTTP_HOST", "").rsplit(":", 1)[0]
    try:
        ipaddress.ip_address(host)
        virtual = False
    except ValueError:
        virtual = "." in host and host != "localhost"
    if virtual:
        return host.split(".", 1)[0], path.lstrip("/")
    bucket, _, key = path.lstrip("/").partition("/")
    return bucket, key


def persistent(app, store: DiskStore):
    """WSGI middleware: a mutating request's effect is on disk before its response leaves."""

    def wrapped(environ, start_response):
        if environ.get("REQUEST_METHOD") not in MUTATING:
            return app(environ, start_response)
        bucket, key = _bucket_and_key(environ)
        if not bucket or bucket.startswith("moto-api"):
            return app(environ, start_response)
        captured: list = []
        body: list[bytes] = []

        def capture(status, headers, exc_info=None):
            captured[:] = [status, headers, exc_info]
            return body.append

        result = app(environ, capture)
        try:
            body.extend(result)
        finally:
            if hasattr(result, "close"):
                result.close()
        with store.lock:
            if key and "delete" not in environ.get("QUERY_STRING", "").split("&"):
                store.sync_key(bucket, key)
            else:
                store.sync_bucket(bucket)
        start_response(*captured)
        return body

    return wrapped


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--data", type=Path, required=True, help="directory of the buckets")
    args = p.parse_args(argv)
    store = DiskStore(args.data)
    n = store.restore()
    print(f"restored {n} objects from {store.root}", flush=True)
    app = persistent(DomainDispatcherApplication(create_backend_app), store)
    server = make_server(args.host, args.port, app, threaded=True, request_handler=MotoRequestHandler)
    print(f"s3 (moto, on disk) on http://{args.host}:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
