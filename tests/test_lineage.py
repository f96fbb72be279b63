"""pipelines.lineage: a workspace's git + DVC repository — initialised once, committing only its
own files; DVC's cache and the workspace share one inode per file, so a landing and a version are
stored once on the workspace's disk (plus the remote), not copied into the cache."""

import os

from pipelines import lineage


def test_landings_and_versions_are_hard_links_into_the_cache(tmp_path):
    root = tmp_path / "ws"
    lineage.init_workspace(root)
    (root / "landings" / "a").mkdir(parents=True)
    (root / "landings" / "a" / "x.bin").write_bytes(os.urandom(4096))
    (root / "versions" / "v0001").mkdir(parents=True)
    (root / "versions" / "v0001" / "basis.safetensors").write_bytes(os.urandom(4096))
    lineage.track_landings(root, ["a"])
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
