"""pipelines.storage on a local directory and on S3 (a moto server on 127.0.0.1): when a landing is
complete, what its ETag covers, which names a download writes, which storage URLs are accepted."""

import pytest

from pipelines.storage import LocalStorage, StorageError, open_storage
from pipelines.validate import LandingRejected, validate_landing
from share_core.tasks import generate_tasks

from .test_validate import BASE


@pytest.fixture
def task_dirs(tmp_path):
    return generate_tasks(tmp_path / "tasks", names=["sentiment", "topic"], n_train=32, n_eval=16)


def test_landings_complete_only_with_task_yaml_and_etag_covers_every_object(storage, task_dirs, tmp_path):
    d = task_dirs[0]
    prefix = storage.prefix + "/" if storage.prefix else ""
    storage.put(f"{prefix}incoming/datasets/{d.name}/train.jsonl", d / "train.jsonl")
    assert storage.list_landings() == []  # no task.yaml yet: incomplete
    key = storage.upload_task(d, "dataset", d.name)
    [landing] = storage.list_landings()
    assert (landing.key, landing.kind, landing.task) == (key, "dataset", "sentiment")
    assert landing.files == ("eval.jsonl", "task.yaml", "train.jsonl")
    # a changed train.jsonl under the same task.yaml is a new landing (new ETag)
    rows = (d / "train.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(rows[1:]) + "\n")
    storage.put(f"{prefix}incoming/datasets/{d.name}/train.jsonl", tmp_path / "train.jsonl")
    [again] = storage.list_landings()
    assert again.key == landing.key and again.etag != landing.etag
    assert storage.landing(key) == again  # the one-landing lookup lists only that landing's objects
    assert (
        storage.landing(key.replace("sentiment", "nosuchtask")) is None
        and storage.landing(f"{prefix}incoming/datasets/x/train.jsonl") is None
    )
    storage.mark(again, "rejected", {"reason": "because"})
    status = storage.status_of(again)
    assert status.pop("at") and status == {"key": key, "etag": again.etag, "status": "rejected", "reason": "because"}
    assert storage.status_of(landing) is None  # the status is per (key, ETag): the first content was never marked
    assert len(storage.list_landings()) == 1  # the status record is not a landing


def test_download_never_writes_unsafe_names(storage, task_dirs, tmp_path):
    d = task_dirs[0]
    prefix = storage.prefix + "/" if storage.prefix else ""
    storage.put(f"{prefix}incoming/datasets/{d.name}/nested/evil.jsonl", d / "train.jsonl")
    storage.upload_task(d, "dataset", d.name)
    [landing] = storage.list_landings()
    assert "nested/evil.jsonl" in landing.files
    out = storage.download(landing, tmp_path / "dl")
    assert sorted(p.name for p in out.iterdir()) == ["eval.jsonl", "task.yaml", "train.jsonl"]
    with pytest.raises(LandingRejected, match="not a plain file name"):
        validate_landing(out, landing.kind, landing.task, None, BASE, list(landing.files))


def test_storage_urls_are_checked(tmp_path):
    with pytest.raises(StorageError, match="credentials"):
        open_storage("s3://key:secret@bucket/p")
    with pytest.raises(StorageError, match="unknown options"):
        open_storage("s3://bucket/p?endpoint=x")
    with pytest.raises(StorageError, match="scheme"):
        open_storage("ftp://host/x")
    with pytest.raises(StorageError, match="escapes"):
        LocalStorage(tmp_path).put("../outside.txt", b"x")
    assert not (tmp_path.parent / "outside.txt").exists()
