"""The chain lock holds across machines: two processes whose workspaces are the same chain
(same chain id) but different directories — so the local fcntl lock cannot see the other —
are serialised by the Prefect global concurrency limit; two different chains are not."""

import json
import os
import subprocess
import sys

HOLD = """
import json, sys, time
from flows.lock import chain_lock
from pipelines.workspace import Workspace
with chain_lock(Workspace(sys.argv[1])):
    t0 = time.time(); time.sleep(2.0); t1 = time.time()
print(json.dumps([t0, t1]))
"""


def hold_both(tmp_path, same_chain: bool) -> list[list[float]]:
    from prefect.settings import PREFECT_API_URL

    roots = [tmp_path / "host-a" / "ws", tmp_path / "host-b" / "ws"]
    for i, root in enumerate(roots):
        root.mkdir(parents=True)
        (root / ".chain-id").write_text("sharedchain0001\n" if same_chain else f"chain{i:011d}\n")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "SHARE_CHAIN_LOCK": "prefect"}
    procs = [
        subprocess.Popen([sys.executable, "-c", HOLD, str(r)], env=env, stdout=subprocess.PIPE, text=True)
        for r in roots
    ]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    return sorted(json.loads(o.strip().splitlines()[-1]) for o in outs)


def test_two_workers_of_one_chain_never_overlap(tmp_path, prefect_harness):
    (a0, a1), (b0, b1) = hold_both(tmp_path / "same", same_chain=True)
    assert b0 >= a1  # the second holder started after the first released
    (c0, c1), (d0, d1) = hold_both(tmp_path / "other", same_chain=False)
    assert d0 < c1  # different chains run side by side: the test can tell
