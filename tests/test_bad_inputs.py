"""Bad inputs measured in issue 9 (items 5-10), each against the real components: the ledger and
the bucket's status file keep a history per (key, ETag); oversized JSONL rows and YAML alias
bombs are refused fast with short reasons; reasons are bounded and never name a host path;
rollback ids are checked first; storage URLs never echo credentials."""

import json
import re
import tempfile
import time
import tracemalloc
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from pipelines import register, workspace
from pipelines.storage import StorageError, open_storage, redact_url
from pipelines.validate import LandingRejected, validate_landing
from pipelines.workspace import MAX_REASON, VersionIdError, Workspace, parse_version_id
from share_core import state as st
from share_core.model import ShareModel
from share_core.peft_io import AdapterError, read_adapter
from share_core.subspace import KPolicy
from share_core.taskdata import MAX_LINE_BYTES, MAX_TEXT_BYTES, TaskFormatError, read_examples, read_task_spec
from share_core.tasks import generate_tasks

from .conftest import tiny_bert, write_record
from .test_validate import BASE, _adapter_landing, _manifest

KEY = "incoming/datasets/sentiment/task.yaml"


# ---- 5. the ledger and the status file keep a history per (key, ETag) ------------------------
def test_ledger_keeps_a_processed_record_when_an_overwrite_is_rejected(tmp_path):
    ws = Workspace(tmp_path / "ws")
    ws.record_landing(KEY, {"etag": "e1", "status": "processed", "version": "v0001"})
    ws.record_landing(KEY, {"etag": "e2", "status": "rejected", "reason": "task 'sentiment' already exists"})
    assert ws.ledger()[KEY]["etag"] == "e2" and ws.ledger()[KEY]["status"] == "rejected"  # the latest outcome
    assert ws.processed_record(KEY, "e1")["version"] == "v0001"  # the overwrite hid nothing
    assert ws.seen(KEY, "e1")["status"] == "processed"  # re-uploading the original: a duplicate
    assert ws.seen(KEY, "e2")["status"] == "rejected" and ws.processed_record(KEY, "e2") is None
    assert ws.seen(KEY, "e3") is None and ws.seen("other/task.yaml", "e1") is None

    # a rejection of the very (key, ETag) that built a version (a re-run after a crash) never replaces it
    kept = ws.record_landing(KEY, {"etag": "e1", "status": "rejected", "reason": "task 'sentiment' already exists"})
    assert kept["status"] == "processed" and kept["version"] == "v0001"
    assert [(r["etag"], r["status"]) for r in ws.landing_history(KEY)] == [("e1", "processed"), ("e2", "rejected")]
    # the same outcome again is not repeated; reasons are bounded
    ws.record_landing(KEY, {"etag": "e2", "status": "rejected", "reason": "task 'sentiment' already exists"})
    assert len(ws.landing_history(KEY)) == 2
    long = ws.record_landing("k2", {"etag": "x", "status": "rejected", "reason": "y" * 100_000})
    assert len(long["reason"]) == MAX_REASON and long["reason"].endswith("…")
    assert json.loads(ws.ledger_path.read_text())["format"] == 2


def test_ledger_reads_the_first_format(tmp_path):
    ws = Workspace(tmp_path)
    old = {
        KEY: {"etag": "e1", "status": "processed", "version": "v0001"},
        "b/task.yaml": {"etag": "z", "status": "rejected", "reason": "r"},
    }
    ws.ledger_path.write_text(json.dumps(old))
    assert ws.ledger() == old
    assert ws.seen(KEY, "e1") == old[KEY]
    ws.record_landing(KEY, {"etag": "e2", "status": "rejected", "reason": "already exists"})
    assert ws.processed_record(KEY, "e1")["version"] == "v0001" and ws.ledger()["b/task.yaml"] == old["b/task.yaml"]


def test_ledger_appends_one_line_per_outcome_and_folds_them_in_without_losing_any(tmp_path, monkeypatch):
    monkeypatch.setattr(workspace, "LEDGER_COMPACT_EVERY", 5)
    ws = Workspace(tmp_path)
    ws.record_landing("a/task.yaml", {"etag": "a1", "status": "processed", "version": "v0001"})
    folded = ws.ledger_path.read_bytes()  # the first outcome makes ledger.json
    for i in range(2):
        ws.record_landing(f"k{i}/task.yaml", {"etag": "x", "status": "rejected", "reason": f"bad {i}"})
    assert ws.ledger_path.read_bytes() == folded and len(ws.ledger_log_path.read_text().splitlines()) == 2
    # a crash mid-append leaves a torn line: skipped when read, and the next line is not glued to it
    with open(ws.ledger_log_path, "a") as f:
        f.write('{"key": "torn/task.yaml", "rec')
    assert "torn/task.yaml" not in ws.ledger()
    ws.record_landing("b/task.yaml", {"etag": "b1", "status": "processed", "version": "v0002"})
    assert ws.seen("b/task.yaml", "b1")["version"] == "v0002"
    # the fifth line folds everything into ledger.json (the log goes); a crash before the log was
    # removed replays lines already folded: nothing repeats, nothing moves
    log = ws.ledger_log_path.read_text()
    ws.record_landing("k0/task.yaml", {"etag": "y", "status": "rejected", "reason": "bad again"})
    assert not ws.ledger_log_path.exists()
    before = ws.ledger_history()
    ws.ledger_log_path.write_text(log)
    assert ws.ledger_history() == before
    assert sorted(before) == ["a/task.yaml", "b/task.yaml", "k0/task.yaml", "k1/task.yaml"]
    assert [r["etag"] for r in before["k0/task.yaml"]] == ["x", "y"]
    assert json.loads(ws.ledger_path.read_text())["landings"] == before
    ws.record_landing("c/task.yaml", {"etag": "c1", "status": "rejected", "reason": "bad"})  # the next outcome
    assert ws.ledger_log_path.read_text().count("\n") == 1  # started a new log: the folded one is gone
    assert ws.ledger_history() == {**before, "c/task.yaml": ws.landing_history("c/task.yaml")}


def test_status_file_keeps_the_processed_record_and_recognises_identical_content(storage, tmp_path):
    d = generate_tasks(tmp_path / "tasks", names=["sentiment"], n_train=16, n_eval=8)[0]
    original = d / "train.jsonl"
    storage.upload_task(d, "dataset", "sentiment")
    [first] = storage.list_landings()
    storage.mark(first, "processed", {"version": "v0001"})
    # an overwrite (new content, new ETag) is rejected
    saved = original.read_bytes()
    original.write_bytes(b"".join(saved.splitlines(keepends=True)[1:]))
    storage.upload_task(d, "dataset", "sentiment")
    [second] = storage.list_landings()
    assert second.etag != first.etag
    assert storage.status_of(second) is None  # pending until it is processed or rejected
    storage.mark(second, "rejected", {"reason": "task 'sentiment' already exists"})
    assert storage.status_of(second)["status"] == "rejected"
    assert storage.status_of(first)["status"] == "processed" and storage.status_of(first)["version"] == "v0001"
    # a later rejection of the processed ETag never replaces it
    assert storage.mark(first, "rejected", {"reason": "already exists"})["status"] == "processed"
    # the byte-identical original again: same ETag as the landing that built v0001
    original.write_bytes(saved)
    storage.upload_task(d, "dataset", "sentiment")
    [third] = storage.list_landings()
    assert third.etag == first.etag and storage.status_of(third)["version"] == "v0001"
    history = storage.status_history(third)
    assert [(r["etag"], r["status"]) for r in history] == [(first.etag, "processed"), (second.etag, "rejected")]
    # reasons are bounded in the status file too
    assert len(storage.mark(second, "rejected", {"reason": "x" * 50_000})["reason"]) == MAX_REASON


def test_status_file_of_the_first_format_is_read(tmp_path):
    storage = open_storage((tmp_path / "bucket").as_uri())
    d = generate_tasks(tmp_path / "tasks", names=["topic"], n_train=16, n_eval=8)[0]
    storage.upload_task(d, "dataset", "topic")
    [lnd] = storage.list_landings()
    storage.put(
        "status/datasets/topic.json",
        json.dumps({"key": lnd.key, "etag": lnd.etag, "status": "processed", "version": "v0003"}).encode(),
    )
    assert storage.status_of(lnd)["version"] == "v0003"
    storage.mark(lnd, "rejected", {"reason": "already exists"})
    assert storage.status_of(lnd)["version"] == "v0003"


# ---- 6. per-row limits in dataset JSONL ------------------------------------------------------
@pytest.fixture
def topic(tmp_path):
    return generate_tasks(tmp_path / "tasks", names=["sentiment", "topic"], n_train=32, n_eval=16)[1]


def _row(text: str) -> bytes:
    return (json.dumps({"text": text, "label": "food"}) + "\n").encode()


def test_a_50mb_row_is_rejected_fast_without_reading_it(topic):
    lines = (topic / "train.jsonl").read_bytes().splitlines(keepends=True)
    with open(topic / "train.jsonl", "wb") as f:
        f.writelines(lines[:2])
        f.write(_row("a" * 50_000_000))
        f.writelines(lines[2:])
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(LandingRejected) as err:
            validate_landing(topic, "dataset", "topic", _manifest(), BASE)
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (
        err.value.reason
        == f"train.jsonl:3: line is longer than {MAX_LINE_BYTES} bytes (the per-row limit; one example per line)"
    )
    assert seconds < 5 and peak < 8 * MAX_LINE_BYTES, (seconds, peak)


def test_a_text_value_over_the_limit_names_file_and_row(topic):
    rows = (topic / "eval.jsonl").read_bytes().splitlines(keepends=True)
    (topic / "eval.jsonl").write_bytes(b"".join(rows[:4]) + _row("é" * (MAX_TEXT_BYTES // 2 + 1)) + b"".join(rows[4:]))
    with pytest.raises(LandingRejected) as err:
        validate_landing(topic, "dataset", "topic", _manifest(), BASE)
    assert (
        err.value.reason == f"eval.jsonl:5: field 'text' is {MAX_TEXT_BYTES + 2} bytes; "
        f"the limit is {MAX_TEXT_BYTES} bytes per text value"
    )
    # exactly at the limit is fine
    (topic / "eval.jsonl").write_bytes(b"".join(rows[:4]) + _row("é" * (MAX_TEXT_BYTES // 2)) + b"".join(rows[4:]))
    assert validate_landing(topic, "dataset", "topic", _manifest(), BASE).name == "topic"


def test_row_limits_are_configurable(topic, monkeypatch):
    spec = read_task_spec(topic / "task.yaml")
    assert len(read_examples(topic / "train.jsonl", spec)) == 32
    with pytest.raises(TaskFormatError, match=r"train.jsonl:1: field 'text' is \d+ bytes; the limit is 10 bytes"):
        read_examples(topic / "train.jsonl", spec, max_text_bytes=10)
    with pytest.raises(TaskFormatError, match=r"train.jsonl:1: line is longer than 20 bytes"):
        read_examples(topic / "train.jsonl", spec, max_text_bytes=5, max_line_bytes=20)
    monkeypatch.setenv("SHARE_MAX_TEXT_BYTES", "12")  # one setting for every process of the chain
    with pytest.raises(LandingRejected, match="the limit is 12 bytes"):
        validate_landing(topic, "dataset", "topic", _manifest(), BASE)


def test_deeply_nested_json_is_a_clear_error(topic):
    (topic / "train.jsonl").write_text("[" * 200_000 + "\n")
    with pytest.raises(LandingRejected, match=r"train.jsonl:1: invalid JSON: nested too deeply"):
        validate_landing(topic, "dataset", "topic", _manifest(), BASE)


# ---- 7. YAML without alias expansion ----------------------------------------------------------
BOMB = (
    "\n".join(
        ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
        + [f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(8)]
        + ["name: topic", "type: sequence-classification", "labels: *i"]
    )
    + "\n"
)


def test_a_yaml_alias_bomb_is_refused_with_a_short_reason(topic):
    assert len(BOMB) < 600
    (topic / "task.yaml").write_text(BOMB)
    t0 = time.perf_counter()
    with pytest.raises(LandingRejected) as err:
        validate_landing(topic, "dataset", "topic", _manifest(), BASE)
    assert time.perf_counter() - t0 < 1
    assert (
        err.value.reason
        == "task.yaml: invalid YAML: anchors and aliases (&name, *name) are not allowed (line 1, column 4)"
    )


def test_yaml_anchors_are_refused_and_plain_specs_still_load(topic):
    good = (topic / "task.yaml").read_text()
    (topic / "task.yaml").write_text(good.replace("name: topic", "name: &n topic"))
    with pytest.raises(TaskFormatError, match="anchors and aliases"):
        read_task_spec(topic / "task.yaml")
    (topic / "task.yaml").write_text(good + "metric: *m\n")
    with pytest.raises(TaskFormatError, match="anchors and aliases"):
        read_task_spec(topic / "task.yaml")
    (topic / "task.yaml").write_text(good)
    assert read_task_spec(topic / "task.yaml").labels == ("food", "politics", "sports", "technology")


# ---- 8. reasons are bounded and name files relative to the landing ---------------------------
def _break_rank(d: Path) -> None:
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))


def _set_first_factor(value: float):
    def edit(d: Path) -> None:
        sd = load_file(d / "adapter_model.safetensors")
        k = next(k for k in sd if "lora_B" in k)
        sd[k][0, 0] = value
        save_file(sd, d / "adapter_model.safetensors")

    return edit


@pytest.mark.parametrize(
    "case, edit, expected",
    [
        ("r mismatch", _break_rank, r"^adapter_model\.safetensors: layer .*do not have rank r=8$"),
        ("nan", _set_first_factor(float("nan")), r"^adapter_model\.safetensors: tensor .* has NaN/Inf"),
        ("inf", _set_first_factor(float("inf")), r"^adapter_model\.safetensors: tensor .* has NaN/Inf"),
    ],
)
def test_adapter_reasons_name_the_file_never_the_worker_temp_dir(tmp_path, case, edit, expected):
    src = _adapter_landing(tmp_path, "number")
    with tempfile.TemporaryDirectory() as tmp:  # where the flow downloads a landing: /tmp/tmpXXXX
        local = Path(tmp) / "landing"
        local.mkdir()
        for f in src.iterdir():
            (local / f.name).write_bytes(f.read_bytes())
        edit(local)
        with pytest.raises(AdapterError) as direct:
            read_adapter(local)
        with pytest.raises(LandingRejected) as err:
            validate_landing(local, "adapter", "number", _manifest(), BASE)
    for message in (str(direct.value), err.value.reason):
        assert re.match(expected, message), message
        assert tmp not in message and tempfile.gettempdir() not in message and len(message) <= MAX_REASON


def test_every_reason_is_bounded(topic):
    labels = "\n".join(f"  - {'x' * 2000}{i}" for i in range(20))
    (topic / "task.yaml").write_text(
        f"name: topic\ntype: sequence-classification\nlabels:\n{labels}\n  - {'x' * 2000}0\n"
    )
    with pytest.raises(LandingRejected) as err:
        validate_landing(topic, "dataset", "topic", _manifest(), BASE)
    assert err.value.reason.startswith("task.yaml: field 'labels' is ") and len(err.value.reason) <= MAX_REASON
    assert len(LandingRejected("y" * 10_000).reason) == MAX_REASON


# ---- 9. rollback ids are checked first ----------------------------------------------------------
def test_parse_version_id():
    assert [parse_version_id(x) for x in ("v3", "3", "v0003", "V3", " v03 ")] == ["v0003"] * 5
    assert parse_version_id("v12345") == "v12345"
    assert parse_version_id("2", ["v0001", "v0002"]) == "v0002"
    for bad in ("latest", "../v0001", "v0001/..", "v-1", "", "v3.0", "versions/v0001"):
        with pytest.raises(
            VersionIdError, match=r"is not a version id \(use v3, 3 or v0003\); existing versions: v0001, v0002$"
        ):
            parse_version_id(bad, ["v0002", "v0001"])
    with pytest.raises(VersionIdError, match=r"^version v0099 does not exist; existing versions: v0001, v0002$"):
        parse_version_id("v0099", ["v0001", "v0002"])
    with pytest.raises(VersionIdError, match="no versions exist yet"):
        parse_version_id("1", [])


@pytest.fixture
def registered(tmp_path, adapters_dir, monkeypatch):
    """Two real versions (v0001: one adapter; v0002: a second absorbed) registered in a sqlite
    MLflow store; champion = HEAD = v0002."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ws = Workspace(tmp_path / "ws")
    share = ShareModel.from_adapters(
        tiny_bert(), [read_adapter(adapters_dir[0])], base_model_id="tiny-bert", policy=KPolicy(k_max=4)
    )
    for version, parent in (("v0001", None), ("v0002", "v0001")):
        if parent:
            share.absorb([read_adapter(adapters_dir[1])])
        share.state.parent = parent
        share.state.extra = {"added": [share.state.task_names[-1]], "kind": "adapter"}
        st.save(share.state, ws.version_dir(version))
        scores = {t: 0.9 for t in share.state.task_names}
        write_record(ws, version, scores, parent=parent, majority={t: 0.5 for t in scores}, acc=0.9)
        reg = register.Registry(ws, "m")
        gate = register.gate_for(reg, version, tolerance=1.0)
        run_id = register.log_run(reg, version, landing={"key": f"k{version}", "etag": "e"}, lineage={}, gate=gate)
        register.move_aliases(
            reg, register.register_model_version(reg, version, run_id, gate=gate), promote=gate["passed"]
        )
        ws.set_head(version)
    return ws


def _runs(ws: Workspace) -> int:
    c = register.Registry(ws).client()
    return len(c.search_runs([c.get_experiment_by_name("m").experiment_id]))


def test_rollback_cli_lists_existing_versions_for_a_wrong_id(registered):
    from flows.cli import app

    ws = registered
    runs = _runs(ws)
    for bad, line in (
        ("v0099", "error: version v0099 does not exist; existing versions: v0001, v0002"),
        ("latest", "error: 'latest' is not a version id (use v3, 3 or v0003); existing versions: v0001, v0002"),
        ("../v0001", "error: '../v0001' is not a version id (use v3, 3 or v0003); existing versions: v0001, v0002"),
    ):
        out = CliRunner().invoke(app, ["rollback", bad, "-w", str(ws.root), "--model-name", "m"])
        assert out.exit_code == 2 and out.output.strip() == line, out.output
        assert "Traceback" not in out.output
    # the current champion (and HEAD), written 2: nothing to do, no run, no Prefect flow
    out = CliRunner().invoke(app, ["rollback", "2", "-w", str(ws.root), "--model-name", "m"])
    assert out.exit_code == 0 and "v0002 is already the champion and HEAD: nothing to do" in out.output
    assert _runs(ws) == runs and ws.head() == "v0002"


def test_register_rollback_normalises_ids_and_is_a_noop_for_the_champion(registered):
    ws = registered
    runs = _runs(ws)
    with pytest.raises(VersionIdError, match="existing versions: v0001, v0002"):
        register.rollback(register.Registry(ws, "m"), "v0099")
    assert _runs(ws) == runs and ws.head() == "v0002"
    reg = register.Registry(ws, "m")
    moved = register.rollback(reg, "1", reason="test")
    assert (moved["champion"], moved["previous"], moved["noop"]) == ("v0001", "v0002", False)
    assert ws.head() == "v0001" and register.champion_version(reg) == "v0001" and _runs(ws) == runs + 1
    again = register.rollback(reg, "v0001")
    assert again["noop"] and again["run_id"] is None and _runs(ws) == runs + 1


# ---- 10. storage URLs never echo credentials ------------------------------------------------------
SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCYSECRET"


@pytest.mark.parametrize(
    "url",
    [
        f"s3://bucket/p?aws_secret_access_key={SECRET}",
        f"s3://bucket/p?endpoint_url=http://127.0.0.1:9000&aws_access_key_id=AKIAX&aws_secret_access_key={SECRET}",
        f"s3://AKIAX:{SECRET}@bucket/p",
        f"s3://bucket/p?endpoint_url=http://minio:{SECRET}@127.0.0.1:9000",
        f"s3://bucket/p?{SECRET}",
        f"s3:///p?token={SECRET}",
        f"file:///data/bucket?token={SECRET}",
        f"ftp://user:{SECRET}@host/x?password={SECRET}",
        f"s3://[bucket/p?aws_secret_access_key={SECRET}",
    ],
)
def test_storage_url_errors_never_echo_credentials(url):
    with pytest.raises(StorageError) as err:
        open_storage(url)
    assert SECRET not in str(err.value) and "AKIAX" not in str(err.value)
    assert SECRET not in redact_url(url)


def test_redacted_urls_keep_what_helps():
    assert (
        redact_url(f"s3://b/p?endpoint_url=http://127.0.0.1:9000&aws_secret_access_key={SECRET}")
        == "s3://b/p?endpoint_url=http://127.0.0.1:9000&aws_secret_access_key=***"
    )
    with pytest.raises(StorageError, match=r"unknown options \['aws_secret_access_key'\]"):
        open_storage(f"s3://b/p?aws_secret_access_key={SECRET}")
