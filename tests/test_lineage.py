"""pipelines.lineage: a workspace's git + DVC repository — initialised once, committing only its
own files; DVC's cache and the workspace share one inode per file, so a landing and a version are
stored once on the workspace's disk (plus the remote), not copied into the cache."""

import os
import shutil

import pytest

from pipelines import lineage


def test_landings_and_versions_are_hard_links_into_the_cache(tmp_path):
    root = tmp_path / "ws"
    lineage.init_workspace(root)
    (root / "landings" / "a").mkdir(parents=True)
    (root / "landings" / "a" / "x.bin").write_bytes(os.urandom(4096))
    (root / "versions" / "v0001").mkdir(parents=True)
    (root / "versions" / "v0001" / "basis.safetensors").write_bytes(os.urandom(4096))
    lineage.add_version_stage(root, "v0001", ["a"], "adapter", None)
    cache = {p.stat().st_ino for p in (root / ".dvc" / "cache").rglob("*") if p.is_file()}
    for f in (root / "landings" / "a" / "x.bin", root / "versions" / "v0001" / "basis.safetensors"):
        assert f.stat().st_ino in cache and f.stat().st_nlink == 2, f
    assert lineage.cache_links(root, "versions") == {"files": 1, "linked": 1}


def test_workspace_init_is_idempotent_and_commits_only_its_own_files(tmp_path):
    lineage.init_workspace(tmp_path / "ws")
    (tmp_path / "ws" / "notes.txt").write_text("a user's file")  # untracked, not ignored
    lineage.init_workspace(tmp_path / "ws")  # `share serve` on an existing workspace
    assert len(lineage._git(tmp_path / "ws", "log", "--oneline").splitlines()) == 1
    assert "notes.txt" not in lineage._git(tmp_path / "ws", "ls-files")


def _version(root, version: str, landing: str) -> None:
    """A built version and its landing, as the build step leaves them (random bytes stand in)."""
    for path in (root / "landings" / landing / "x.bin", root / "versions" / version / "basis.safetensors"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(2048))


@pytest.fixture
def old_and_new(tmp_path):
    """v0001 staged as a workspace made before per-version stage files did it (its stage in the
    root dvc.yaml, its landing `dvc add`-ed), then v0002 and v0003 on it through add_version_stage."""
    root, remote = tmp_path / "ws", tmp_path / "remote"
    lineage.init_workspace(root, remote=str(remote))
    _version(root, "v0001", "a")
    lineage._dvc_cli(root, "add", "-q", "landings/a")
    spec = lineage._read_yaml(root / "dvc.yaml")
    lineage._write_yaml(
        root / "dvc.yaml", {**spec, "stages": {"v0001": lineage.stage("v0001", ["a"], "adapter", None)}}
    )
    lineage._dvc_cli(root, "commit", "-q", "-f", "v0001")
    lineage.record_version(root, "v0001", "v0001: a")
    for version, landing, parent in (("v0002", "b", "v0001"), ("v0003", "c", "v0002")):
        _version(root, version, landing)
        lineage.add_version_stage(root, version, [landing], "adapter", parent)
        lineage.record_version(root, version, f"{version}: {landing}")
    return root


def test_each_version_stages_its_landings_in_its_own_file_and_a_discard_removes_it(old_and_new):
    root = old_and_new
    stages = lineage._read_yaml(lineage.stage_file(root, "v0003"))["stages"]
    assert stages["landings"]["outs"] == ["landings/c"] and stages["landings"]["frozen"]
    assert stages["v0003"]["deps"] == ["landings/c", "versions/v0002"]
    assert [d["path"] for d in lineage.locked_stage(root, "v0003")["deps"]] == ["landings/c", "versions/v0002"]
    assert [d["path"] for d in lineage.locked_stage(root, "v0001")["deps"]] == ["landings/a"]  # the root dvc.lock
    assert not (root / "landings" / "c.dvc").exists()  # no .dvc file per landing
    # one ignore pattern per directory, whatever the history; the stage files and .dvc files are committed
    assert (root / "landings" / ".gitignore").read_text().splitlines() == lineage.OUT_DIR_IGNORES["landings"]
    tracked = lineage._git(root, "ls-files").splitlines()
    assert {"landings/a.dvc", "lineage/v0003/dvc.yaml", "lineage/v0003/dvc.lock"} <= set(tracked)
    assert not any(t.startswith(("landings/c/", "versions/v0003/")) for t in tracked)
    # DVC sees the whole chain: every stage up to date, the dag joins old and new files
    assert lineage._dvc_cli(root, "status", "--json").strip() in ("{}", "")
    dag = lineage.dag(root)
    assert all(f"{x}/{n}" in dag for x, n in (("versions", "v0001"), ("versions", "v0003"), ("landings", "c")))
    # a discarded version leaves no stage behind
    lineage.remove_version_stage(root, "v0003")
    assert not lineage.stage_file(root, "v0003").parent.exists() and lineage.locked_stage(root, "v0003") is None
    assert not any(t.startswith("lineage/v0003/") for t in lineage._git(root, "ls-files").splitlines())
    assert lineage.locked_stage(root, "v0002") is not None


def test_versions_and_landings_are_pushed_and_pulled_from_either_layout(old_and_new):
    root = old_and_new
    lineage.push(root, ["v0001"], ["a"])
    lineage.push(root, ["v0002"], ["b"])
    lineage.push(root, ["v0003"], ["c"])
    before = {v: (root / "versions" / v / "basis.safetensors").read_bytes() for v in ("v0001", "v0002", "v0003")}
    shutil.rmtree(root / "versions" / "v0001")
    shutil.rmtree(root / "versions" / "v0003")
    shutil.rmtree(root / ".dvc" / "cache")
    for v in ("v0001", "v0003"):
        lineage._pull_missing(root, [v])
        assert (root / "versions" / v / "basis.safetensors").read_bytes() == before[v]
    shutil.rmtree(root / "landings" / "c")
    lineage._dvc_cli(root, "pull", "-q", "lineage/v0003/dvc.yaml:landings")  # the landing came back too
    assert (root / "landings" / "c" / "x.bin").is_file()
