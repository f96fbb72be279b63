"""A long history stays cheap and restorable: landings after 30 tasks re-score one task, write a
small delta, and hold memory and threads flat; 20 versions with rollbacks in between restore
bit-exactly from the DVC remote alone."""

import shutil
import threading

import psutil
import pytest

from pipelines import evaluate as ev
from pipelines import lineage
from pipelines.params import edit_params, load_params
from pipelines.storage import LocalStorage
from pipelines.update import build_version
from pipelines.workspace import Workspace
from share_core import state as st
from share_core.base import BaseSpec, load_base
from share_core.synthetic import shared_subspace_adapters, write_landing
from share_core.tasks import generate_tasks

BASE_ID = "tiny-minilm"


def landings(tmp_path, model_dir, n: int, seed: int = 3):
    template = generate_tasks(tmp_path / "template", names=["sentiment"], n_train=4, n_eval=16)[0]
    base = BaseSpec(model_id=BASE_ID, model_path=str(model_dir))
    model, _ = load_base(base)
    names = [f"task{i:03d}" for i in range(n)]
    for a in shared_subspace_adapters(
        model, names, 2, targets=base.targets(), heads=base.heads(), base_model_id=BASE_ID, rank=2, dim=4, seed=seed
    ):
        write_landing(tmp_path / "src", a, template)
    return tmp_path / "src", names


def workspace(root, model_dir, remote, compact_every: int = 32) -> Workspace:
    ws = Workspace(root)
    lineage.init_workspace(ws.root, remote=str(remote))
    edit_params(
        ws.params_path,
        base={"model_id": BASE_ID, "model_path": str(model_dir)},
        subspace={"compact_every": compact_every},
    )
    return ws


def test_landings_after_30_tasks_rescore_one_task_and_do_not_grow(tmp_path, tiny_model_dir, prefect_harness):
    from flows.continual import batch_absorb, continual_update

    src, names = landings(tmp_path, tiny_model_dir, 34)
    ws = workspace(tmp_path / "ws", tiny_model_dir, tmp_path / "remote")
    storage = LocalStorage(tmp_path / "bucket")
    for n in names[:30]:
        storage.upload_task(src / n, "adapter", n)
    assert len(batch_absorb(storage_url=storage.describe(), workspace=str(ws.root))["absorbed"]) == 30
    proc, seen = psutil.Process(), []
    for n in names[30:]:
        key = storage.upload_task(src / n, "adapter", n)
        out = continual_update(key=key, storage_url=storage.describe(), workspace=str(ws.root))
        rec = ev.read_record(ws, out["version"])
        m = st.read_manifest(ws.version_dir(out["version"]))
        seen.append(
            {
                "rss": proc.memory_info().rss,
                "threads": threading.active_count(),
                "rescored": rec.rescored,
                "certified": len(rec.certified),
                "stored": m.storage["stored_tasks"],
                "bytes": sum(f.stat().st_size for f in ws.version_dir(out["version"]).iterdir()),
            }
        )
    assert [s["rescored"] for s in seen] == [[n] for n in names[30:]]  # only the new task is scored
    assert [s["certified"] for s in seen] == [30, 31, 32, 33]
    assert [s["stored"] for s in seen] == [[n] for n in names[30:]]  # a delta: the new task, not all of them
    assert seen[-1]["bytes"] <= 1.2 * seen[0]["bytes"]
    assert seen[-1]["threads"] <= seen[1]["threads"]  # no thread per task or per landing
    assert seen[-1]["rss"] - seen[1]["rss"] < 64 * 2**20  # no model copy per task or per landing


@pytest.mark.parametrize("compact_every", [4])
def test_twenty_versions_with_rollbacks_restore_bit_exactly_from_the_remote(tmp_path, tiny_model_dir, compact_every):
    src, names = landings(tmp_path, tiny_model_dir, 20)
    ws = workspace(tmp_path / "ws", tiny_model_dir, tmp_path / "remote", compact_every)
    params = load_params(ws.params_path)
    shutil.copytree(src, ws.landings, dirs_exist_ok=True)
    registered, head = {}, None
    for i, n in enumerate(names, start=1):
        version = f"v{i:04d}"
        build_version(
            [ws.landings / n], "adapter", ws.version_dir(version), ws.version_dir(head) if head else None, params
        )
        lineage.add_version_stage(ws.root, version, [n], "adapter", head)
        registered[version] = st.read_manifest(ws.version_dir(version)).state_sha256
        head = {7: "v0004", 14: "v0010"}.get(i, version)  # two rollbacks: the next version builds on an older one
    lineage.record_version(ws.root, "v0020", "twenty versions")
    lineage.push(ws.root)
    kinds = {v: st.read_manifest(ws.version_dir(v)).storage for v in registered}
    assert kinds["v0008"]["chain"] == ["v0001", "v0002", "v0003", "v0004"]  # built on the rolled-back v0004
    assert sum(k["kind"] == "snapshot" for k in kinds.values()) >= 3
    shutil.rmtree(ws.versions)
    shutil.rmtree(ws.root / ".dvc" / "cache")
    for version, digest in sorted(registered.items(), reverse=True):
        lineage.checkout_version(ws.root, version)
        assert st.state_sha256(st.load(ws.version_dir(version))) == digest, version
