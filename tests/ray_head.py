"""A private ``ray start --head`` on 127.0.0.1 for the ``ray job submit`` tests.

Token authentication stays on (Ray 2.60): the client side runs with ``RAY_AUTH_MODE=token`` and
reads the token that ``ray start`` wrote. Only this head's processes are stopped afterwards
(``ray stop`` would kill every Ray process on the machine).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_own_head(temp_dir: Path, grace_s: float = 30.0) -> None:
    """Stop the head started with ``--temp-dir=temp_dir``: its processes name that folder."""

    def own_pids() -> list[int]:
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(temp_dir) in cmdline:
                pids.append(int(proc.name))
        return pids

    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for pid in own_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + wait
        while own_pids() and time.time() < deadline:
            time.sleep(0.5)


@contextlib.contextmanager
def local_head(num_cpus: int = 2) -> Iterator[tuple[str, dict[str, str]]]:
    """Start a head; yields (dashboard address for ``ray job submit``, client environment)."""
    bin_dir = Path(sys.executable).parent
    ports = {name: free_port() for name in ("gcs", "dashboard", "client", "agent", "metrics")}
    # A private, short session folder (Unix socket paths are limited to ~107 bytes) that also
    # identifies this head's processes for stop_own_head.
    temp_dir = Path(tempfile.mkdtemp(prefix="igray-", dir="/tmp"))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("RAY_ADDRESS", None)
    start = [str(bin_dir / "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
             "--dashboard-host=127.0.0.1", f"--port={ports['gcs']}",
             f"--dashboard-port={ports['dashboard']}", f"--ray-client-server-port={ports['client']}",
             f"--dashboard-agent-listen-port={ports['agent']}", f"--metrics-export-port={ports['metrics']}",
             f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    try:
        subprocess.run(start, check=True, env=env, timeout=300, capture_output=True)
        # A driver started with this environment (``ray.init()``) joins this head.
        yield f"http://127.0.0.1:{ports['dashboard']}", {**env, "RAY_ADDRESS": f"127.0.0.1:{ports['gcs']}"}
    finally:
        stop_own_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
