"""The `share` command line as a user at 2 a.m. meets it: short errors with a hint and a non-zero
exit (tracebacks only with --debug), fast failures naming a server that is down, $SHARE_STORAGE
as the storage default, eval-safe `share stack env`/`up` output, `share status` from the ledger,
version ids written 3 / v3 / v0003, help on every command. No server is started here: "down"
servers are closed loopback ports; the real binary runs as a subprocess where the exit path matters."""

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows import cli, servers
from infra import stack
from pipelines.journal import Journal
from pipelines.params import Params, save_params
from pipelines.workspace import Workspace

from .conftest import free_port, save_peft_adapter, tiny_bert

SHARE = str(Path(sys.executable).parent / "share")
EXPORT_LINE = re.compile(r"^export [A-Z_][A-Z0-9_]*=\S+$")


def lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def run(
    args: list[str], env: dict | None = None, cwd=None, timeout: float = 60
) -> tuple[subprocess.CompletedProcess, float]:
    """The installed `share` entry point, as a user runs it; (result, seconds)."""
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "SHARE_STORAGE", "SHARE_DEBUG")
    }
    t0 = time.monotonic()
    r = subprocess.run(
        [SHARE, *args], env={**base, **(env or {})}, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    return r, time.monotonic() - t0


def invoke(args: list[str], **env):
    """In-process, stdout and stderr apart; PREFECT/MLflow/storage variables cleared unless given."""
    clean = {
        "PREFECT_API_URL": None,
        "MLFLOW_TRACKING_URI": None,
        "SHARE_STORAGE": None,
        "SHARE_DEBUG": None,
        "COLUMNS": "250",
    }
    return CliRunner().invoke(cli.app, args, env={**clean, **env})


def assert_short_error(stderr: str, *needles: str, max_lines: int = 3) -> None:
    got = lines(stderr)
    assert 1 <= len(got) <= max_lines, stderr
    assert "Traceback" not in stderr, stderr
    for n in needles:
        assert n in stderr, (n, stderr)


@pytest.fixture
def ws(tmp_path) -> Workspace:
    """A workspace with params.yaml and two (manifest-only) versions: enough for id checks."""
    w = Workspace(tmp_path / "ws")
    save_params(w.params_path, Params())
    for v in ("v0001", "v0002"):
        (w.version_dir(v)).mkdir(parents=True)
        (w.version_dir(v) / "manifest.json").write_text("{}")
    return w


def closed_port_url(path: str = "") -> str:
    port = free_port()  # bound, then closed: nothing listens there
    return f"http://127.0.0.1:{port}{path}"


# ---- errors: one or two lines, a hint, non-zero; the traceback behind --debug ----------------
@pytest.mark.parametrize(
    "args",
    [["info", "v9999"], ["eval", "9999"], ["export", "v9999", "t", "out"], ["info", "latest"], ["eval", "../v0001"]],
)
def test_bad_version_id_is_one_line_naming_it_and_the_existing_ones(ws, args):
    r = invoke([*args, "-w", str(ws.root)])
    assert r.exit_code == 2
    assert_short_error(r.stderr, "v0001, v0002")
    assert ("v9999" if "9999" in args[1] else args[1]) in r.stderr
    assert r.stdout == ""


def test_debug_shows_the_traceback(ws):
    r = invoke(["--debug", "info", "v9999", "-w", str(ws.root)])
    assert r.exit_code == 2
    assert "Traceback (most recent call last)" in r.stderr and "VersionIdError" in r.stderr
    assert lines(r.stderr)[-1].startswith("error: version v9999 does not exist")
    r = invoke(["info", "v9999", "-w", str(ws.root)], SHARE_DEBUG="1")
    assert "Traceback (most recent call last)" in r.stderr


def test_unexpected_errors_are_short_too_with_the_debug_hint(ws):
    (ws.version_dir("v0002") / "manifest.json").write_text("{not json")
    r = invoke(["info", "2", "-w", str(ws.root)])
    assert r.exit_code == 1
    assert_short_error(r.stderr, "share --debug")


def test_rollback_of_an_unknown_version_through_the_real_entry_point(ws, tmp_path):
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=ws.tracking_uri, registry_uri=ws.tracking_uri)
    c.create_registered_model("share-subspace")
    for v in ("v0001", "v0002"):
        c.create_model_version("share-subspace", source=(tmp_path / v).as_uri(), tags={"share.version": v})
    r, _ = run(["rollback", "v9999", "-w", str(ws.root)])
    assert r.returncode == 2
    assert_short_error(r.stderr, "v9999", "existing versions: v0001, v0002")
    # the default workspace does not exist here: one line, and nothing is created
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    r, _ = run(["rollback", "v9999"], cwd=empty)
    assert r.returncode == 2
    assert_short_error(r.stderr, "no workspace at", "share-workspace", "--workspace")
    assert list(empty.iterdir()) == []


# ---- version ids: 3, v3, v0003 everywhere -----------------------------------------------------
def test_version_ids_3_v3_v0003_name_the_same_version(tmp_path):
    from share_core import state as st
    from share_core.model import ShareModel
    from share_core.peft_io import read_adapter
    from share_core.subspace import KPolicy

    w = Workspace(tmp_path / "ws")
    save_params(w.params_path, Params())
    ads = [read_adapter(save_peft_adapter(tmp_path / "ad" / f"a{j}", seed=10 + j), name=f"task{j}") for j in range(2)]
    st.save(
        ShareModel.from_adapters(tiny_bert(), ads, base_model_id="tiny-bert", policy=KPolicy(k_max=4)).state,
        w.version_dir("v0003"),
    )
    outs = []
    for text in ("3", "v3", "v0003", "V3"):
        r = invoke(["info", text, "-w", str(w.root)])
        assert r.exit_code == 0, r.output
        outs.append(r.stdout)
    assert "v0003" in outs[0] and "task0" in outs[0] and "task1" in outs[0]
    assert len(set(outs)) == 1
    # export checks the task before loading any model
    r = invoke(["export", "3", "nosuch", str(tmp_path / "out"), "-w", str(w.root)])
    assert r.exit_code == 2
    assert_short_error(r.stderr, "v0003 has no task 'nosuch'", "task0, task1")


# ---- servers that are down: fail within seconds, name the URL and `share stack up` ----------
def test_versions_with_mlflow_down_fails_fast(ws):
    url = closed_port_url()
    for args, env in (
        (["versions", "-w", str(ws.root), "--tracking-uri", url], {}),
        (["versions", "-w", str(ws.root)], {"MLFLOW_TRACKING_URI": url}),
    ):
        r, took = run(args, env=env, timeout=60)
        assert took < 10, took
        assert r.returncode != 0
        assert_short_error(r.stderr, url, "share stack up")


def test_a_server_that_accepts_but_never_answers_is_reported_within_the_timeout(monkeypatch):
    monkeypatch.setattr(servers, "PROBE_TIMEOUT", 0.5)
    with socket.socket() as srv:  # listens (the kernel completes connects) but never replies
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        url = f"http://127.0.0.1:{srv.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(servers.CLIError, match=re.escape(url) + ".*no answer within 0.5 s") as err:
            servers.require_mlflow(url)
        assert time.monotonic() - t0 < 3
        assert "share stack up" in err.value.hint
    assert servers.unreachable(closed_port_url()) == "connection refused"


def test_serve_refuses_without_a_prefect_api(tmp_path):
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    r, took = run(
        ["serve", "--storage", str(bucket), "-w", str(tmp_path / "ws")],
        env={"PREFECT_HOME": str(tmp_path / "prefect-home")},
    )
    assert r.returncode == 2
    assert_short_error(r.stderr, "PREFECT_API_URL", "--ephemeral", max_lines=1)
    assert not (tmp_path / "ws").exists()  # refused before anything was set up
    assert took < 10


def test_serve_with_the_prefect_api_down_fails_fast(tmp_path):
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    api = closed_port_url("/api")
    r, took = run(
        ["serve", "-w", str(tmp_path / "ws")],
        env={"PREFECT_API_URL": api, "SHARE_STORAGE": bucket.as_uri(), "PREFECT_HOME": str(tmp_path / "ph")},
    )
    assert took < 10, took
    assert r.returncode != 0
    assert_short_error(r.stderr, api, "share stack up")
    assert "ConnectError" not in r.stderr and not (tmp_path / "ws").exists()


# ---- storage: $SHARE_STORAGE default, bad URLs in one line -------------------------------------
def task_dir(tmp_path, name="mytask", rows: int = 8, labels: str = "[bad, good]") -> Path:
    """A dataset landing directory that passes validation (`rows` rows, labels bad/good)."""
    d = tmp_path / "tasks" / name
    d.mkdir(parents=True)
    data = "".join(f'{{"text": "review {i}", "label": "{("bad", "good")[i % 2]}"}}\n' for i in range(rows))
    (d / "train.jsonl").write_text(data)
    (d / "eval.jsonl").write_text(data)
    (d / "task.yaml").write_text(f"name: {name}\ntype: sequence-classification\nlabels: {labels}\n")
    return d


@pytest.mark.parametrize(
    "problem, reason",
    [
        ("two rows", "train.jsonl: 2 rows; at least 8"),
        ("undeclared label", "expected one of"),
        ("adapter as dataset", "--kind adapter"),
        ("dataset as adapter", "--kind dataset"),
    ],
)
def test_land_validates_before_uploading_and_refuses_with_the_reason(tmp_path, problem, reason):
    d = task_dir(
        tmp_path, rows=2 if problem == "two rows" else 8, labels="[bad, fine]" if "label" in problem else "[bad, good]"
    )
    kind = "adapter" if problem == "dataset as adapter" else "dataset"
    if problem == "adapter as dataset":
        for f in ("train.jsonl", "eval.jsonl"):
            (d / f).unlink()
        (d / "adapter_config.json").write_text("{}")
        (d / "adapter_model.safetensors").write_bytes(b"x")
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    t0 = time.monotonic()
    r = invoke(["land", str(d), "--storage", str(bucket), "--kind", kind])
    took = time.monotonic() - t0
    assert r.exit_code == 1, r.output
    assert_short_error(r.stderr, "nothing uploaded", reason, max_lines=2)
    assert not list(bucket.rglob("*"))  # nothing uploaded
    assert took < 5, took  # the check itself: no server, no model


def test_land_uploads_a_valid_dataset_and_no_check_skips_validation(tmp_path):
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    r = invoke(["land", str(task_dir(tmp_path)), "--storage", str(bucket)])
    assert r.exit_code == 0, r.output
    assert (bucket / "incoming/datasets/mytask/task.yaml").is_file()
    bad = task_dir(tmp_path, name="tiny", rows=2)
    r = invoke(["land", str(bad), "--storage", str(bucket), "--no-check"])  # the pipeline will reject it
    assert r.exit_code == 0, r.output
    assert (bucket / "incoming/datasets/tiny/task.yaml").is_file()


@pytest.mark.parametrize("url", ["ftp://x/y", "s3://", "MISSING_DIR"])
def test_bad_storage_url_is_one_line_naming_the_accepted_forms(tmp_path, url):
    url = str(tmp_path / "no-such-dir") if url == "MISSING_DIR" else url
    r = invoke(["land", str(task_dir(tmp_path)), "--storage", url])
    assert r.exit_code == 2
    assert_short_error(r.stderr, "file:///", "s3://bucket/prefix", max_lines=1)
    assert not (tmp_path / "no-such-dir").exists()


def test_share_storage_is_the_default_storage(tmp_path):
    d = task_dir(tmp_path)
    env_bucket, flag_bucket = tmp_path / "env-bucket", tmp_path / "flag-bucket"
    env_bucket.mkdir(), flag_bucket.mkdir()
    r = invoke(["land", str(d)], SHARE_STORAGE=env_bucket.as_uri())
    assert r.exit_code == 0, r.output
    assert (env_bucket / "incoming/datasets/mytask/task.yaml").is_file()
    r = invoke(["land", str(d), "--storage", str(flag_bucket)], SHARE_STORAGE=env_bucket.as_uri())  # the flag wins
    assert r.exit_code == 0, r.output
    assert (flag_bucket / "incoming/datasets/mytask/task.yaml").is_file()
    for args in (["land", str(d)], ["serve", "-w", str(tmp_path / "ws")]):
        r = invoke(args)
        assert r.exit_code == 2
        assert_short_error(r.stderr, "--storage", "SHARE_STORAGE", max_lines=1)


# ---- the stack's variables: eval-safe ---------------------------------------------------------
def bash_eval(script_output: str, names: list[str]) -> dict[str, str]:
    """Evaluate `script_output` in bash (errexit, nounset) and read the variables back."""
    probe = "; ".join(f'printf "%s=%s\\n" {n} "${{{n}}}"' for n in names)
    r = subprocess.run(
        ["bash", "-c", f'set -eu; eval "$OUT"; {probe}'],
        env={"PATH": os.environ["PATH"], "OUT": script_output},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    return dict(ln.split("=", 1) for ln in r.stdout.splitlines())


def test_stack_env_is_accepted_by_eval(tmp_path):
    expected = stack.env(stack.StackConfig(data_dir=tmp_path / "stack"))
    r, took = run(["stack", "env", "--data-dir", str(tmp_path / "stack")])
    assert r.returncode == 0 and took < 15
    assert all(EXPORT_LINE.match(ln) for ln in r.stdout.splitlines()), r.stdout
    assert "not running" in r.stderr and "share stack up" in r.stderr  # the note is on stderr only
    assert bash_eval(r.stdout, list(expected)) == expected
    # the documented form, verbatim
    sh = subprocess.run(
        ["bash", "-c", f'eval "$({SHARE} stack env --data-dir {tmp_path / "stack"})" && echo $SHARE_STORAGE'],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert sh.stdout.strip() == expected["SHARE_STORAGE"]


def test_stack_env_quotes_any_value(tmp_path, monkeypatch):
    nasty = {"SHARE_STORAGE": "s3://b/p?endpoint_url=http://h:1&region=x y", "OTHER": "a;b $HOME `id` 'q' \"d\" \\ *"}
    monkeypatch.setattr(stack, "env", lambda cfg: nasty)
    monkeypatch.setattr(stack, "status", lambda cfg: {})
    r = invoke(["stack", "env", "--data-dir", str(tmp_path / "stack")])
    assert r.exit_code == 0 and r.stderr == ""
    assert len(r.stdout.splitlines()) == 2 and all(ln.startswith("export ") for ln in r.stdout.splitlines())
    assert bash_eval(r.stdout, list(nasty)) == nasty


def test_stack_up_prints_only_exports_on_stdout(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(stack, "up", lambda cfg: started.append(cfg))
    monkeypatch.setattr(
        stack,
        "status",
        lambda cfg: {
            n: {"pid": 1, "running": True, "healthy": True, "url": "http://127.0.0.1:1"}
            for n in ("s3", "prefect", "mlflow")
        },
    )
    r = invoke(["stack", "up", "--data-dir", str(tmp_path / "stack")])
    assert r.exit_code == 0, r.output
    assert len(started) == 1
    assert r.stdout and all(EXPORT_LINE.match(ln) for ln in r.stdout.splitlines()), r.stdout
    assert "local stack" in r.stderr and "dummies" in r.stderr
    assert bash_eval(r.stdout, ["SHARE_STORAGE", "PREFECT_API_URL"]) == {
        k: stack.env(started[0])[k] for k in ("SHARE_STORAGE", "PREFECT_API_URL")
    }


def test_stack_failure_is_one_line(tmp_path, monkeypatch):
    def fail(cfg):
        raise stack.StackError("ports in use by other processes: mlflow (127.0.0.1:5000); choose other ports")

    monkeypatch.setattr(stack, "up", fail)
    r = invoke(["stack", "up", "--data-dir", str(tmp_path / "stack")])
    assert r.exit_code == 1 and r.stdout == ""
    assert_short_error(r.stderr, "ports in use", "127.0.0.1:5000")


# ---- share status: the ledger as a table ------------------------------------------------------
def test_status_shows_processed_rejected_in_progress_and_pending(ws):
    reason = "eval.jsonl:1: field 'label' is 'bad'; expected one of ['negative', 'positive']"
    ws.record_landing(
        "incoming/datasets/sentiment/task.yaml", {"etag": "e1" * 8, "status": "processed", "version": "v0001"}
    )
    ws.record_landing("incoming/datasets/broken/task.yaml", {"etag": "e2" * 8, "status": "rejected", "reason": reason})
    # a re-landing of sentiment that was rejected later: both landings are listed
    ws.record_landing(
        "incoming/datasets/sentiment/task.yaml", {"etag": "e3" * 8, "status": "rejected", "reason": "too few rows"}
    )
    Journal.open(ws, {"key": "incoming/adapters/number/task.yaml", "etag": "e4" * 8}, "adapter", "v0003", "v0002")
    (ws.root / cli.WATCHER_LEDGER).write_text(
        '{"incoming/datasets/topic/task.yaml": "e5e5e5e5e5e5", "incoming/datasets/broken/task.yaml": "'
        + "e2" * 8
        + '"}'
    )
    r = invoke(["status", "-w", str(ws.root)])
    assert r.exit_code == 0, r.output
    rows = {}
    for ln in r.stdout.splitlines():
        cells = [c.strip() for c in ln.split("│")]
        if len(cells) == 6 and cells[0] and cells[2] != "etag":
            rows[(cells[0], cells[2][:2])] = cells
    assert rows[("sentiment", "e1")][3:5] == ["processed", "v0001"]
    assert rows[("sentiment", "e3")][3:5] == ["rejected", "too few rows"]
    assert rows[("broken", "e2")][1] == "dataset" and rows[("broken", "e2")][3:5] == ["rejected", reason]
    assert rows[("number", "e4")][1:2] + rows[("number", "e4")][3:5] == ["adapter", "in progress", "→ v0003"]
    assert rows[("topic", "e5")][3] == "pending"
    assert len(rows) == 5  # broken's announcement has an outcome: not listed twice
    assert "1 processed, 2 rejected, 1 in progress, 1 pending" in r.stdout


def test_status_of_a_workspace_without_landings_and_of_none(ws, tmp_path):
    r = invoke(["status", "-w", str(ws.root)])
    assert r.exit_code == 0 and "no landings recorded" in r.stdout
    r = invoke(["status", "-w", str(tmp_path / "typo")])
    assert r.exit_code == 2
    assert_short_error(r.stderr, "no workspace at", "typo")


# ---- help everywhere ----------------------------------------------------------------------------
def test_every_command_and_option_has_help():
    import typer.main

    def walk(cmd, path):
        yield path, cmd
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, f"{path} {name}")

    missing = []
    for path, cmd in walk(typer.main.get_command(cli.app), "share"):
        if not (cmd.help or "").strip():
            missing.append(path)
        missing += [
            f"{path} {p.name}" for p in cmd.params if p.name != "help" and not (getattr(p, "help", None) or "").strip()
        ]
    assert missing == []
    for sub in (["stack", "up"], ["stack", "down"], ["stack", "status"], ["stack", "env"], ["status"], ["serve"]):
        r = invoke([*sub, "--help"])
        assert r.exit_code == 0 and "Usage" in r.stdout


def test_a_serve_made_workspace_gets_a_dvc_remote_beside_the_landings(tmp_path):
    """`share serve` initialises its workspace with the storage's DVC remote (what the demo has):
    `dvc status -c` works; an existing remote is kept; the S3 form lives under the prefix."""
    from pipelines import lineage

    bucket = tmp_path / "bucket"
    bucket.mkdir()
    ws = tmp_path / "ws"
    lineage.init_workspace(ws, storage_url=str(bucket))  # the call `share serve` makes
    dvc = str(Path(sys.executable).parent / "dvc")

    def config(key: str) -> str:  # `dvc remote list` wraps long paths at 80 columns: ask for each value
        return subprocess.run([dvc, "config", key], cwd=ws, capture_output=True, text=True, timeout=60).stdout.strip()

    assert config("core.remote") == "storage" and config("remote.storage.url") == str(bucket.resolve() / "dvcstore")
    r = subprocess.run([dvc, "status", "-c"], cwd=ws, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lineage.init_workspace(ws, storage_url=str(tmp_path))  # a later serve: the remote stays
    assert str(bucket.resolve() / "dvcstore") in (ws / ".dvc" / "config").read_text()
    assert lineage.storage_remote("s3://share/tasks?endpoint_url=http://127.0.0.1:9100") == (
        "s3://share/tasks/dvcstore",
        "http://127.0.0.1:9100",
    )


def test_stack_ports_are_options_and_remembered_by_the_data_dir(tmp_path, monkeypatch):
    """`share stack up --s3-port …` records its ports in the data dir: `env`/`down`/`status`
    of that data dir use them without the flags (a stack on free ports is still one command)."""
    started = []
    monkeypatch.setattr(stack, "up", started.append)
    monkeypatch.setattr(stack, "status", lambda cfg: {})
    d = tmp_path / "stack"
    r = invoke(
        ["stack", "up", "--data-dir", str(d), "--s3-port", "9911", "--mlflow-port", "9912", "--prefect-port", "9913"]
    )
    assert r.exit_code == 0, r.output
    assert (started[0].s3_port, started[0].mlflow_port, started[0].prefect_port) == (9911, 9912, 9913)
    d.mkdir(parents=True, exist_ok=True)
    (d / stack.STATE_FILE).write_text('{"s3_port": 9911, "mlflow_port": 9912, "prefect_port": 9913, "bucket": "share"}')
    r = invoke(["stack", "env", "--data-dir", str(d)])
    out = bash_eval(r.stdout, ["MLFLOW_TRACKING_URI", "PREFECT_API_URL", "AWS_ENDPOINT_URL"])
    assert out == {
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:9912",
        "PREFECT_API_URL": "http://127.0.0.1:9913/api",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9911",
    }
    assert stack.config(d, mlflow_port=9000).mlflow_port == 9000  # a flag wins over the record
