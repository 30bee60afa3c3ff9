"""A child process whose output is read with a deadline, so a hung child fails its test instead of hanging the run.

    with Child([sys.executable, "-m", "scripts.base_train", ...], cwd=ROOT, env=env) as child:
        child.wait_for("step 000003/", timeout=120)
        child.proc.send_signal(signal.SIGTERM)
        assert child.finish(timeout=60) == 128 + signal.SIGTERM

stdout and stderr are merged and read by a thread into `output`. Leaving the
`with` block kills the child and every process under it (torchrun's workers,
which sit in sessions of their own) if it is still running.
"""

from __future__ import annotations

import codecs
import os
import queue
import re
import signal
import subprocess
import threading
import time
from pathlib import Path


class Child:
    def __init__(self, command: list[str], **popen):
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)
        self.output = ""
        self._chunks: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ended = False
        threading.Thread(target=self._pump, daemon=True).start()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.kill()

    def _pump(self) -> None:
        fd = self.proc.stdout.fileno()
        while chunk := os.read(fd, 65536):
            self._chunks.put(chunk)
        self._chunks.put(b"")  # the end of the output

    def _read_until(self, deadline: float) -> bool:
        """Take what arrives before `deadline` into `output`; False once the output has ended."""
        if self._ended:
            return False
        try:
            chunk = self._chunks.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return True
        self.output += self._decoder.decode(chunk, final=not chunk)
        self._ended = not chunk
        return not self._ended

    def wait_for(self, marker: str, timeout: float) -> None:
        """Return once `marker` is in the output; fail, killing the child, after `timeout` seconds or when the output ends first."""
        deadline = time.monotonic() + timeout
        while marker not in self.output:
            if time.monotonic() >= deadline:
                self.kill()
                raise AssertionError(f"no {marker!r} within {timeout} s; output so far:\n{self.output[-3000:]}")
            if not self._read_until(deadline) and marker not in self.output:
                raise AssertionError(f"the output ended without {marker!r}:\n{self.output[-3000:]}")

    def finish(self, timeout: float) -> int:
        """The exit code, once the child has exited and its output is read; fails, killing the child, after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running after {timeout} s; output so far:\n{self.output[-3000:]}") from None
        while time.monotonic() < deadline and self._read_until(deadline):
            pass
        return code

    def kill(self) -> None:
        """SIGKILL the child and its descendants, found before any dies (an orphan's parent becomes init)."""
        for pid in [*descendants(self.proc.pid), self.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)


def descendants(pid: int) -> list[int]:
    """Every process under `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            parent = int(re.search(r"^PPid:\s+(\d+)", status.read_text(), re.MULTILINE).group(1))
        except OSError:  # the process ended meanwhile
            continue
        children.setdefault(parent, []).append(int(status.parent.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found
