"""Running the ``sessionbus`` command as a subprocess, for the CLI and topology tests."""

from __future__ import annotations

import asyncio
import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "sessionbus.cli"]


def env(url: str | None = None) -> dict[str, str]:
    """The environment for a command: no inherited SESSIONBUS_URL, unbuffered output."""
    values = {k: v for k, v in os.environ.items() if k != "SESSIONBUS_URL"}
    values["PYTHONUNBUFFERED"] = "1"
    if url is not None:
        values["SESSIONBUS_URL"] = url
    return values


def run_cli(*args: str, url: str | None = None, timeout: float = 60.0,
            cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Run one command to completion (``url`` goes in as ``--url``)."""
    argv = [*CLI, *(["--url", url] if url else []), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=env(), check=False)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    """A failed command: exit != 0, one ``sessionbus: error:`` line holding ``needles``."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sessionbus: error: "), lines
    for needle in needles:
        assert needle in lines[0], lines[0]


class Running:
    """A long-running command whose output lines are collected by reader threads."""

    def __init__(self, *args: str, url: str | None = None, cwd: Path = ROOT) -> None:
        argv = [*CLI, *(["--url", url] if url else []), *args]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=cwd, env=env(), start_new_session=True)
        self.lines: dict[str, queue.Queue[str]] = {"out": queue.Queue(), "err": queue.Queue()}
        self.seen: dict[str, list[str]] = {"out": [], "err": []}
        for name, pipe in (("out", self.proc.stdout), ("err", self.proc.stderr)):
            threading.Thread(target=self._read, args=(name, pipe), daemon=True).start()

    def _read(self, name: str, pipe: object) -> None:
        for line in pipe:  # type: ignore[attr-defined]
            self.lines[name].put(line.rstrip("\n"))

    def expect(self, stream: str, pattern: str, timeout: float = 30.0) -> str:
        """The first new line on ``stream`` ("out"/"err") matching ``pattern``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines[stream].get(timeout=min(0.2, deadline - time.monotonic()))
            except queue.Empty:
                if self.proc.poll() is not None and self.lines[stream].empty():
                    break
                continue
            self.seen[stream].append(line)
            if re.search(pattern, line):
                return line
        raise AssertionError(f"no line matching {pattern!r} on std{stream}; saw "
                             f"{self.seen[stream]}, rc={self.proc.poll()}")

    async def aexpect(self, stream: str, pattern: str, within: float = 30.0) -> str:
        """:meth:`expect` from async code, without blocking the event loop."""
        return await asyncio.to_thread(self.expect, stream, pattern, within)

    def signal(self, sig: int) -> int:
        """Send ``sig`` and return the exit code."""
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)

    def stop(self) -> None:
        """Stop the process if it still runs: SIGTERM, then SIGKILL after 10 s.

        SIGTERM first, so that a ``sessionbus server`` (or any command with an
        embedded server) stops the nats-server it started instead of leaving
        it orphaned.
        """
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
