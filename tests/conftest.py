"""Shared fixtures: tiny random transformers models (built from a config, no download) and real
PEFT adapters saved by PEFT itself."""

import json
import os
import time
import urllib.error
import urllib.request

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

from tests.chains import chain, forker  # noqa: E402,F401 - fixtures of the crash and service tests

TINY_BERT = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100, num_labels=3
)


def tiny_bert(seed: int = 0, **overrides) -> BertForSequenceClassification:
    """The same random tiny BERT for the same seed (so its hash is stable)."""
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(**{**TINY_BERT, **overrides})).eval()


def save_peft_adapter(
    path,
    seed: int,
    r: int = 4,
    alpha: float = 8,
    targets=("query", "value"),
    base_seed: int = 0,
    base_name: str = "tiny-bert",
    **model_overrides,
):
    """A real PEFT LoRA with random (non-zero) factors and a trained-looking head, saved by PEFT."""
    model = tiny_bert(base_seed, **model_overrides)
    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(targets),
        modules_to_save=["classifier"],
        init_lora_weights=False,
        base_model_name_or_path=base_name,
    )
    pm = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.1)
    pm.save_pretrained(str(path))
    cfg_path = path / "adapter_config.json"  # PEFT writes the live model's (empty) name_or_path
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "base_model_name_or_path": base_name}))
    return path


def evaluation_record(version: str, scores: dict, **fields):
    """An evaluation record with `scores` and what a test leaves unsaid filled in plainly."""
    from pipelines.evaluate import EvaluationRecord

    tasks = fields.pop("tasks", list(scores))
    defaults = dict(parent=None, task="", mode="full", results={}, majority={}, first_scores=scores, acc=None, bwt=0.0)
    return EvaluationRecord(version=version, tasks=tasks, scores=scores, **{**defaults, **fields})


def write_record(ws, version: str, scores: dict, **fields):
    """The record written where the pipeline writes it (evaluations/<version>.json)."""
    record = evaluation_record(version, scores, **fields)
    ws.evaluations.mkdir(parents=True, exist_ok=True)
    ws.evaluation_path(version).write_text(json.dumps(record.to_json()))
    return record


@pytest.fixture
def adapters_dir(tmp_path):
    """Three PEFT adapters (r=4, lora_alpha=8) of the tiny BERT."""
    return [save_peft_adapter(tmp_path / f"task{j}", seed=10 + j) for j in range(3)]


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(123)
    return torch.randint(1, 100, (6, 9), generator=g)


# ---- pipeline fixtures: a tiny MiniLM-vocabulary model, moto S3 on loopback, Prefect harness ----
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
for _k, _v in {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}.items():
    os.environ.setdefault(_k, _v)  # moto's dummy credentials; never real ones


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer random BERT with MiniLM's tokenizer, saved like a hub model: the pipeline
    loads it through the same code path as MiniLM, in milliseconds per step."""
    from transformers import AutoTokenizer

    from share_core.base import minilm_path

    path = tmp_path_factory.mktemp("tiny-minilm")
    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=2,
        max_position_embeddings=64,
    )
    BertForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def moto_s3():
    """A moto S3 server bound to loopback (127.0.0.1; its default is all interfaces), stopped at the end of the
    session."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    """The same storage tests on a local directory and on a moto S3 bucket."""
    import boto3

    from pipelines.storage import open_storage

    if request.param == "local":
        return open_storage((tmp_path / "bucket").as_uri())
    endpoint = request.getfixturevalue("moto_s3")
    bucket = f"b{tmp_path.name[-20:].lower().replace('_', '-')}"  # moto lives for the session: one bucket per test
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    return open_storage(f"s3://{bucket}/landings?endpoint_url={endpoint}")


# ---- real servers in subprocesses: REST calls and bounded waits ----
def rest(url: str, body: dict | None = None):
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"},
        method="POST" if body is not None else "GET",
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for attempt in range(6):  # a busy sqlite-backed server answers 503 ("database is locked"): retry, as clients do
        try:
            with opener.open(req, timeout=10) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            if e.code != 503 or attempt == 5:
                raise
            time.sleep(0.5 * 2**attempt)


def wait_for(what: str, fn, timeout: float, procs: dict, poll: float = 0.5):
    """Poll `fn` until it returns something truthy; fail early if a watched process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            out = fn()
        except Exception:
            out = None
        if out:
            return out
        for name, (proc, log) in procs.items():
            if proc.poll() is not None:
                raise AssertionError(
                    f"{name} exited ({proc.returncode}) while waiting for {what}:\n{log.read_text()[-3000:]}"
                )
        time.sleep(poll)
    logs = "\n".join(f"---- {name}\n{log.read_text()[-2500:]}" for name, (_, log) in procs.items())
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{logs}")


# ---- `make test-fast`: the edit loop runs everything but the integration tests ----
# A test is an integration test when it needs the Prefect harness or lives in a module that starts
# servers, kills processes or trains the real model; `pytest -m "not integration"` leaves them out.
INTEGRATION_MODULES = {
    "test_servers",
    "test_stack",
    "test_crash_recovery",
    "test_crash_publish",
    "test_schedules",
    "test_lock",
    "test_train_pool",
    "test_watcher",
    "test_pipeline_e2e",
    "test_repo_pipeline",
    "test_minilm",
    "test_causal_pipeline",
    "test_service",
    "test_readme",
    "test_scale",
}


# The modules that hold a test worker for minutes (measured, slowest first). `make test` hands out
# whole files in collection order (xdist --dist loadfile --no-loadscope-reorder; the default order,
# most tests first, left the one-test train-pool file running alone at the end for 3 minutes), so
# they go first and the many short files fill the other workers around them.
SLOWEST_FIRST = [
    "test_crash_recovery",
    "test_crash_publish",
    "test_servers",
    "test_train_pool",
    "test_repo_pipeline",
    "test_scale",
    "test_pipeline_e2e",
    "test_schedules",
    "test_stack",
    "test_readme",
]


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module in INTEGRATION_MODULES or "prefect_harness" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)
    rank = {m: i for i, m in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], len(rank)))  # stable
