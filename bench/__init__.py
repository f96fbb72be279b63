"""Benchmarks of Share against baselines measured in the same run (`python -m bench.run_all`).

OpenMP threads sleep instead of spin-waiting: on cores shared with other jobs, spinning
intra-op threads wait for a descheduled sibling at every op boundary, which we measured to make
a MiniLM training step 5× and a merge 300× slower with 2 threads than with 1. Set here, before
anything imports torch, so every benchmark (and run_all's subprocesses) inherits it.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
