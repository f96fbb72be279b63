"""The CLI's view of its servers and its errors: probes that fail fast, naming the URL, when
MLflow, Prefect or S3 does not answer; and the mapping of any exception a command raises to one
line, an optional hint and an exit code."""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.parse
import urllib.request

from pipelines.storage import redact_url

PROBE_TIMEOUT = 3.0  # seconds: a server that does not answer by then is reported as down
LOOPBACK = ("127.0.0.1", "localhost", "::1")
STACK_HINT = 'start the local stack: `share stack up`, then eval "$(share stack env)"'


class CLIError(Exception):
    """A user error: `message` (one line) and an optional `hint` line, exit code `code`."""

    def __init__(self, message: str, hint: str | None = None, code: int = 1) -> None:
        super().__init__(message)
        self.hint, self.code = hint, code


def first_line(text: str, limit: int = 400) -> str:
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[: limit - 1] + "…"


def explain(e: BaseException) -> tuple[str, str | None, int]:
    """(one-line message, hint or None, exit code) for an exception a command raised."""
    if isinstance(e, CLIError):
        return str(e), e.hint, e.code
    if type(e).__name__ in ("VersionIdError", "StorageError"):  # pipelines.workspace / .storage: the input was wrong
        return first_line(e), None, 2
    if type(e).__name__ == "StackError":  # infra.stack, imported only by the stack commands
        return first_line(e), "`share stack status` shows each service; `share stack down` stops them", 1
    text = e.args[0] if isinstance(e, KeyError) and e.args else e  # KeyError's str() is a repr
    return f"{type(e).__name__}: {first_line(text)}", "run it again as `share --debug …` for the traceback", 1


def unreachable(url: str, timeout: float | None = None) -> str | None:
    """None when an HTTP server answers `url` (any status: something is there), else why not.
    Loopback requests bypass proxies (a corporate HTTP_PROXY must not see them)."""
    timeout = PROBE_TIMEOUT if timeout is None else timeout
    host = urllib.parse.urlparse(url).hostname or ""
    opener = urllib.request.build_opener(*([urllib.request.ProxyHandler({})] if host in LOOPBACK else []))
    try:
        with opener.open(url, timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None
    except urllib.error.URLError as e:
        reason = e.reason
    except (OSError, ValueError) as e:
        reason = e
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return f"no answer within {timeout:g} s"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    return first_line(getattr(reason, "strerror", None) or reason, 200)


def require_server(what: str, url: str, probe: str, hint: str) -> None:
    """Fail within PROBE_TIMEOUT seconds, naming `url`, when nothing answers `probe`."""
    why = unreachable(probe)
    if why:
        raise CLIError(f"{what} at {redact_url(url)} is not reachable ({why})", hint=hint)


def require_mlflow(uri: str) -> None:
    if uri.startswith(("http://", "https://")):
        require_server(
            "the MLflow tracking server",
            uri,
            uri.rstrip("/") + "/health",
            f"{STACK_HINT}; or point --tracking-uri / MLFLOW_TRACKING_URI at a running server",
        )


def prefect_api_url(profile: bool = True) -> str | None:
    """The Prefect API the flows will use: $PREFECT_API_URL, else (with `profile`) the active
    Prefect profile's; None means Prefect would start a temporary server."""
    url = os.environ.get("PREFECT_API_URL")
    if url is None and profile:
        from prefect.settings import get_current_settings  # noqa: PLC0415 - Prefect only when asked: flows/cli.py imports this module, `share --help` stays fast

        url = get_current_settings().api.url
    return (url or "").strip() or None


def require_prefect(url: str | None) -> None:
    if url:
        require_server(
            "the Prefect API",
            url,
            url.rstrip("/") + "/health",
            f"{STACK_HINT}; or point PREFECT_API_URL at a running Prefect server",
        )
