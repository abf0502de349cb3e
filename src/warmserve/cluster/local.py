"""Worker processes on this machine: one per device, reached through a WorkerClient."""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from warmserve.worker.rpc import WorkerClient, WorkerGone


class LocalWorkerProcess:
    """Starts `python -m warmserve.worker` for one device and connects to it."""

    def __init__(self, config: str, node: str, device_index: int, cache_dir: Path,
                 log_level: str = "warning", start_timeout_s: float = 120.0) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="warmserve-worker-")
        self.socket = str(Path(self._dir.name) / "worker.sock")
        authkey = secrets.token_bytes(16)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "warmserve.worker", "--config", config, "--node", node,
             "--device-index", str(device_index), "--socket", self.socket,
             "--cache-dir", str(cache_dir), "--log-level", log_level],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        # The key, then standard input stays open for the worker's life: the worker exits
        # when it closes, so that no worker outlives this process, however this one ends.
        self.process.stdin.write(authkey.hex() + "\n")
        self.process.stdin.flush()
        self._wait_ready(start_timeout_s)
        self.client = WorkerClient(self.socket, authkey)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self._close_stdin()

    def terminate(self) -> None:
        """Ask the worker to end, without waiting for it (`close` waits)."""
        if self.alive:
            self.process.terminate()

    def close(self, timeout_s: float = 10.0) -> None:
        if self.alive:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close_stdin()
        self._dir.cleanup()

    def _close_stdin(self) -> None:
        with contextlib.suppress(OSError):  # a dead worker's pipe may refuse the flush
            self.process.stdin.close()

    def _wait_ready(self, timeout_s: float) -> None:
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.process.stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(timeout_s)
        if not line or line[0].strip() != "READY":
            self.kill()
            raise WorkerGone(f"worker for device did not start (exit code "
                             f"{self.process.returncode})")
