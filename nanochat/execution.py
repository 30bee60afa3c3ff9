"""Run untrusted, model-generated Python (a completion plus its unit tests) and report how it went.

    result = execute(program, timeout=5.0, memory_mb=512)
    result.status   # "passed" | "failed" | "timeout" | "error"

What it is for, honestly: a small model writing HumanEval answers makes
*accidents*: infinite loops, huge allocations, `shutil.rmtree` on the wrong
path, a stray `os.system`, a fork in a loop, a call to `exit()` that would skip
its own tests. This module keeps such accidents from hurting the machine or the
score. It is NOT a security boundary against a determined attacker: everything
below happens inside one ordinary Python process running as the caller's user
(root, on our machines and in CI), without namespaces, seccomp or a container.
Run truly hostile code in a VM or container instead.

What is covered:
- A fresh interpreter (`python -I`: no user site, no PYTHON* variables) with a
  minimal environment (no secrets inherited), stdin closed, in a throw-away
  working directory (also $HOME and $TMPDIR) that is deleted afterwards.
- Limits set by the child on itself before the program runs: address space and
  data segment (`memory_mb`), CPU seconds, size of any file it writes, open
  files, no core dumps, and no new processes (RLIMIT_NPROC, which the kernel
  does not enforce for root, hence the next point).
- Calls disabled before the program runs (they raise PermissionError):
  process creation (fork, spawn*, exec*, posix_spawn, system, popen,
  subprocess.Popen) and signalling (kill, killpg, pidfd_send_signal);
  deleting, renaming, truncating, chmod/chown of files, shutil.rmtree/move;
  every socket (so no network); raising resource limits; leaving the process
  group; os._exit and os.abort. `ctypes` and `multiprocessing` cannot be imported.
  Files may be opened for writing only inside the working directory.
- The program must run to its end: exiting early in any way (`exit()`,
  `sys.exit(0)`, ...) counts as failed, so a completion cannot skip its tests.
- A wall-clock timeout that SIGKILLs the whole process group (the child runs in
  its own session), so anything that got past the guards dies with it.
- Output is read as it comes and only the first MAX_OUTPUT_BYTES of stdout and
  of stderr are kept: a program printing forever cannot fill the caller's memory.
- execute() uses no signals and no shared state, so several threads can call it.

What is NOT covered:
- Deliberate escapes: the guards are plain Python attribute swaps, and e.g.
  `del sys.modules["posix"]; import posix` gives back the real fork. Such a
  fork escapes the Python guards (and, as root, RLIMIT_NPROC) but not the
  process-group kill, unless it also calls setsid through the same trick.
- Reading anything the user can read (files, other processes' /proc entries),
  writing through low-level paths (`_io.FileIO`, C extensions such as sqlite3),
  creating directories or links outside the working directory.
- Filling the disk: each file is capped at MAX_FILE_BYTES, but not their number.
- CPU and memory pressure on the machine while the program runs; threads
  (allowed for root, refused by RLIMIT_NPROC otherwise) share the CPU budget.
- Kernel exploits, side channels, and anything else a real sandbox exists for.

Linux only: the child's exit is awaited through a pidfd (kernel 5.3+).
"""

from __future__ import annotations

import builtins
import io
import math
import os
import posix
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import types
from dataclasses import dataclass

PROGRAM_FILE = "program.py"
MAX_OUTPUT_BYTES = 10_000  # kept of stdout and of stderr each
MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_OPEN_FILES = 64
DRAIN_SECONDS = 1.0  # after the kill, how long to wait for the last output
PROGRAM_FAILED = 1  # child exit code for a program that raised or exited early
SANDBOX_BROKEN = 3  # child exit code for a wrapper that could not set itself up
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

DISABLED_OS_CALLS = (
    # new processes
    "system", "popen", "fork", "forkpty", "posix_spawn", "posix_spawnp",
    "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
    "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp", "execvpe",
    # other processes, and leaving the process group that the timeout kills
    "kill", "killpg", "setsid", "setpgid", "setpgrp",
    # ending the process without unwinding, which would bypass the exit check
    "_exit", "abort",
    # destroying or locking away files
    "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate",
    "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown",
)
UNIMPORTABLE_MODULES = ("ctypes", "_ctypes", "multiprocessing", "_multiprocessing")


@dataclass(frozen=True)
class ExecutionResult:
    status: str  # "passed", "failed", "timeout" or "error"
    stdout: str
    stderr: str
    seconds: float
    returncode: int | None = None  # None when the sandbox never got an exit code

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def execute(program: str, timeout: float = 5.0, memory_mb: int = 512) -> ExecutionResult:
    """Run `program` in a sandboxed child interpreter and classify the outcome."""
    start = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="nanochat-exec-", ignore_cleanup_errors=True) as workdir:
            timed_out, returncode, stdout, stderr = _run_in(workdir, program, timeout, memory_mb)
    except OSError as e:
        return ExecutionResult("error", "", f"sandbox could not run the program: {e!r}", time.monotonic() - start)
    status = _status(timed_out, returncode)
    if status == "error":
        stderr += _death_note(returncode)
    return ExecutionResult(status, stdout, stderr, time.monotonic() - start, returncode)


def _run_in(workdir: str, program: str, timeout: float, memory_mb: int) -> tuple[bool, int, str, str]:
    with open(os.path.join(workdir, PROGRAM_FILE), "w", encoding="utf-8", errors="replace") as f:
        f.write(program)
    proc = subprocess.Popen(
        _child_command(timeout, memory_mb), cwd=workdir, env=_minimal_env(workdir),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )
    with proc:
        try:
            with _Output(proc) as output:
                exited = output.read_until_exit(time.monotonic() + timeout)
                _kill_process_group(proc)  # strays may outlive even a normal exit, and hold the pipes open
                output.drain(time.monotonic() + DRAIN_SECONDS)
        finally:
            _kill_process_group(proc)  # again, in case reading failed
            # Reaped only now: until then the leader's pid, hence the group id, cannot be reused.
            proc.wait()
    return not exited, proc.returncode, output.text("stdout"), output.text("stderr")


def _child_command(timeout: float, memory_mb: int) -> list[str]:
    cpu_seconds = math.ceil(timeout) + 1  # a backstop: the wall clock normally stops it first
    memory_bytes = memory_mb * 1024 * 1024
    return [sys.executable, "-I", "-X", "utf8", os.path.abspath(__file__), str(memory_bytes), str(cpu_seconds)]


def _minimal_env(workdir: str) -> dict[str, str]:
    # Single-threaded numeric libraries: their thread pools would hit the memory
    # and process limits at import time.
    return {
        "PATH": os.defpath, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
    }


class _Output:
    """Reads the child's stdout and stderr as they come, keeping the first MAX_OUTPUT_BYTES of each."""

    def __init__(self, proc: subprocess.Popen):
        self.kept = {"stdout": bytearray(), "stderr": bytearray()}
        self.dropped = {"stdout": 0, "stderr": 0}
        self.exit_fd = os.pidfd_open(proc.pid)  # readable once the child has exited, before it is reaped
        self.selector = selectors.DefaultSelector()
        self.selector.register(proc.stdout.fileno(), selectors.EVENT_READ, "stdout")
        self.selector.register(proc.stderr.fileno(), selectors.EVENT_READ, "stderr")
        self.selector.register(self.exit_fd, selectors.EVENT_READ, "exit")

    def read_until_exit(self, deadline: float) -> bool:
        """True when the child exited before the deadline."""
        while (remaining := deadline - time.monotonic()) > 0:
            for key, _ in self.selector.select(remaining):
                if key.data == "exit":
                    return True
                self._read(key)
        return False

    def drain(self, deadline: float) -> None:
        self.selector.unregister(self.exit_fd)
        while self.selector.get_map() and (remaining := deadline - time.monotonic()) > 0:
            for key, _ in self.selector.select(remaining):
                self._read(key)

    def _read(self, key: selectors.SelectorKey) -> None:
        chunk = os.read(key.fd, 65536)
        if not chunk:
            self.selector.unregister(key.fd)
            return
        kept = self.kept[key.data]
        room = max(0, MAX_OUTPUT_BYTES - len(kept))
        kept += chunk[:room]
        self.dropped[key.data] += len(chunk) - min(room, len(chunk))

    def text(self, stream: str) -> str:
        text = self.kept[stream].decode("utf-8", errors="replace")
        if self.dropped[stream]:
            text += f"\n[sandbox: {self.dropped[stream]} more bytes of {stream} not kept]"
        return text

    def __enter__(self) -> _Output:
        return self

    def __exit__(self, *exc_info) -> None:
        self.selector.close()
        os.close(self.exit_fd)


def _kill_process_group(proc: subprocess.Popen) -> None:
    # The leader by pid as well, in case it left its group through a bypass of the guards.
    for kill in (os.killpg, os.kill):
        try:
            kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # already gone


def _status(timed_out: bool, returncode: int) -> str:
    if timed_out:
        return "timeout"
    if returncode == 0:
        return "passed"
    if returncode == PROGRAM_FAILED:
        return "failed"
    return "error"  # killed by a signal (a limit, or a crash) or a broken wrapper


def _death_note(returncode: int) -> str:
    if returncode < 0:
        return f"\n[sandbox: killed by {signal.Signals(-returncode).name}]"
    return f"\n[sandbox: the sandbox failed, exit code {returncode}]"


# ---- everything below runs in the child interpreter -------------------------------------------


def _child_main(memory_bytes: int, cpu_seconds: int) -> None:
    real_exit = os._exit  # kept before the guards take it away from the program
    try:
        with open(PROGRAM_FILE, "rb") as f:
            source = f.read()  # bytes: compile() honours a coding declaration
        _limit_resources(memory_bytes, cpu_seconds)
        _install_guards(os.path.realpath(os.getcwd()))
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        real_exit(SANDBOX_BROKEN)
    code = _run_program(source)
    _flush_output()
    # Skips atexit handlers and thread joins: the program gets no say after it ends.
    real_exit(code)


def _limit_resources(memory_bytes: int, cpu_seconds: int) -> None:
    limits = {
        resource.RLIMIT_AS: memory_bytes,
        resource.RLIMIT_DATA: memory_bytes,
        resource.RLIMIT_CPU: cpu_seconds,
        resource.RLIMIT_FSIZE: MAX_FILE_BYTES,
        resource.RLIMIT_NOFILE: MAX_OPEN_FILES,
        resource.RLIMIT_CORE: 0,
        resource.RLIMIT_NPROC: 0,  # ignored by the kernel for root, effective for anyone else
    }
    for which, value in limits.items():
        _, hard = resource.getrlimit(which)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (value, value))  # hard too: only root may raise it again, and setrlimit gets disabled


def _install_guards(workdir: str) -> None:
    for module in (os, posix):
        for name in DISABLED_OS_CALLS:
            if hasattr(module, name):
                setattr(module, name, _refusal(f"os.{name}"))
    _disable(shutil, "rmtree", "move", "chown")
    _disable(subprocess, "Popen")
    _disable(sys.modules["_posixsubprocess"], "fork_exec")
    _disable(resource, "setrlimit", "prlimit")
    _disable(signal, "pidfd_send_signal")
    _disable_sockets()
    for name in UNIMPORTABLE_MODULES:
        sys.modules[name] = None  # makes `import name` raise ImportError
    _confine_writes(workdir)


def _refusal(name: str):
    def refuse(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the sandbox")
    return refuse


def _disable(module: types.ModuleType, *names: str) -> None:
    for name in names:
        setattr(module, name, _refusal(f"{module.__name__}.{name}"))


def _disable_sockets() -> None:
    # A subclass rather than a function, so modules that subclass or isinstance()
    # socket.socket still import; only creating one fails.
    class NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            raise PermissionError("sockets are disabled in the sandbox")

    low_level = sys.modules["_socket"]
    socket.socket = socket.SocketType = low_level.socket = low_level.SocketType = NoSocket
    _disable(socket, "socketpair", "fromfd", "create_connection", "create_server")
    _disable(low_level, "socketpair")


def _confine_writes(workdir: str) -> None:
    real_open, real_os_open = io.open, os.open

    def open_inside(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            _refuse_outside(file, workdir)
        return real_open(file, mode, *args, **kwargs)

    def os_open_inside(path, flags, *args, dir_fd=None, **kwargs):
        if flags & WRITE_FLAGS:
            if dir_fd is not None:
                raise PermissionError("writing relative to a directory descriptor is disabled in the sandbox")
            _refuse_outside(path, workdir)
        return real_os_open(path, flags, *args, dir_fd=dir_fd, **kwargs)

    builtins.open = io.open = open_inside
    os.open = posix.open = os_open_inside


def _refuse_outside(path, workdir: str) -> None:
    if isinstance(path, int):
        return  # an already open descriptor, such as 1 for stdout
    real = os.path.realpath(os.fsdecode(path))
    if real != os.devnull and os.path.commonpath([real, workdir]) != workdir:
        raise PermissionError(f"writing outside the sandbox directory is disabled: {real}")


def _run_program(source: bytes) -> int:
    """The exit code: 0 when the program ran to its end, PROGRAM_FAILED otherwise."""
    sys.argv = [PROGRAM_FILE]
    main = types.ModuleType("__main__")  # its own globals, as when run as a script
    sys.modules["__main__"] = main
    try:
        # dont_inherit: this file's `from __future__` imports are not the program's
        exec(compile(source, PROGRAM_FILE, "exec", dont_inherit=True), main.__dict__)
    except SystemExit as e:
        print(f"[sandbox: the program exited early (code {e.code!r}), which counts as a failure]", file=sys.stderr)
        return PROGRAM_FAILED
    except BaseException as e:
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # without this wrapper's frame
        return PROGRAM_FAILED
    return 0


def _flush_output() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except Exception:
            pass  # the program may have closed or replaced them; what was lost is lost


if __name__ == "__main__":
    _child_main(memory_bytes=int(sys.argv[1]), cpu_seconds=int(sys.argv[2]))
