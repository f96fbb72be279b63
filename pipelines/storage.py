"""Step `storage`: where landings arrive (DESIGN §4), one interface over two backends.

    <prefix>/incoming/datasets/<task>/train.jsonl, eval.jsonl, task.yaml
    <prefix>/incoming/adapters/<task>/adapter_config.json, adapter_model.safetensors, task.yaml[, eval.jsonl]
    <prefix>/status/<kind>s/<task>.json      what happened to the landing (processed / rejected + why):
        the latest outcome at the top ({"key", "etag", "status", "version"|"reason", "at"}) and
        "history", every outcome per ETag; a processed record is never replaced by a rejection

A landing is complete once its task.yaml exists (it is uploaded last). It is identified by
the task.yaml key and an ETag that covers *every* object of the landing (a digest of each
object's own ETag), so re-uploading train.jsonl and then task.yaml is a new landing even
when task.yaml itself did not change. Backends: a local directory (the embedded default;
`file:///path`) and S3 through boto3 (`s3://bucket/prefix?endpoint_url=http://127.0.0.1:9100`
for MinIO/moto; credentials come from the usual AWS environment/profile, never the URL, and
no message ever repeats a URL's user info or option values unredacted).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlencode, urlparse, urlunparse

import typer

from .workspace import bound_text

KINDS = {"datasets": "dataset", "adapters": "adapter"}
S3_OPTIONS = ("endpoint_url", "region")
REDACTED = "***"
OPTION_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")  # an option name shown in messages (anything else may be a secret)
PROCESSED = "processed"
MAX_STATUS_HISTORY = 50  # non-processed records kept per status file (processed ones are always kept)
SPEC = "task.yaml"
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class StorageError(RuntimeError):
    """A storage URL, key or object is unusable (not a rejection of a landing's content)."""


@dataclass(frozen=True)
class Landing:
    """One complete landing: `key` of its task.yaml, `etag` over all its objects, and the
    relative names of its objects (unsafe ones included, so validation can refuse them)."""

    key: str
    etag: str
    kind: str  # dataset | adapter
    task: str
    files: tuple[str, ...] = field(default=())

    @property
    def prefix(self) -> str:
        return self.key[: -len(SPEC)]


def kind_and_task(key: str) -> tuple[str, str] | None:
    """(kind, task) of a landing's task.yaml key (…/incoming/<kind>s/<task>/task.yaml); None
    for any other key."""
    parts = key.split("/")
    if len(parts) >= 4 and parts[-1] == SPEC and parts[-4] == "incoming" and parts[-3] in KINDS and parts[-2]:
        return KINDS[parts[-3]], parts[-2]
    return None


def landing_etag(objects: dict[str, str]) -> str:
    """Digest of {relative name: object ETag}: changes when any object of the landing does."""
    h = hashlib.sha256()
    for name in sorted(objects):
        h.update(f"{name}\0{objects[name]}\0".encode())
    return h.hexdigest()[:32]


def group_landings(objects: dict[str, str], prefix: str) -> list[Landing]:
    """Complete landings among `objects` ({key: etag}) under `prefix`, sorted by key."""
    base = f"{prefix.strip('/')}/incoming/" if prefix.strip("/") else "incoming/"
    groups: dict[tuple[str, str], dict[str, str]] = {}
    for key, etag in objects.items():
        if not key.startswith(base):
            continue
        parts = key[len(base) :].split("/", 2)
        if len(parts) < 3 or parts[0] not in KINDS or not parts[1]:
            continue
        groups.setdefault((parts[0], parts[1]), {})[parts[2]] = etag
    out = []
    for (kind_dir, task), files in groups.items():
        if SPEC in files:
            out.append(
                Landing(
                    key=f"{base}{kind_dir}/{task}/{SPEC}",
                    etag=landing_etag(files),
                    kind=KINDS[kind_dir],
                    task=task,
                    files=tuple(sorted(files)),
                )
            )
    return sorted(out, key=lambda lnd: lnd.key)


def _status_key(prefix: str, landing: Landing) -> str:
    return "/".join(p for p in (prefix.strip("/"), "status", f"{landing.kind}s", f"{landing.task}.json") if p)


@functools.lru_cache(maxsize=65536)
def _md5_of(path: str, size: int, mtime_ns: int, inode: int) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def _md5(p: Path) -> str:
    """A local file's ETag (MD5), computed once per (path, size, mtime, inode): a watcher's
    poll re-reads only what changed, not every landing in the bucket."""
    st = p.stat()
    return _md5_of(str(p), st.st_size, st.st_mtime_ns, st.st_ino)


class Storage:
    """The interface every backend implements (keys are '/'-separated, relative to the root)."""

    prefix = ""

    def describe(self) -> str:
        raise NotImplementedError

    def objects(self, under: str = "") -> dict[str, str]:
        """{key: ETag} of every object under the prefix (and under `under` below it)."""
        raise NotImplementedError

    def get(self, key: str, dest: Path) -> None:
        raise NotImplementedError

    def put(self, key: str, src: Path | bytes) -> None:
        raise NotImplementedError

    def read(self, key: str) -> bytes | None:
        raise NotImplementedError

    # ---- shared behaviour ----------------------------------------------------------------
    def list_landings(self) -> list[Landing]:
        return group_landings(self.objects(), self.prefix)

    def landing(self, key: str) -> Landing | None:
        """The complete landing whose task.yaml is `key` (None: absent or incomplete). Lists
        only that landing's objects, whatever else the bucket holds."""
        base = f"{self.prefix.strip('/')}/" if self.prefix else ""
        if not key.startswith(base) or not key.endswith(f"/{SPEC}"):
            return None
        under = key[len(base) : -len(SPEC)]
        return next((lnd for lnd in group_landings(self.objects(under), self.prefix) if lnd.key == key), None)

    def download(self, landing: Landing, dest: Path) -> Path:
        """Copy the landing's objects into `dest`; names that are not plain file names
        (nested paths, '..', hidden files) are never written — validation rejects them."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        for name in landing.files:
            if SAFE_NAME.match(name) and ".." not in name:
                self.get(landing.prefix + name, dest / name)
        return dest

    def mark(self, landing: Landing, status: str, detail: dict) -> dict:
        """Record the outcome next to the incoming area (the landing itself is left as is) and
        return the landing's record as `status_of` gives it. The file keeps every outcome per
        ETag in "history"; a rejection of an ETag that was processed is dropped (the processed
        record stands), and marking the same outcome again moves it to the top without repeating it."""
        history = self.status_history(landing)
        if status != PROCESSED and any(r.get("etag") == landing.etag and r.get("status") == PROCESSED for r in history):
            return self.status_of(landing)
        record = {
            "key": landing.key,
            "etag": landing.etag,
            "status": status,
            **detail,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if "reason" in record:
            record["reason"] = bound_text(record["reason"])

        def same(r: dict) -> bool:
            return all(r.get(f) == record.get(f) for f in ("key", "etag", "status", "version", "reason"))

        history = [r for r in history if not same(r)] + [record]
        others = [i for i, r in enumerate(history) if r.get("status") != PROCESSED]
        drop = set(others[:-MAX_STATUS_HISTORY]) if len(others) > MAX_STATUS_HISTORY else set()
        history = [r for i, r in enumerate(history) if i not in drop]
        body = {**record, "history": history}
        self.put(_status_key(self.prefix, landing), json.dumps(body, indent=2, sort_keys=True).encode())
        return self.status_of(landing)

    def status_history(self, landing: Landing) -> list[dict]:
        """Every recorded outcome of the landing's key (any ETag), oldest first; reads status
        files written before the history existed as a one-record history."""
        raw = self.read(_status_key(self.prefix, landing))
        if not raw:
            return []
        body = json.loads(raw)
        if not isinstance(body, dict):
            return []
        if isinstance(body.get("history"), list):
            return [r for r in body["history"] if isinstance(r, dict)]
        return [body] if "etag" in body else []

    def status_of(self, landing: Landing) -> dict | None:
        """The outcome recorded for this landing (its key and ETag): the processed record if
        there is one, else the latest, else None (pending: an overwrite not processed yet)."""
        hits = [r for r in self.status_history(landing) if r.get("etag") == landing.etag]
        done = [r for r in hits if r.get("status") == PROCESSED]
        return dict((done or hits)[-1]) if hits else None

    def upload_task(self, task_dir: Path, kind: str, task: str) -> str:
        """Upload a task directory as a landing, task.yaml last; returns the task.yaml key."""
        task_dir = Path(task_dir)
        if kind not in KINDS.values():
            raise StorageError(f"kind must be one of {sorted(KINDS.values())}, got {kind!r}")
        if not SAFE_NAME.match(task):
            raise StorageError(f"task name {task!r} is not a plain name ({SAFE_NAME.pattern})")
        if not (task_dir / SPEC).is_file():
            raise StorageError(f"{task_dir / SPEC}: missing; a landing needs a task.yaml")
        base = "/".join(p for p in (self.prefix.strip("/"), "incoming", f"{kind}s", task) if p)
        files = sorted((p for p in task_dir.iterdir() if p.is_file() and p.name != SPEC), key=lambda p: p.name)
        for f in files + [task_dir / SPEC]:
            self.put(f"{base}/{f.name}", f)
        return f"{base}/{SPEC}"


class LocalStorage(Storage):
    """A directory as a bucket. ETag = MD5 of the content, as S3 gives for single-part uploads."""

    def __init__(self, root: Path, prefix: str = "") -> None:
        self.root, self.prefix = Path(root).resolve(), prefix.strip("/")

    def describe(self) -> str:
        return self.root.as_uri() + (f"/{self.prefix}" if self.prefix else "")

    def _path(self, key: str) -> Path:
        p = (self.root / key).resolve()
        if not p.is_relative_to(self.root) or ".." in key.split("/"):
            raise StorageError(f"key {key!r} escapes the storage root {self.root}")
        return p

    def objects(self, under: str = "") -> dict[str, str]:
        top = (
            self._path("/".join(x.strip("/") for x in (self.prefix, under) if x.strip("/")))
            if (self.prefix or under)
            else self.root
        )
        if not top.is_dir():
            return {}
        out = {}
        for p in top.rglob("*"):
            if p.is_file() and not p.name.startswith(".") and not p.is_symlink():
                out[p.relative_to(self.root).as_posix()] = _md5(p)
        return out

    def get(self, key: str, dest: Path) -> None:
        shutil.copyfile(self._path(key), dest)

    def put(self, key: str, src: Path | bytes) -> None:
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.part")
        if isinstance(src, bytes):
            tmp.write_bytes(src)
        else:
            shutil.copyfile(src, tmp)
        tmp.replace(p)  # readers (the watcher) never see half a file

    def read(self, key: str) -> bytes | None:
        p = self._path(key)
        return p.read_bytes() if p.is_file() else None


class S3Storage(Storage):
    """A bucket (and prefix) on any S3: AWS, MinIO, moto (`endpoint_url`)."""

    def __init__(
        self, bucket: str, prefix: str = "", endpoint_url: str | None = None, region: str | None = None
    ) -> None:
        import boto3  # noqa: PLC0415 - boto3 only for s3:// storage: flows/cli.py imports this module at start-up

        self.bucket, self.prefix, self.endpoint_url = bucket, prefix.strip("/"), endpoint_url
        self.client = boto3.client("s3", endpoint_url=endpoint_url, region_name=region)

    def describe(self) -> str:
        where = f" at {redact_url(self.endpoint_url)}" if self.endpoint_url else ""
        return f"s3://{self.bucket}/{self.prefix}{where}"

    def objects(self, under: str = "") -> dict[str, str]:
        out = {}
        prefix = "".join(f"{x.strip('/')}/" for x in (self.prefix, under) if x.strip("/"))
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        for page in pages:
            for obj in page.get("Contents", []):
                out[obj["Key"]] = obj["ETag"].strip('"')
        return out

    def get(self, key: str, dest: Path) -> None:
        self.client.download_file(self.bucket, key, str(dest))

    def put(self, key: str, src: Path | bytes) -> None:
        if isinstance(src, bytes):
            self.client.put_object(Bucket=self.bucket, Key=key, Body=src)
        else:
            self.client.upload_file(str(src), self.bucket, key)

    def read(self, key: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None


def redact_url(url: str) -> str:
    """`url` fit for a message: user info and the values of unknown query options become ***
    (known options keep their values, themselves redacted: an endpoint URL may carry user info)."""
    try:
        p = urlparse(str(url))
        host = p.netloc.rpartition("@")[2]
        netloc = f"{REDACTED}@{host}" if "@" in p.netloc else p.netloc
        query = [
            (k if OPTION_NAME.match(k) else REDACTED, redact_url(v) if k in S3_OPTIONS else REDACTED)
            for k, v in parse_qsl(p.query, keep_blank_values=True)
        ]
        if p.query and not query:
            query = [(REDACTED, "")]
        return urlunparse((p.scheme, netloc, p.path, p.params, urlencode(query, safe="*:/@"), ""))
    except ValueError:
        return "<unparseable URL>"


def open_storage(url: str) -> Storage:
    """`file:///abs/path[/prefix]` or a plain path → LocalStorage;
    `s3://bucket/prefix[?endpoint_url=…&region=…]` → S3Storage.
    Errors name the URL only with its user info and option values redacted."""
    shown = bound_text(repr(redact_url(url)), 300)
    try:
        parsed = urlparse(url)
    except ValueError:
        raise StorageError(f"storage URL {shown} is not a valid URL") from None
    if parsed.scheme in ("", "file"):
        if parsed.scheme == "file" and (parsed.query or "@" in parsed.netloc):
            raise StorageError(f"storage URL {shown}: a file:// URL takes no user info or options")
        path = unquote(parsed.path if parsed.scheme else url)
        if not path:
            raise StorageError(f"storage URL {shown} has no path")
        return LocalStorage(Path(path))
    if parsed.scheme == "s3":
        if "@" in parsed.netloc:
            raise StorageError("credentials do not belong in a storage URL; use the AWS environment or profile")
        if not parsed.netloc:
            raise StorageError(f"storage URL {shown} has no bucket")
        q = dict(parse_qsl(parsed.query, keep_blank_values=True))
        unknown = set(q) - set(S3_OPTIONS)
        if unknown:
            names = sorted(k if OPTION_NAME.match(k) else REDACTED for k in unknown)
            raise StorageError(
                f"storage URL {shown}: unknown options {names} (known: {', '.join(S3_OPTIONS)}); credentials come "
                "from the AWS environment or profile, never the URL"
            )
        endpoint = q.get("endpoint_url") or None
        if endpoint and "@" in urlparse(endpoint).netloc:
            raise StorageError("credentials do not belong in an endpoint URL; use the AWS environment or profile")
        return S3Storage(parsed.netloc, parsed.path.strip("/"), endpoint, q.get("region") or None)
    raise StorageError(f"storage URL {shown}: scheme must be file:// or s3://")


app = typer.Typer(add_completion=False, help=__doc__)


@app.command("list")
def list_cmd(storage: str) -> None:
    """Print the complete landings in STORAGE with their ETag and recorded status."""
    s = open_storage(storage)
    for lnd in s.list_landings():
        status = (s.status_of(lnd) or {}).get("status", "pending")
        typer.echo(f"{lnd.kind:8} {lnd.task:24} {lnd.etag[:12]} {status:10} {lnd.key}")


@app.command()
def upload(task_dir: Path, storage: str, kind: str = typer.Option("dataset", help="dataset | adapter")) -> None:
    """Land TASK_DIR in STORAGE (task.yaml last)."""
    typer.echo(open_storage(storage).upload_task(task_dir, kind, task_dir.name))


if __name__ == "__main__":
    app()
