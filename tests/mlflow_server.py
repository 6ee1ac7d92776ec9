"""A real ``mlflow server`` on 127.0.0.1 that tests can stop and start again (tracking outages).

The server keeps its runs in ``<root>/mlflow.db`` and proxies artifacts into ``<root>/artifacts``
(``--artifacts-destination``, as ``cluster.yaml`` starts it), so a stopped server takes the
artifact uploads down with it, as on a cluster. Started again on the same root and port, it serves
the same store at the same URI (what ``mlflow_run.json`` records and ``ray_jobs.relog`` matches).

``mlflow server`` runs uvicorn (and, with job execution on, a job runner and seven huey consumers)
as child processes: the server is started in a session of its own and stopped by signalling that
whole process group (terminating the CLI alone left the huey consumers running, orphaned).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server`` over ``root``; :meth:`start`, :meth:`stop`, and :attr:`url` to log to.

    Args:
        root: folder of the SQLite store, the artifacts and ``server.log``.
        port: the port (default: a free one, kept across restarts).
    """

    def __init__(self, root: Path, port: int | None = None):
        self.root = Path(root)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120.0) -> str:
        """Start the server and wait until ``/health`` answers; returns :attr:`url`."""
        mlflow_cli = Path(sys.executable).parent / "mlflow"
        if not mlflow_cli.is_file():
            raise RuntimeError(f"the mlflow CLI is not installed beside {sys.executable}")
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root / "server.log", "a")  # noqa: SIM115  (the child holds it)
        self._proc = subprocess.Popen(
            [str(mlflow_cli), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "MLFLOW_HOST": "127.0.0.1", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        log.close()
        deadline = time.time() + timeout_s
        while not self.is_up():
            if self._proc.poll() is not None or time.time() > deadline:
                tail = (self.root / "server.log").read_text()[-2000:]
                self.stop()
                raise RuntimeError(f"mlflow server on port {self.port} did not start: {tail}")
            time.sleep(0.5)
        return self.url

    def is_up(self) -> bool:
        try:
            urllib.request.urlopen(f"{self.url}/health", timeout=2)
            return True
        except OSError:
            return False

    def stop(self, grace_s: float = 20.0) -> None:
        """Terminate the server and its workers (SIGTERM, then SIGKILL); returns once the port
        refuses connections."""
        if self._proc is None:
            return
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, sig)
            try:
                self._proc.wait(timeout=wait)
                # The group's other members (uvicorn) may outlive the CLI process by a moment.
                deadline = time.time() + wait
                while self.is_up() and time.time() < deadline:
                    time.sleep(0.1)
                if not self.is_up():
                    break
            except subprocess.TimeoutExpired:
                continue
        self._proc = None
