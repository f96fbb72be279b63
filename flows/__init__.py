"""Prefect orchestration of the chain. Importing it sets the Prefect client's retry defaults
before Prefect is imported (an environment that sets them wins): 7 retries with exponential
backoff (2 s … 128 s, ~4 min) on 429/502/503/408 and connection errors — the sqlite server's
"database is locked" 503 under load — instead of 5 (~1 min)."""

import os

os.environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", "7")
