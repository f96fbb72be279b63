"""Soak: the service as users run it — `share stack up` + one `share serve` per chain for N
minutes, landings arriving on a schedule, flow-run processes SIGKILLed at random moments and the
Prefect server killed and restarted once; then every landing must have exactly one outcome.

Two chains (`a`, `b`: two storage prefixes of the stack's bucket, two workspaces, two MLflow
models) share one stack. Each chain gets, in turn: generated datasets (MiniLM, a few training
steps), PEFT adapters (absorbed without data), bad landings (2 rows; an undeclared label; an
adapter uploaded as a dataset) and duplicates (the same directory uploaded again: the same
landing, so no second outcome). Uploads go straight to S3 (boto3), as any client would,
bypassing `share land`'s local check so that bad landings reach the service.

A killer thread SIGKILLs a random flow-run process (a child of a `share serve` with
PREFECT__FLOW_RUN_ID in its environment, with its own children) every `--kill-every` seconds
on average; at 40 % of the landing phase the Prefect server's process group is SIGKILLed and
`share stack up` starts it again. After the landing phase the soak waits (`--drain-minutes`)
for outcomes, then checks:

- every landing (key, ETag) has exactly one outcome (storage status and the workspace ledger),
  the expected one (good → processed, bad → rejected); `lost` = landings without an outcome;
- every chain's champion (and HEAD) holds every task the chain processed;
- no MLflow run RUNNING and no Prefect flow run Running/Pending;
- `dvc status -c` of each workspace is clean;
- after `share stack down` / `up`, each champion loads with mlflow.pyfunc.load_model and predicts.

Latency beyond training: outcome time (status record) − upload time − the completed
`train-version` run's duration for that version (0 for absorbed adapters and rejections). It
includes waiting behind the chain's earlier landings and any crash recovery.

    python -m bench.soak --minutes 20       # results in bench/results/soak.{md,json}
    python -m bench.soak --quick            # 3 minutes, results/quick/
"""

from __future__ import annotations

import argparse
import calendar
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from infra.stack import free_ports

from .common import QUICK_RESULTS, RESULTS, Target, environment, fmt, md_table, write_report

BIN = Path(sys.executable).parent
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "OMP_WAIT_POLICY": "PASSIVE",
}
CHAINS = ("a", "b")
# what each chain receives, in turn (adapters are cheap: absorbed without training)
CYCLE = ["dataset", "adapter", "bad-rows", "adapter", "duplicate", "dataset", "bad-label", "adapter", "wrong-kind"]
GOOD = {"dataset", "adapter"}


@dataclass
class Landing:
    chain: str
    kind: str  # CYCLE's words
    task: str
    key: str
    etag: str
    uploaded: float  # epoch seconds, after task.yaml's upload
    expected: str  # processed | rejected | (duplicate: the original's)
    outcomes: list = field(default_factory=list)
    ledger_outcomes: list = field(default_factory=list)
    outcome_at: float | None = None
    train_s: float = 0.0


def rest(url: str, body: dict | None = None, timeout: float = 15):
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"},
        method="POST" if body is not None else "GET",
    )
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _proc_children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kids.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return kids


def descendants(pid: int) -> list[int]:
    kids, out, todo = _proc_children(), [], [pid]
    while todo:
        p = todo.pop()
        for c in kids.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def flow_run_of(pid: int) -> str | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for kv in environ:
        if kv.startswith(b"PREFECT__FLOW_RUN_ID="):
            return kv.split(b"=", 1)[1].decode()
    return None


class Soak:
    def __init__(self, args) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.root = Path(args.dir or tempfile.mkdtemp(prefix="share-soak-")).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.stack_dir = self.root / "stack"
        self.ports = free_ports(3)
        self.env = {**os.environ, **OFFLINE, "PREFECT_HOME": str(self.root / "prefect-client")}
        self.env.pop("SHARE_STORAGE", None)
        self.landings: list[Landing] = []
        self.duplicates: list[Landing] = []
        self.kills: list[dict] = []
        self.restarts: list[dict] = []
        self.serves: dict[str, subprocess.Popen] = {}
        self.stop_killing = threading.Event()
        self.lock = threading.Lock()

    # ---- the stack and the services -------------------------------------------------------------
    def share(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([str(BIN / "share"), *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"share {' '.join(args)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
        return r

    def stack_up(self) -> None:
        s3, mlflow, prefect = self.ports
        out = self.share(
            "stack",
            "up",
            "--data-dir",
            str(self.stack_dir),
            "--s3-port",
            str(s3),
            "--mlflow-port",
            str(mlflow),
            "--prefect-port",
            str(prefect),
        ).stdout
        for line in out.splitlines():  # `export KEY=value` lines, values shell-quoted
            k, _, v = line.removeprefix("export ").partition("=")
            self.env[k] = os.environ[k] = v.strip("'")  # this process uploads with boto3 too

    def storage_url(self, chain: str) -> str:
        return f"s3://share/chain-{chain}?endpoint_url={self.env['AWS_ENDPOINT_URL']}"

    def workspace(self, chain: str) -> Path:
        return self.root / f"ws-{chain}"

    def start_serve(self, chain: str) -> None:
        logf = open(self.root / f"serve-{chain}.log", "a")
        self.serves[chain] = subprocess.Popen(
            [
                str(BIN / "share"),
                "serve",
                "--storage",
                self.storage_url(chain),
                "-w",
                str(self.workspace(chain)),
                "--model-name",
                f"soak-{chain}",
                "--poll-seconds",
                "2",
            ],
            env={**self.env, "PREFECT_RUNNER_POLL_FREQUENCY": "2"},
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop_serves(self) -> None:
        for chain, p in self.serves.items():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for chain, p in self.serves.items():
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)

    @property
    def api(self) -> str:
        return self.env["PREFECT_API_URL"]

    # ---- landings -------------------------------------------------------------------------------
    def prepare_sources(self, per_chain: int) -> None:
        """Generated datasets (renamed copies of the 7 generated tasks), synthetic adapters and bad landings."""
        from pipelines.params import Params
        from share_core.base import load_base
        from share_core.synthetic import shared_subspace_adapters, write_landing
        from share_core.tasks import TASK_NAMES, generate_tasks

        self.src = self.root / "src"
        self.templates = generate_tasks(self.src / "templates", names=list(TASK_NAMES), n_train=48, n_eval=24)
        base = Params().base
        model, _ = load_base(base)
        names = [f"adapter-{c}{i}" for c in CHAINS for i in range(per_chain)]
        adapters = shared_subspace_adapters(
            model, names, 2, targets=base.targets(), heads=base.heads(), base_model_id=base.model_id, rank=8, dim=16
        )
        del model
        sentiment = next(t for t in self.templates if t.name == "sentiment")
        for a in adapters:
            write_landing(self.src / "adapters", a, sentiment, eval_rows=16)

    def make_dataset(self, name: str, template: Path, rows: int | None = None, bad_label: bool = False) -> Path:
        import yaml

        d = self.src / "datasets" / name
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(template, d)
        spec = yaml.safe_load((d / "task.yaml").read_text())
        spec["name"] = name
        (d / "task.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        if rows is not None:
            lines = (d / "train.jsonl").read_text().splitlines()[:rows]
            (d / "train.jsonl").write_text("\n".join(lines) + "\n")
        if bad_label:
            lines = (d / "train.jsonl").read_text().splitlines()
            row = json.loads(lines[0])
            row[spec.get("label_field", "label")] = "undeclared-label"
            (d / "train.jsonl").write_text("\n".join([json.dumps(row)] + lines[1:]) + "\n")
        return d

    def land(self, chain: str, kind: str, i: int) -> None:
        from pipelines.storage import open_storage

        storage = open_storage(self.storage_url(chain))
        template = self.templates[i % len(self.templates)]
        if kind == "duplicate":
            done = [x for x in self.landings if x.chain == chain and x.kind in GOOD]
            if not done:
                kind = "adapter"
            else:
                orig = self.rng.choice(done)
                d = self.src / ("adapters" if orig.kind == "adapter" else "datasets") / orig.task
                key = storage.upload_task(d, "adapter" if orig.kind == "adapter" else "dataset", orig.task)
                etag = storage.landing(key).etag
                dup = Landing(chain, "duplicate", orig.task, key, etag, time.time(), "duplicate-of:" + orig.etag)
                self.duplicates.append(dup)
                log(f"chain {chain}: duplicate of {orig.task} ({'same' if etag == orig.etag else 'NEW'} ETag)")
                return
        if kind == "dataset":
            name = f"{template.name}-{chain}{i}"
            d, up_kind, expected = self.make_dataset(name, template), "dataset", "processed"
        elif kind == "adapter":
            d = self.src / "adapters" / f"adapter-{chain}{self._next_adapter(chain)}"
            name, up_kind, expected = d.name, "adapter", "processed"
        elif kind == "bad-rows":
            name = f"tworows-{chain}{i}"
            d, up_kind, expected = self.make_dataset(name, template, rows=2), "dataset", "rejected"
        elif kind == "bad-label":
            name = f"badlabel-{chain}{i}"
            d, up_kind, expected = self.make_dataset(name, template, bad_label=True), "dataset", "rejected"
        else:  # wrong-kind: an adapter's files under incoming/datasets/
            src = self.src / "adapters" / f"adapter-{chain}{self._next_adapter(chain)}"
            name = f"wrongkind-{chain}{i}"
            d = self.src / "wrong" / name
            shutil.copytree(src, d)
            import yaml

            spec = yaml.safe_load((d / "task.yaml").read_text())
            (d / "task.yaml").write_text(yaml.safe_dump({**spec, "name": name}, sort_keys=False))
            up_kind, expected = "dataset", "rejected"
        key = storage.upload_task(d, up_kind, name)
        landing = storage.landing(key)
        self.landings.append(Landing(chain, kind, name, key, landing.etag, time.time(), expected))
        log(f"chain {chain}: landed {kind} {name}")

    def _next_adapter(self, chain: str) -> int:
        n = getattr(self, f"_adapters_{chain}", 0)
        setattr(self, f"_adapters_{chain}", n + 1)
        return n

    # ---- faults ---------------------------------------------------------------------------------
    def flow_run_processes(self) -> list[tuple[int, str]]:
        out = []
        for p in self.serves.values():
            for pid in descendants(p.pid):
                fr = flow_run_of(pid)
                if fr and not flow_run_of_parent_same(pid, fr):
                    out.append((pid, fr))
        return out

    def killer(self, until: float) -> None:
        while not self.stop_killing.is_set() and time.time() < until:
            wait = min(max(self.rng.expovariate(1 / self.args.kill_every), 5.0), 3 * self.args.kill_every)
            if self.stop_killing.wait(wait):
                return
            procs = self.flow_run_processes()
            if not procs:
                continue
            pid, fr = self.rng.choice(procs)
            victims = [pid] + descendants(pid)
            for v in victims:
                try:
                    os.kill(v, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            name = ""
            try:
                name = rest(f"{self.api}/flow_runs/{fr}", timeout=5)["name"]
            except Exception:
                pass
            with self.lock:
                self.kills.append(
                    {"at": time.time(), "pid": pid, "flow_run": fr, "name": name, "processes": len(victims)}
                )
            log(f"SIGKILL flow run {name or fr} (pid {pid}, {len(victims)} processes)")

    def restart_prefect(self) -> None:
        pid = int((self.stack_dir / "prefect.pid").read_text())
        t0 = time.time()
        os.killpg(pid, signal.SIGKILL)
        log("SIGKILL the Prefect server's process group")
        time.sleep(5)
        self.stack_up()
        self.restarts.append({"service": "prefect", "at": t0, "down_s": time.time() - t0})
        log(f"Prefect server back after {time.time() - t0:.0f} s")

    # ---- the run --------------------------------------------------------------------------------
    def run(self) -> dict:
        a = self.args
        per_chain = int(a.minutes * 60 / a.interval / len(CHAINS)) + 2
        log(f"root {self.root}; preparing landings")
        self.prepare_sources(per_chain)
        from pipelines import lineage
        from pipelines.params import Params

        params = Params().replace(train={"steps": a.steps})
        for c in CHAINS:
            lineage.init_workspace(self.workspace(c), params=params)
        t0 = time.time()
        self.stack_up()
        log(f"stack up in {time.time() - t0:.0f} s: {self.env['PREFECT_API_URL']}")
        for c in CHAINS:
            self.start_serve(c)
        self._wait_served()
        phase_end = time.time() + a.minutes * 60
        killer = threading.Thread(target=self.killer, args=(phase_end,), daemon=True)
        killer.start()
        restart_at = time.time() + 0.4 * a.minutes * 60
        restarted = False
        i, start = 0, time.time()
        while time.time() < phase_end:
            for c in CHAINS:
                kind = CYCLE[i % len(CYCLE)]
                try:
                    self.land(c, kind, i)
                except Exception as e:  # S3 down would be a finding, not a crash of the soak
                    log(f"upload failed: {type(e).__name__}: {e}")
            i += 1
            if not restarted and time.time() >= restart_at:
                self.restart_prefect()
                restarted = True
            nxt = start + i * a.interval
            while time.time() < min(nxt, phase_end):
                time.sleep(1)
        self.stop_killing.set()
        killer.join(timeout=30)
        log(f"landing phase over: {len(self.landings)} landings, {len(self.duplicates)} duplicates; draining")
        drained = self._drain(time.time() + a.drain_minutes * 60)
        return self._check(drained, time.time() - start)

    def _wait_served(self) -> None:
        deadline, last, stable = time.time() + 300, -1, 0
        while time.time() < deadline:
            for c, p in self.serves.items():
                if p.poll() is not None:
                    raise RuntimeError(
                        f"share serve ({c}) exited: {(self.root / f'serve-{c}.log').read_text()[-3000:]}"
                    )
            try:
                n = len(rest(f"{self.api}/deployments/filter", {"limit": 200}))
            except Exception:
                n = 0
            stable = stable + 1 if n >= 5 and n == last else 0
            last = n
            if stable >= 4:  # the count held for ~12 s: both serves have deployed
                log(f"{n} deployments served")
                return
            time.sleep(3)
        raise RuntimeError("the serves did not create their deployments in 300 s")

    def outcome(self, x: Landing) -> None:
        from pipelines.storage import open_storage

        storage = open_storage(self.storage_url(x.chain))
        landing = storage.landing(x.key)
        hist = [r for r in storage.status_history(landing)] if landing else []
        x.outcomes = [r for r in hist if r.get("etag") == x.etag]
        if x.outcomes and x.outcome_at is None:
            x.outcome_at = calendar.timegm(time.strptime(x.outcomes[0]["at"], "%Y-%m-%dT%H:%M:%SZ"))

    def _drain(self, deadline: float) -> bool:
        while True:
            for x in self.landings:
                if not x.outcomes:
                    try:
                        self.outcome(x)
                    except Exception:
                        pass
            missing = [x for x in self.landings if not x.outcomes]
            if not missing:
                log("every landing has an outcome")
                return True
            if time.time() >= deadline:
                log(f"drain timed out: {len(missing)} landings without an outcome")
                return False
            time.sleep(5)

    # ---- the checks -----------------------------------------------------------------------------
    def _check(self, drained: bool, phase_s: float) -> dict:
        import mlflow

        from pipelines.workspace import Workspace

        time.sleep(10)  # a landing's outcome is marked before its run ends
        for x in self.landings + self.duplicates:
            self.outcome(x)
            hist = Workspace(self.workspace(x.chain)).landing_history(x.key)
            x.ledger_outcomes = [r for r in hist if r.get("etag") == x.etag]
        trains = self._train_seconds()
        for x in self.landings:
            if x.outcomes and x.outcomes[0].get("status") == "processed":
                x.train_s = trains.get((str(self.workspace(x.chain)), x.outcomes[0].get("version")), 0.0)
        lost = [x for x in self.landings if not x.outcomes]
        multiple = [x for x in self.landings if len(x.outcomes) > 1 or len(x.ledger_outcomes) > 1]
        wrong = [x for x in self.landings if x.outcomes and x.outcomes[-1].get("status") != x.expected]
        dup_extra = [x for x in self.duplicates if len(x.outcomes) > 1]

        client = mlflow.MlflowClient(tracking_uri=self.env["MLFLOW_TRACKING_URI"])
        champions = {}
        for c in CHAINS:
            processed = {
                x.task
                for x in self.landings
                if x.chain == c and x.outcomes and x.outcomes[-1].get("status") == "processed"
            }
            ws = Workspace(self.workspace(c))
            head = (ws.root / "HEAD").read_text().strip() if (ws.root / "HEAD").exists() else None
            champ = None
            try:
                mv = client.get_model_version_by_alias(f"soak-{c}", "champion")
                champ = mv.tags.get("share.version")
            except Exception as e:
                log(f"chain {c}: no champion ({type(e).__name__})")
            champions[c] = {
                "processed": sorted(processed),
                "head": head,
                "champion": champ,
                "head_missing": sorted(processed - self._tasks(ws, head)),
                "champion_missing": sorted(processed - self._tasks(ws, champ)),
            }
        running_mlflow = []
        for exp in client.search_experiments():
            for r in client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'"):
                running_mlflow.append(f"{exp.name}/{r.info.run_name or r.info.run_id}")
        running_prefect = self._prefect_running()
        dvc = {c: self._dvc_status(c) for c in CHAINS}
        self.stop_serves()
        running_prefect_after = self._prefect_running()
        log("final stack restart")
        self.share("stack", "down", "--data-dir", str(self.stack_dir))
        self.stack_up()
        loads = {c: self._load_champion(c, champions[c]["champion"]) for c in CHAINS}
        self.share("stack", "down", "--data-dir", str(self.stack_dir))

        beyond = [x.outcome_at - x.uploaded - x.train_s for x in self.landings if x.outcome_at is not None]
        return {
            "phase_s": phase_s,
            "drained": drained,
            "landings": [asdict(x) for x in self.landings],
            "duplicates": [asdict(x) for x in self.duplicates],
            "kills": self.kills,
            "restarts": self.restarts,
            "lost": [x.key for x in lost],
            "multiple_outcomes": [x.key for x in multiple],
            "wrong_outcome": [
                (x.key, x.expected, x.outcomes[-1].get("status"), x.outcomes[-1].get("reason")) for x in wrong
            ],
            "duplicate_extra_outcomes": [x.key for x in dup_extra],
            "champions": champions,
            "running_mlflow": running_mlflow,
            "running_prefect": running_prefect,
            "running_prefect_after_serve_stop": running_prefect_after,
            "dvc_status": dvc,
            "loads": loads,
            "latency_beyond_training_s": beyond,
        }

    @staticmethod
    def _tasks(ws, version: str | None) -> set[str]:
        if not version:
            return set()
        from share_core import state as st

        try:
            return set(st.read_manifest(ws.version_dir(version)).task_names)
        except (OSError, ValueError, KeyError):  # VersionError is a ValueError
            return set()

    def _train_seconds(self) -> dict:
        out = {}
        try:
            runs = rest(
                f"{self.api}/flow_runs/filter",
                {
                    "flows": {"name": {"any_": ["train-version"]}},
                    "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}},
                    "limit": 200,
                },
            )
        except Exception as e:
            log(f"could not read train-version runs: {e}")
            return out
        for r in runs:
            p = r.get("parameters") or {}
            out[(p.get("workspace"), p.get("version"))] = float(r.get("total_run_time") or 0.0)
        return out

    def _prefect_running(self) -> list[str]:
        try:
            runs = rest(
                f"{self.api}/flow_runs/filter",
                {"flow_runs": {"state": {"type": {"any_": ["RUNNING", "PENDING"]}}}, "limit": 200},
            )
            return [f"{r['name']} ({r['state_name']})" for r in runs]
        except Exception as e:
            return [f"(Prefect API unreadable: {type(e).__name__})"]

    def _dvc_status(self, chain: str) -> dict:
        r = subprocess.run(
            [str(BIN / "dvc"), "status", "-c", "--json"],
            cwd=self.workspace(chain),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        try:
            body = json.loads(r.stdout or "{}")
        except ValueError:
            body = {"unparsed": r.stdout[-500:]}
        return {"rc": r.returncode, "clean": r.returncode == 0 and not body, "out": body, "err": r.stderr[-500:]}

    def _load_champion(self, chain: str, champion: str | None) -> dict:
        """mlflow.pyfunc.load_model of the chain's champion in a fresh process, and one prediction for
        each of its tasks."""
        from pipelines.workspace import Workspace

        tasks = sorted(self._tasks(Workspace(self.workspace(chain)), champion))
        if not tasks:
            return {"ok": False, "error": "no champion with tasks"}
        probe = (
            "import json, sys, mlflow.pyfunc, pandas as pd\n"
            f"m = mlflow.pyfunc.load_model('models:/soak-{chain}@champion')\n"
            "tasks = sys.argv[1:]\n"
            "out = m.predict(pd.DataFrame({'task': tasks, 'text': ['a great film'] * len(tasks)}))\n"
            "print(json.dumps(out['label'].tolist()))\n"
        )
        r = subprocess.run(
            [sys.executable, "-c", probe, *tasks],
            env={
                **self.env,
                "SHARE_WORKSPACE": str(self.workspace(chain)),
                "MLFLOW_REGISTRY_URI": self.env["MLFLOW_TRACKING_URI"],
            },
            capture_output=True,
            text=True,
            timeout=600,
        )
        return {
            "ok": r.returncode == 0 and len(json.loads(r.stdout.strip().splitlines()[-1] or "[]")) == len(tasks)
            if r.returncode == 0
            else False,
            "tasks": len(tasks),
            "out": r.stdout.strip()[-200:],
            "error": r.stderr[-800:] if r.returncode else "",
        }

    def cleanup(self) -> None:
        try:
            self.stop_serves()
        except Exception:
            pass
        try:
            self.share("stack", "down", "--data-dir", str(self.stack_dir), check=False, timeout=120)
        except Exception:
            pass


def flow_run_of_parent_same(pid: int, fr: str) -> bool:
    """True when pid's parent runs the same flow run (so only the top process of a run is listed)."""
    try:
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return False
    return flow_run_of(ppid) == fr


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def report(res: dict, args, wall_s: float, env: dict) -> None:
    """env: the environment when the soak started (its commit is the code the services ran)."""
    landings = res["landings"]
    n_good = sum(x["expected"] == "processed" for x in landings)
    beyond = res["latency_beyond_training_s"]
    p50, p95 = percentile(beyond, 0.5), percentile(beyond, 0.95)
    champs_ok = all(not c["champion_missing"] for c in res["champions"].values())
    counts = md_table(
        ["landings", "good", "bad", "duplicates", "kills", "Prefect restarts", "lost", "> 1 outcome", "wrong outcome"],
        [
            [
                len(landings),
                n_good,
                len(landings) - n_good,
                len(res["duplicates"]),
                len(res["kills"]),
                len(res["restarts"]),
                len(res["lost"]),
                len(res["multiple_outcomes"]) + len(res["duplicate_extra_outcomes"]),
                len(res["wrong_outcome"]),
            ]
        ],
    )
    chains = md_table(
        [
            "chain",
            "processed tasks",
            "HEAD",
            "champion",
            "missing from HEAD",
            "missing from champion",
            "dvc status -c",
            "champion loads after restart",
        ],
        [
            [
                c,
                len(v["processed"]),
                v["head"],
                v["champion"],
                ", ".join(v["head_missing"]) or "none",
                ", ".join(v["champion_missing"]) or "none",
                "clean"
                if res["dvc_status"][c]["clean"]
                else f"NOT clean: {json.dumps(res['dvc_status'][c]['out'])[:200]} {res['dvc_status'][c]['err'][:200]}",
                "yes" if res["loads"][c]["ok"] else f"NO: {res['loads'][c]['error'][-200:]}",
            ]
            for c, v in res["champions"].items()
        ],
    )
    per = md_table(
        ["chain", "kind", "task", "outcome", "version / reason", "land → outcome s", "training s"],
        [
            [
                x["chain"],
                x["kind"],
                x["task"],
                x["outcomes"][-1]["status"] if x["outcomes"] else "**LOST**",
                (x["outcomes"][-1].get("version") or (x["outcomes"][-1].get("reason") or "")[:80])
                if x["outcomes"]
                else "",
                fmt(x["outcome_at"] - x["uploaded"], 0) if x["outcome_at"] else "",
                fmt(x["train_s"], 0),
            ]
            for x in landings
        ],
    )
    issues = []
    for name, items in (
        ("lost (no outcome)", res["lost"]),
        ("more than one outcome", res["multiple_outcomes"] + res["duplicate_extra_outcomes"]),
        ("unexpected outcome", [f"{k}: expected {e}, got {g} ({r})" for k, e, g, r in res["wrong_outcome"]]),
        ("MLflow runs RUNNING", res["running_mlflow"]),
        ("Prefect runs Running/Pending (serves up)", res["running_prefect"]),
        ("Prefect runs Running/Pending after the serves stopped", res["running_prefect_after_serve_stop"]),
    ):
        if items:
            issues.append(f"- {name}: " + "; ".join(map(str, items[:20])) + (" …" if len(items) > 20 else ""))
    targets = [
        Target(
            "every landing has exactly one outcome (lost = 0)",
            not res["lost"] and not res["multiple_outcomes"] and not res["duplicate_extra_outcomes"],
            f"{len(landings)} landings, lost {len(res['lost'])}, more than one outcome "
            f"{len(res['multiple_outcomes']) + len(res['duplicate_extra_outcomes'])}",
        ),
        Target(
            "each outcome is the expected one (good → processed, bad → rejected)",
            not res["wrong_outcome"],
            f"{len(res['wrong_outcome'])} unexpected",
        ),
        Target(
            "every chain's champion holds every processed task",
            champs_ok,
            "; ".join(f"{c}: {len(v['champion_missing'])} missing" for c, v in res["champions"].items()),
        ),
        Target(
            "no run left RUNNING/Running",
            not res["running_mlflow"] and not res["running_prefect_after_serve_stop"],
            f"MLflow {len(res['running_mlflow'])}, Prefect {len(res['running_prefect_after_serve_stop'])} after the "
            f"serves stopped ({len(res['running_prefect'])} while up)",
        ),
        Target(
            "`dvc status -c` clean in every workspace",
            all(v["clean"] for v in res["dvc_status"].values()),
            ", ".join(f"{c}: {'clean' if v['clean'] else 'not clean'}" for c, v in res["dvc_status"].items()),
        ),
        Target(
            "champions load after a final stack restart",
            all(v["ok"] for v in res["loads"].values()),
            ", ".join(f"{c}: {'yes' if v['ok'] else 'no'}" for c, v in res["loads"].items()),
        ),
    ]
    intro = (
        f"`share stack up` + `share serve` for 2 chains, {args.minutes:g} min of landings (one per chain every "
        f"{args.interval:g} s: {', '.join(CYCLE)}), MiniLM with {args.steps} training steps per dataset, a flow-run "
        f"process SIGKILLed every ~{args.kill_every:g} s, the Prefect server SIGKILLed and restarted once; then up to "
        f"{args.drain_minutes:g} min for outstanding outcomes "
        f"({'all arrived' if res['drained'] else 'NOT all arrived'}). "
        f"Latency beyond training = outcome − upload − the completed train-version run of that version: "
        f"p50 {fmt(p50, 0)} s, p95 {fmt(p95, 0)} s over {len(beyond)} landings with an outcome."
    )
    sections = ["**Counts**", counts, "**Chains**", chains]
    if issues:
        sections += ["**Findings**", "\n".join(issues)]
    sections += ["**Every landing**", per]
    write_report(
        args.out,
        "soak",
        "Soak: the service under kills and a Prefect restart",
        intro,
        sections,
        targets,
        {**res, "latency_p50_s": p50, "latency_p95_s": p95, "args": {k: str(v) for k, v in vars(args).items()}},
        env,
        wall_s,
        args.quick,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=20.0, help="length of the landing phase")
    p.add_argument("--quick", action="store_true", help="a 3-minute smoke run written to results/quick/")
    p.add_argument("--interval", type=float, default=50.0, help="seconds between landings (one per chain)")
    p.add_argument("--kill-every", type=float, default=75.0, help="mean seconds between flow-run SIGKILLs")
    p.add_argument("--drain-minutes", type=float, default=15.0, help="how long to wait for outstanding outcomes")
    p.add_argument("--steps", type=int, default=8, help="MiniLM training steps per dataset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", type=Path, default=None, help="working directory (default: a new temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the working directory")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--device", default="auto", help="accepted from bench.run_all: the services use CUDA when present")
    args = p.parse_args(argv)
    if args.quick:
        args.minutes, args.drain_minutes = min(args.minutes, 3.0), min(args.drain_minutes, 6.0)
    args.out = args.out or (QUICK_RESULTS if args.quick else RESULTS)
    os.environ.update(OFFLINE)
    t0, env = time.perf_counter(), environment()
    soak = Soak(args)
    try:
        res = soak.run()
    finally:
        soak.cleanup()
    report(res, args, time.perf_counter() - t0, env)
    if not args.keep and not args.dir:
        shutil.rmtree(soak.root, ignore_errors=True)
    else:
        log(f"kept {soak.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
