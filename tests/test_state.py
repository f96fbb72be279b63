"""Version storage: snapshots and deltas (frames + new tasks), bit-exact loads along a chain,
compaction, and what a version writes as the history grows."""

import hashlib
import json
import shutil

import pytest
import torch

from share_core import state as st
from share_core.model import ShareModel
from share_core.peft_io import read_adapter
from share_core.subspace import KPolicy

from .conftest import save_peft_adapter, tiny_bert


def _chain(tmp_path, n_versions: int, compact_every: int, k_max: int = 6, seed: int = 20):
    """v1 from two adapters, then one absorbed adapter per version, each saved beside its parent
    and the next built on the *loaded* parent (as the pipeline does)."""
    ads = [
        read_adapter(save_peft_adapter(tmp_path / "ad" / f"a{j}", seed=seed + j), name=f"t{j}")
        for j in range(n_versions + 1)
    ]
    vdir = tmp_path / "versions"
    share = ShareModel.from_adapters(tiny_bert(), ads[:2], base_model_id="tiny-bert", policy=KPolicy(k_max=k_max))
    st.save(share.state, vdir / "v0001", compact_every)
    memory = {"v0001": st.state_sha256(share.state)}
    for i in range(2, n_versions + 1):
        share = ShareModel(tiny_bert(), st.load(vdir / f"v{i - 1:04d}"))
        share.absorb([ads[i]])
        share.state.parent = f"v{i - 1:04d}"
        st.save(share.state, vdir / f"v{i:04d}", compact_every)
        memory[f"v{i:04d}"] = st.state_sha256(share.state)
    return vdir, memory


def test_deltas_load_bit_exactly_and_compact(tmp_path, tokens):
    vdir, memory = _chain(tmp_path, 7, compact_every=3)
    kinds = [st.read_manifest(vdir / f"v{i:04d}").storage["kind"] for i in range(1, 8)]
    assert kinds == ["snapshot", "delta", "delta", "delta", "snapshot", "delta", "delta"]
    assert st.chain(vdir / "v0007") == ["v0005", "v0006"]
    for v, digest in memory.items():
        loaded = st.load(vdir / v)
        assert st.state_sha256(loaded) == digest == st.read_manifest(vdir / v).state_sha256
    # a delta stores only its new task; a snapshot stores all of them
    assert st.read_manifest(vdir / "v0004").storage["stored_tasks"] == ["t4"]
    assert st.read_manifest(vdir / "v0005").storage["stored_tasks"] == [f"t{j}" for j in range(6)]
    # the loaded delta serves every task like the in-memory merge did
    share = ShareModel(tiny_bert(), st.load(vdir / "v0004"))
    again = ShareModel(tiny_bert(), st.load(vdir / "v0004"))
    for t in share.state.task_names:
        share.activate(t)
        again.activate(t)
        assert torch.equal(share(input_ids=tokens).logits, again(input_ids=tokens).logits)


def test_a_delta_needs_its_chain_intact(tmp_path):
    vdir, _ = _chain(tmp_path, 3, compact_every=8)
    shutil.rmtree(vdir / "v0001")
    with pytest.raises(st.VersionError, match="v0001.*missing"):
        st.load(vdir / "v0003")
    # a parent replaced by another version with the same name is refused, not silently used
    vdir2, _ = _chain(tmp_path / "other", 2, compact_every=8, seed=50)
    shutil.copytree(vdir2 / "v0001", vdir / "v0001")
    with pytest.raises(st.VersionError, match="not the version this delta was built on"):
        st.load(vdir / "v0003")


def test_bytes_written_per_version_do_not_grow_with_tasks(tmp_path):
    vdir, memory = _chain(tmp_path, 9, compact_every=100)
    size = lambda v: sum(f.stat().st_size for f in (vdir / v).glob("*.safetensors"))  # noqa: E731
    # with k saturated (k_max=6), versions 3..9 differ only by the task count
    assert size("v0009") <= size("v0003") * 1.05
    # a delta's manifest lists its own task (each task's entry is ~250 bytes); the reader appends it to its parent's
    text = lambda v: (vdir / v / "manifest.json").stat().st_size  # noqa: E731
    assert text("v0009") - text("v0003") < 6 * 100
    assert [t["name"] for t in json.loads((vdir / "v0009" / "manifest.json").read_text())["tasks"]] == ["t9"]
    assert st.read_manifest(vdir / "v0009").task_names == [f"t{j}" for j in range(10)]
    # a delta written before, listing every task, reads and loads the same
    m = json.loads((vdir / "v0009" / "manifest.json").read_text())
    m["tasks"] = [e.to_json() for e in st.read_manifest(vdir / "v0009").tasks]
    del m["storage"]["task_entries"], m["content_hash"]
    m["content_hash"] = hashlib.sha256(json.dumps(m, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    (vdir / "v0009" / "manifest.json").write_text(json.dumps(m))
    assert st.read_manifest(vdir / "v0009").task_names == [f"t{j}" for j in range(10)]
    assert st.state_sha256(st.load(vdir / "v0009")) == memory["v0009"]


def _legacy(vdir, version: str) -> None:
    """Rewrite a stored version in the per-task layout older versions used ("<task>/coef_b.<layer>"),
    its manifest re-hashed as such a version's was."""
    from safetensors.torch import load_file, save_file

    path = vdir / version
    m = json.loads((path / "manifest.json").read_text())
    stored = load_file(path / "tasks.safetensors")
    widths = {t["name"]: t["rank"] for t in m["tasks"]}
    names = m["storage"]["stored_tasks"]
    legacy = {k: v for k, v in stored.items() if "/head." in k}
    for key in [k for k in stored if k.startswith("coef_")]:
        side, layer = key.split(".", 1)
        for name, block in zip(names, torch.split(stored[key], [widths[n] for n in names], 1)):
            legacy[f"{name}/{side}.{layer}"] = block.contiguous()
    save_file(legacy, path / "tasks.safetensors")
    del m["storage"]["layout"], m["content_hash"]
    m["files"]["tasks.safetensors"] = hashlib.sha256((path / "tasks.safetensors").read_bytes()).hexdigest()
    m["content_hash"] = hashlib.sha256(json.dumps(m, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    (path / "manifest.json").write_text(json.dumps(m))


def test_stacked_layout_one_tensor_per_layer_and_side_and_older_layout_still_loads(tmp_path):
    """A version stores its tasks' coefficients side by side (one tensor per layer and side, so a
    load concatenates once per layer, not once per task); a version written per task still loads
    bit-exactly."""
    from safetensors import safe_open

    vdir, memory = _chain(tmp_path, 3, compact_every=8)
    with safe_open(vdir / "v0001" / "tasks.safetensors", "pt") as f:
        keys = list(f.keys())
    assert not [k for k in keys if "/coef_" in k] and [k for k in keys if k.startswith("coef_b.")]
    _legacy(vdir, "v0001")
    assert st.state_sha256(st.load(vdir / "v0001")) == memory["v0001"]


def test_a_corrupt_tensor_file_is_refused(tmp_path):
    vdir, _ = _chain(tmp_path, 2, compact_every=8)
    f = vdir / "v0001" / "tasks.safetensors"
    raw = f.read_bytes()
    f.write_bytes(raw[: len(raw) - 8])
    with pytest.raises(st.VersionError, match="sha256"):
        st.load(vdir / "v0001")
    with pytest.raises(st.VersionError, match="unreadable"):
        st._load_tensors(f)
