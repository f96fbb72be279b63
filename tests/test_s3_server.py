"""infra/s3_server.py: moto's S3 with the buckets on disk. Every kind of write the pipeline and
DVC make (put, overwrite, multipart upload, delete, DeleteObjects, bucket create) is on disk when
its response arrives: after a SIGKILL and a restart the bucket lists the same keys, bytes and
ETags (a multipart ETag included)."""

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import boto3
import pytest
from boto3.s3.transfer import TransferConfig

from infra import stack

from .conftest import free_port


def start(data: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, str(stack.S3_SERVER), "--host", "127.0.0.1", "--port", str(port), "--data", str(data)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with opener.open(f"http://127.0.0.1:{port}/", timeout=2):
                return proc
        except OSError:
            assert proc.poll() is None, "s3_server exited"
            time.sleep(0.2)
    raise AssertionError("s3_server did not answer in 60 s")


def kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


@pytest.fixture
def server(tmp_path):
    procs = []

    def run():
        port = free_port()
        procs.append(start(tmp_path / "s3", port))
        return procs[-1], boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")

    yield run
    for p in procs:
        if p.poll() is None:
            kill(p)


def listing(s3, bucket: str) -> dict[str, tuple[str, bytes]]:
    objs = s3.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {o["Key"]: (o["ETag"], s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()) for o in objs}


def test_writes_survive_a_sigkill_and_restart(server, tmp_path):
    proc, s3 = server()
    s3.create_bucket(Bucket="bkt")
    s3.create_bucket(Bucket="gone-bucket")
    s3.put_object(Bucket="bkt", Key="tasks/incoming/datasets/x/train.jsonl", Body=b"one\n")
    s3.put_object(Bucket="bkt", Key="tasks/incoming/datasets/x/train.jsonl", Body=b"two\n")  # an overwrite
    s3.put_object(Bucket="bkt", Key="dir with space/ü.txt", Body=b"odd key", Metadata={"who": "test"})
    for k in ("del/a", "del/b", "del/c"):
        s3.put_object(Bucket="bkt", Key=k, Body=k.encode())
    s3.delete_object(Bucket="bkt", Key="del/a")
    s3.delete_objects(Bucket="bkt", Delete={"Objects": [{"Key": "del/b"}]})
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(6 * 1024 * 1024))
    cfg = TransferConfig(multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024)
    s3.upload_file(str(big), "bkt", "dvcstore/big", Config=cfg)
    s3.delete_bucket(Bucket="gone-bucket")
    before = listing(s3, "bkt")
    assert set(before) == {"tasks/incoming/datasets/x/train.jsonl", "dir with space/ü.txt", "del/c", "dvcstore/big"}
    assert before["dvcstore/big"][0].endswith('-2"')  # a multipart ETag

    kill(proc)  # nothing flushed on the way out
    _, s3 = server()
    assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == ["bkt"]
    assert listing(s3, "bkt") == before
    assert s3.head_object(Bucket="bkt", Key="dir with space/ü.txt")["Metadata"] == {"who": "test"}
    assert before["tasks/incoming/datasets/x/train.jsonl"][1] == b"two\n"
