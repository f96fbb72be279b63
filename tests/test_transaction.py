"""pipelines.transaction: a discard removes only what the stale update itself built — never a
version that is HEAD, that another update built, or that another version is built on. (That the
plan equals the journal's steps is asserted when the module is imported.)"""

import json

from pipelines import transaction
from pipelines.journal import DISCARDED, Journal
from pipelines.register import Registry
from pipelines.workspace import Workspace
from share_core import state as st
from share_core.model import ShareModel
from share_core.peft_io import read_adapter
from share_core.subspace import KPolicy
from tests.conftest import tiny_bert


def _chain(tmp_path, adapters_dir, n: int) -> Workspace:
    """v0001 … v000n, each built on the previous one, provenance {"key": "k<i>"}."""
    ws = Workspace(tmp_path / "ws")
    share = ShareModel.from_adapters(
        tiny_bert(), [read_adapter(adapters_dir[0])], base_model_id="tiny-bert", policy=KPolicy(k_max=4)
    )
    for i in range(1, n + 1):
        if i > 1:
            share.absorb([read_adapter(adapters_dir[i - 1])])
        share.state.parent = f"v{i - 1:04d}" if i > 1 else None
        share.state.extra = {"provenance": {"key": f"k{i}"}}
        st.save(share.state, ws.version_dir(f"v{i:04d}"))
    return ws


def test_a_discard_refuses_what_it_did_not_build_or_what_others_depend_on(tmp_path, adapters_dir):
    ws = _chain(tmp_path, adapters_dir, 3)
    journal = Journal.open(ws, {"key": "k2"}, "adapter", "v0002", "v0001")
    ws.set_head("v0001")
    assert transaction.built_by(ws, journal) is None  # v0003 is built on v0002
    (ws.version_dir("v0003") / "manifest.json").unlink()  # nothing depends on v0002 now
    assert transaction.built_by(ws, journal).content_hash == st.read_manifest(ws.version_dir("v0002")).content_hash
    ws.set_head("v0002")
    assert transaction.built_by(ws, journal) is None  # HEAD is never discarded
    ws.set_head("v0001")
    other = Journal.open(ws, {"key": "k9"}, "adapter", "v0002", "v0001")  # same id, another landing
    assert transaction.built_by(ws, other) is None
    moved = Journal.open(ws, {"key": "k2b"}, "adapter", "v0002", "v0000")  # planned on another parent
    assert transaction.built_by(ws, moved) is None
    # a refused discard closes the journal and removes nothing
    assert transaction.undo(Registry(ws, "m"), other, reason="stale") is False
    assert (ws.version_dir("v0002") / "manifest.json").is_file()
    assert json.loads(other.path.read_text())["status"] == DISCARDED
