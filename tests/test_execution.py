"""The code-execution sandbox: outcomes, limits, what the kernel refuses, and the Python-level fallback.

Attacks come in two kinds. Plain ones call the public API (`os.remove`, `socket.socket`)
and must fail under the kernel's confinement and under the fallback guards alike. Escapes
go around Python-level guards (a re-imported private module, `_io`, ctypes, raw machine
code) and must fail under the kernel's confinement; the fallback documents that it cannot
stop them.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import resource
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tasks import execution
from tasks.execution import MAX_FILE_BYTES, MAX_OUTPUT_BYTES, execute, kernel_confinement
from tasks.humaneval import HumanEval

kernel_only = pytest.mark.skipif(not kernel_confinement(), reason="no Landlock ABI 3 or seccomp on this kernel")
both_modes = pytest.mark.parametrize("mode", [pytest.param("kernel", marks=kernel_only), "guards"], indirect=True)


@pytest.fixture
def mode(request, monkeypatch) -> str:
    """Runs the test under the kernel's confinement, or under the fallback guards alone."""
    if request.param == "guards":
        monkeypatch.setattr(execution, "kernel_confinement", lambda: False)
    return request.param


def fresh(*modules: str) -> str:
    """Program lines that drop `modules` from sys.modules, so the next import gets them unguarded."""
    return f"import sys\nfor _name in {modules!r}:\n    sys.modules.pop(_name, None)\n"


def processes() -> list[dict[str, int]]:
    """pid, parent pid and session id of every live (not zombie) process, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue  # /proc/self, /proc/meminfo, ...
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # it ended while we looked
        # the command name in parentheses may contain spaces: split after it
        state, ppid, _pgrp, session = stat.rsplit(")", 1)[1].split()[:4]
        if state not in "ZX":
            found.append({"pid": int(entry.name), "ppid": int(ppid), "session": int(session)})
    return found


def wait_until_gone(predicate, seconds: float = 2.0) -> list[dict[str, int]]:
    """The live processes matching `predicate`, after giving SIGKILLed ones a moment to die."""
    deadline = time.monotonic() + seconds
    while (left := [p for p in processes() if predicate(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@pytest.fixture
def bystander():
    """Another process of the same user, with a secret in its environment."""
    proc = subprocess.Popen(["sleep", "60"], env={"NANOCHAT_TEST_SECRET": "hunter2"})
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def precious(tmp_path) -> Path:
    """A directory outside the sandbox with a file in it, which no program may change."""
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "data.txt").write_text("keep me")
    return folder


def assert_untouched(folder: Path, mode: int) -> None:
    file = folder / "data.txt"
    assert file.read_text() == "keep me" and file.stat().st_mode == mode
    assert os.listdir(folder) == ["data.txt"]


# ---- outcomes ----------------------------------------------------------------------------------


def test_passing_program_captures_stdout():
    result = execute("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('ok', add(1, 1))\n")
    assert result.status == "passed" and result.passed
    assert result.stdout == "ok 2\n"
    assert result.returncode == 0 and 0 < result.seconds < 5


def test_failing_assertion():
    result = execute("assert 1 + 1 == 3, 'arithmetic is broken'")
    assert result.status == "failed" and not result.passed
    assert "AssertionError: arithmetic is broken" in result.stderr


def test_exception_traceback_names_the_program_line():
    result = execute("x = 1\n{}['missing']\n")
    assert result.status == "failed"
    assert 'File "program.py", line 2' in result.stderr and "KeyError" in result.stderr


def test_syntax_error_is_a_failure():
    result = execute("def f(:\n    pass\n")
    assert result.status == "failed"
    assert "SyntaxError" in result.stderr


def test_program_runs_as_main_without_our_future_imports():
    # the sandbox module uses `from __future__ import annotations`; the program must not inherit it
    result = execute("if __name__ == '__main__':\n    x: undefined_name = 1\n")
    assert result.status == "failed" and "NameError" in result.stderr


@pytest.mark.parametrize("ending", [
    "exit()", "quit()", "import sys; sys.exit(0)", "raise SystemExit", "import os; os._exit(0)",
    "import os, threading, time; threading.Thread(target=os._exit, args=(0,)).start(); time.sleep(0.2)",
])
def test_exiting_early_cannot_skip_the_tests(ending):
    result = execute(f"{ending}\nassert False, 'the tests that exit() tried to skip'\n")
    assert result.status == "failed"


def test_crash_of_the_interpreter_is_an_error():
    result = execute("import signal\nsignal.raise_signal(signal.SIGSEGV)\n")  # a signal to itself is allowed
    assert result.status == "error"
    assert "SIGSEGV" in result.stderr


def test_stdout_and_stderr_are_truncated():
    result = execute("import sys\nprint('x' * 1_000_000)\nsys.stderr.write('y' * 1_000_000)\n")
    assert result.status == "passed"
    assert result.stdout.startswith("x" * MAX_OUTPUT_BYTES) and len(result.stdout) < MAX_OUTPUT_BYTES + 100
    assert "not kept" in result.stdout and "not kept" in result.stderr
    assert len(result.stderr) < MAX_OUTPUT_BYTES + 100


def test_environment_secrets_are_not_inherited(monkeypatch):
    monkeypatch.setenv("NANOCHAT_TEST_SECRET", "hunter2")
    result = execute("import os\nassert 'NANOCHAT_TEST_SECRET' not in os.environ\nprint(sorted(os.environ))\n")
    assert result.status == "passed", result.stderr
    assert "hunter2" not in result.stdout


def test_working_directory_is_temporary_and_removed():
    result = execute("import os\nopen('scratch.txt', 'w').write('fine here')\nprint(os.getcwd())\n")
    assert result.status == "passed", result.stderr
    workdir = Path(result.stdout.strip())
    assert workdir.name.startswith("nanochat-exec-") and workdir != Path.cwd()
    assert not workdir.exists()


@kernel_only
def test_confinement_leaves_ordinary_programs_alone():
    # Files of every kind inside the working directory, threads, socketpair and asyncio still work.
    program = (
        "import asyncio, os, shutil, socket, threading\n"
        "os.makedirs('a/b')\n"
        "open('a/b/f', 'w').write('x')\n"
        "os.rename('a/b/f', 'a/g'); os.link('a/g', 'h'); os.symlink('h', 's'); os.remove('h')\n"
        "shutil.rmtree('a')\n"
        "results = []\n"
        "workers = [threading.Thread(target=results.append, args=(i,)) for i in range(4)]\n"
        "for w in workers: w.start()\n"
        "for w in workers: w.join()\n"
        "a, b = socket.socketpair(); a.send(b'hi')\n"
        "asyncio.run(asyncio.sleep(0))\n"
        "print(sorted(os.listdir('.')), sorted(results), b.recv(2))\n"
    )
    result = execute(program)
    assert result.status == "passed", result.stderr
    assert result.stdout == "['program.py', 's'] [0, 1, 2, 3] b'hi'\n"


def test_without_landlock_or_seccomp_it_warns_once_and_falls_back_to_guards(monkeypatch, caplog, precious):
    monkeypatch.setattr(execution, "_confinement_problem", lambda: "Landlock is not available (test)")
    kernel_confinement.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="nanochat.execution"):
            first = execute(f"import os\nos.remove({str(precious / 'data.txt')!r})\n")
            second = execute("print(1)\n")
    finally:
        kernel_confinement.cache_clear()  # the next caller probes the real kernel again
    assert first.status == "failed" and "os.remove is disabled" in first.stderr
    assert (precious / "data.txt").exists()
    assert second.status == "passed"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "Landlock is not available (test)" in warnings[0] and "Python-level guards" in warnings[0]


# ---- HumanEval through the real sandbox --------------------------------------------------------


def test_humaneval_scores_through_the_real_sandbox(tmp_path):
    row = {
        "task_id": "HumanEval/0",
        "prompt": "from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    \"\"\"Sum of xs.\"\"\"\n",
        "canonical_solution": "    return sum(xs)\n",
        "test": "def check(candidate):\n    assert candidate([1, 2]) == 3\n    assert candidate([]) == 0\n",
        "entry_point": "total",
    }
    (tmp_path / "he.jsonl").write_text(json.dumps(row) + "\n")
    task = HumanEval(path=tmp_path / "he.jsonl")
    example = task[0]
    assert task.evaluate(example, example["messages"][1]["content"]) == 1
    # The answer leaves out `from typing import List`: the prompt's imports supply it.
    assert task.evaluate(example, "```python\ndef total(xs: List[int]) -> int:\n    return sum(xs)\n```") == 1
    assert task.evaluate(example, "```python\ndef total(xs: List[int]) -> int:\n    return len(xs)\n```") == 0


# ---- limits ------------------------------------------------------------------------------------


def test_infinite_loop_times_out():
    result = execute("while True:\n    pass\n", timeout=1.0)
    assert result.status == "timeout"
    assert 1.0 <= result.seconds < 2.0


def test_output_before_a_timeout_is_kept():
    result = execute("import time\nprint('started', flush=True)\ntime.sleep(30)\n", timeout=0.5)
    assert result.status == "timeout"
    assert result.stdout == "started\n"


def test_huge_allocation_fails_fast_without_touching_the_caller():
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = execute("x = bytearray(10 * 1024**3)\n", memory_mb=512)
    assert result.status == "failed" and "MemoryError" in result.stderr
    assert result.seconds < 3
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    assert grown_kib < 100 * 1024


def test_huge_file_is_cut_at_the_size_limit():
    program = (
        "import os\n"
        "try:\n"
        "    with open('big.bin', 'wb') as f:\n"
        "        for _ in range(64):\n"
        "            f.write(b'x' * 1024**2)\n"
        "finally:\n"
        "    print(os.path.getsize('big.bin'))\n"
    )
    result = execute(program)
    assert result.status == "failed" and "File too large" in result.stderr
    assert int(result.stdout) <= MAX_FILE_BYTES


@both_modes
def test_resource_limits_cannot_be_raised(mode):
    result = execute("import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))\n")
    assert result.status == "failed"


@kernel_only
@pytest.mark.parametrize("limits", ["(-1, -1)", "(256 * 1024**2, 256 * 1024**2)"], ids=["raise", "lower"])
def test_resource_limits_are_frozen_even_past_the_guards(limits):
    program = fresh("resource") + f"import resource\nresource.setrlimit(resource.RLIMIT_AS, {limits})\n"
    result = execute(program, memory_mb=512)
    assert result.status == "failed" and "not allowed" in result.stderr


# ---- processes ---------------------------------------------------------------------------------


def test_fork_bomb_is_contained():
    # children this process already had (a multiprocessing resource tracker another test left) are not execute()'s
    earlier = {p["pid"] for p in processes() if p["ppid"] == os.getpid()}
    result = execute("import os\nprint(os.getpid(), flush=True)\nwhile True: os.fork()\n", timeout=2.0)
    assert result.status != "passed"
    session = int(result.stdout.split()[0])
    assert wait_until_gone(lambda p: p["session"] == session) == []
    assert wait_until_gone(lambda p: p["ppid"] == os.getpid() and p["pid"] not in earlier) == []


@pytest.mark.parametrize("mode", ["guards"], indirect=True)
def test_guards_only_a_fork_past_the_guards_still_dies_with_the_process_group(mode):
    # Without the kernel's confinement, re-importing posix gives back the real fork (documented);
    # the grandchild it makes must still die with the process group on timeout.
    program = fresh("posix") + (
        "import posix, time\n"
        "child = posix.fork()\n"
        "if child:\n"
        "    print(child, flush=True)\n"
        "time.sleep(60)\n"
    )
    result = execute(program, timeout=1.0)
    assert result.status == "timeout"
    grandchild = int(result.stdout.split()[0])
    assert wait_until_gone(lambda p: p["pid"] == grandchild) == []


@both_modes
@pytest.mark.parametrize("call", [
    "assert os.system('touch {target}') == 0",
    "os.popen('touch {target}')",
    "subprocess.run(['touch', '{target}'])",
    "os.execv('/usr/bin/touch', ['touch', '{target}'])",
    "os.posix_spawn('/usr/bin/touch', ['touch', '{target}'], {{}})",
    "pty.spawn(['touch', '{target}'])",
])
def test_commands_cannot_be_run(tmp_path, mode, call):
    target = tmp_path / "touched"
    result = execute("import os, pty, subprocess\n" + call.format(target=target) + "\n")
    assert result.status == "failed"
    assert not target.exists()


@kernel_only
@pytest.mark.parametrize("call", [
    fresh("posix", "os", "_posixsubprocess", "subprocess") + "import subprocess\nsubprocess.run(['touch', {target!r}])",
    fresh("posix", "os") + "import posix\nposix.execv('/usr/bin/touch', ['touch', {target!r}])",
    fresh("ctypes", "_ctypes") + "import ctypes\nassert ctypes.CDLL(None).system(b'touch ' + {target!r}.encode()) == 0",
], ids=["subprocess", "posix.execv", "ctypes"])
def test_commands_cannot_be_run_past_the_guards(tmp_path, call):
    target = tmp_path / "touched"
    result = execute(call.format(target=str(target)) + "\n")
    assert result.status == "failed"
    assert not target.exists()


@kernel_only
@pytest.mark.parametrize("fork", [
    fresh("posix", "os") + "import posix\nfork, end = posix.fork, posix._exit",
    fresh("ctypes", "_ctypes") + "import ctypes\nlibc = ctypes.CDLL(None)\nfork, end = libc.fork, libc._exit",
], ids=["posix", "ctypes"])
def test_no_new_process_past_the_guards(fork):
    program = fork + "\npid = fork()\nif pid == 0:\n    end(0)\nassert pid > 0, 'fork failed'\nprint('forked', pid)\n"
    result = execute(program)
    assert result.status == "failed" and "forked" not in result.stdout


@both_modes
def test_other_processes_cannot_be_signalled(bystander, mode):
    result = execute(f"import os, signal\nos.kill({bystander.pid}, signal.SIGKILL)\n")
    assert result.status == "failed"
    assert bystander.poll() is None


@kernel_only
def test_other_processes_cannot_be_signalled_past_the_guards(bystander):
    result = execute(fresh("posix", "os") + f"import posix\nposix.kill({bystander.pid}, 9)\n")
    assert result.status == "failed"
    time.sleep(0.1)  # a SIGKILL that got through would have landed by now
    assert bystander.poll() is None


@kernel_only
@pytest.mark.parametrize("owner", [
    "fcntl.fcntl(r, fcntl.F_SETOWN, {pid})",
    "fcntl.ioctl(r, 0x8901, struct.pack('i', {pid}))",  # FIOSETOWN, on a socket
], ids=["F_SETOWN", "FIOSETOWN"])
def test_other_processes_cannot_be_signalled_through_io_notices(bystander, owner):
    # An fd's owner gets a signal of the fd's choosing, SIGKILL included, when I/O becomes possible.
    program = (
        "import fcntl, os, signal, socket, struct\n"
        "r, w = socket.socketpair()\n"
        f"{owner.format(pid=bystander.pid)}\n"
        "fcntl.fcntl(r, fcntl.F_SETSIG, signal.SIGKILL)\n"
        "fcntl.fcntl(r, fcntl.F_SETFL, os.O_ASYNC)\n"
        "w.send(b'x')\n"
    )
    result = execute(program)
    assert result.status == "failed"
    time.sleep(0.1)
    assert bystander.poll() is None


@kernel_only
@pytest.mark.parametrize("whose", ["bystander", "parent", "init"])
def test_other_processes_environment_cannot_be_read(bystander, whose):
    pid = {"bystander": bystander.pid, "parent": os.getpid(), "init": 1}[whose]
    result = execute(f"print(open('/proc/{pid}/environ', 'rb').read())\n")
    assert result.status == "failed" and "PermissionError" in result.stderr
    assert "hunter2" not in result.stdout


@kernel_only
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="machine code for x86_64")
@pytest.mark.parametrize("code", ["b814000000cd80c3", "b8270000400f05c3"], ids=["i386 int 0x80", "x32"])
def test_system_calls_of_another_abi_kill_the_program(code):
    # getpid through the 32-bit and x32 entry points, which a filter of native numbers would miss
    program = (
        "import ctypes, mmap\n"
        "page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
        f"page.write(bytes.fromhex({code!r}))\n"
        "print(ctypes.CFUNCTYPE(ctypes.c_long)(ctypes.addressof(ctypes.c_char.from_buffer(page)))())\n"
    )
    result = execute(program)
    assert result.status == "error" and "SIGSYS" in result.stderr and result.stdout == ""


@pytest.mark.parametrize("mode", ["guards"], indirect=True)
@pytest.mark.parametrize("module", ["multiprocessing", "ctypes"])
def test_guards_only_process_and_native_call_modules_cannot_be_imported(mode, module):
    result = execute(f"import {module}\n")
    assert result.status == "failed" and f"import of {module} halted" in result.stderr


# ---- files -------------------------------------------------------------------------------------


@both_modes
@pytest.mark.parametrize("attack", [
    "shutil.rmtree({folder!r})",
    "shutil.move({file!r}, 'stolen.txt')",
    "os.remove({file!r})",
    "os.unlink({file!r})",
    "pathlib.Path({file!r}).unlink()",
    "os.rename({file!r}, {file!r} + '.gone')",
    "os.replace({file!r}, 'stolen.txt')",
    "os.truncate({file!r}, 0)",
    "os.chmod({file!r}, 0)",
    "open({file!r}, 'w').write('overwritten')",
    "open({file!r}, 'a').write('appended')",
    "open({folder!r} + '/new.txt', 'x')",
    "pathlib.Path({file!r}).write_text('overwritten')",
    "os.close(os.open({file!r}, os.O_WRONLY | os.O_TRUNC))",
    "os.symlink({file!r}, 'link'); open('link', 'w').write('through a link')",
])
def test_files_outside_the_sandbox_survive(precious, mode, attack):
    file = precious / "data.txt"
    before = file.stat().st_mode
    program = "import os, pathlib, shutil\n" + attack.format(folder=str(precious), file=str(file)) + "\n"
    result = execute(program)
    assert result.status == "failed"
    assert_untouched(precious, before)


@kernel_only
@pytest.mark.parametrize("attack", [
    "import os\nos.link({file!r}, 'link')\nopen('link', 'w').write('through a hard link')",
    "import _io\n_io.FileIO({file!r}, 'w').write(b'overwritten')",
    "import sqlite3\nsqlite3.connect({folder!r} + '/new.db').execute('create table t (x)')",
    fresh("posix", "os") + "import posix\nposix.close(posix.open({file!r}, posix.O_WRONLY | posix.O_TRUNC))",
    fresh("posix", "os") + "import posix\nposix.unlink({file!r})",
    fresh("posix", "os") + "import posix\nposix.rename({file!r}, 'stolen.txt')",
    fresh("posix", "os") + "import posix\nposix.chmod({file!r}, 0)",
    fresh("posix", "os") + "import posix\nposix.mkdir({folder!r} + '/new')",
    fresh("ctypes", "_ctypes") + "import ctypes\nassert ctypes.CDLL(None).unlink({file!r}.encode()) == 0",
], ids=["hard link", "_io.FileIO", "sqlite3", "posix.open", "posix.unlink", "posix.rename", "posix.chmod",
        "posix.mkdir", "ctypes unlink"])
def test_files_outside_the_sandbox_survive_past_the_guards(precious, attack):
    file = precious / "data.txt"
    before = file.stat().st_mode
    result = execute(attack.format(folder=str(precious), file=str(file)) + "\n")
    assert result.status == "failed"
    assert_untouched(precious, before)


@both_modes
def test_writing_to_devnull_is_allowed(mode):
    result = execute("import os\nwith open(os.devnull, 'w') as f:\n    print('silenced', file=f)\n")
    assert result.status == "passed", result.stderr


# ---- network -----------------------------------------------------------------------------------


@pytest.fixture
def listening_port():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    yield server
    server.close()


def assert_nobody_connected(server: socket.socket) -> None:
    with pytest.raises(BlockingIOError):
        server.accept()


@both_modes
@pytest.mark.parametrize("connect", [
    "socket.create_connection(('127.0.0.1', {port}), timeout=1)",
    "socket.socket(socket.AF_INET, socket.SOCK_STREAM).connect(('127.0.0.1', {port}))",
    "import _socket; _socket.socket(socket.AF_INET, socket.SOCK_STREAM).connect(('127.0.0.1', {port}))",
    "import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)",
])
def test_network_is_blocked(listening_port, mode, connect):
    port = listening_port.getsockname()[1]
    result = execute("import socket\n" + connect.format(port=port) + "\n")
    assert result.status == "failed"
    assert_nobody_connected(listening_port)


@kernel_only
@pytest.mark.parametrize("connect", [
    fresh("_socket") + "import _socket\n_socket.socket(2, 1).connect(('127.0.0.1', {port}))",  # AF_INET, SOCK_STREAM
    fresh("ctypes", "_ctypes") + (
        "import ctypes, socket, struct\n"
        "libc = ctypes.CDLL(None)\n"
        "fd = libc.socket(socket.AF_INET, socket.SOCK_STREAM, 0)\n"
        "address = struct.pack('=H', socket.AF_INET) + struct.pack('!H4s8x', {port}, socket.inet_aton('127.0.0.1'))\n"
        "assert fd >= 0 and libc.connect(fd, address, len(address)) == 0"
    ),
], ids=["_socket", "ctypes"])
def test_network_is_blocked_past_the_guards(listening_port, connect):
    result = execute(connect.format(port=listening_port.getsockname()[1]) + "\n")
    assert result.status == "failed"
    assert_nobody_connected(listening_port)


@kernel_only
def test_io_uring_is_refused():
    # it could open a socket without the socket() system call that the filter refuses
    program = (
        "import ctypes\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.syscall(425, 1, ctypes.create_string_buffer(120)), ctypes.get_errno())\n"  # io_uring_setup
    )
    result = execute(program)
    assert result.stdout == f"-1 {errno.EPERM}\n", result.stderr


# ---- threads -----------------------------------------------------------------------------------


def test_concurrent_calls_from_four_threads():
    def run(i: int):
        return i, execute(f"print({i})\nassert {i} % 2 == 0, 'odd'\n")

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, range(12)))
    for i, result in results:
        assert result.stdout == f"{i}\n"
        assert result.status == ("passed" if i % 2 == 0 else "failed"), result.stderr


# ---- the seccomp filter: libseccomp resolves the names ---------------------------------------


def libseccomp_loads() -> bool:
    try:
        execution._libseccomp()
    except OSError:
        return False
    return True


needs_libseccomp = pytest.mark.skipif(not libseccomp_loads(), reason=f"{execution.LIBSECCOMP} is not installed")


@needs_libseccomp
def test_a_system_call_name_unknown_to_libseccomp_is_refused_loudly(monkeypatch):
    monkeypatch.setattr(execution, "REFUSED_SYSCALLS", (*execution.REFUSED_SYSCALLS, "no_such_call"))
    with pytest.raises(LookupError, match="'no_such_call'"), execution._seccomp_filter(os.getpid()):
        pass


@kernel_only
def test_a_filter_libseccomp_cannot_build_is_a_confinement_problem(monkeypatch):
    monkeypatch.setattr(execution, "REFUSED_SYSCALLS", (*execution.REFUSED_SYSCALLS, "no_such_call"))
    problem = execution._confinement_problem()  # what the one warning says before falling back to guards
    assert "'no_such_call'" in problem and "libseccomp2" in problem


@needs_libseccomp
def test_the_spark_filter_resolves_every_name_for_aarch64(tmp_path):
    # The same rules, added to a filter for aarch64 alone, which libseccomp translates name by name;
    # the expected numbers are from the kernel's include/uapi/asm-generic/unistd.h.
    seccomp = ctypes.CDLL(execution.LIBSECCOMP)
    seccomp.seccomp_init.restype = ctypes.c_void_p
    seccomp.seccomp_arch_add.argtypes = seccomp.seccomp_arch_remove.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    seccomp.seccomp_export_pfc.argtypes = [ctypes.c_void_p, ctypes.c_int]
    seccomp.seccomp_release.argtypes = [ctypes.c_void_p]
    aarch64, native = 0xC00000B7, 0  # SCMP_ARCH_AARCH64 (= AUDIT_ARCH_AARCH64), SCMP_ARCH_NATIVE
    seccomp_filter = seccomp.seccomp_init(execution.SCMP_ACT_ALLOW)
    try:
        assert seccomp.seccomp_arch_add(seccomp_filter, aarch64) == 0
        assert seccomp.seccomp_arch_remove(seccomp_filter, native) == 0
        execution._add_seccomp_rules(seccomp_filter, pid=4242)
        with open(tmp_path / "filter.pfc", "w") as f:
            assert seccomp.seccomp_export_pfc(seccomp_filter, f.fileno()) == 0
    finally:
        seccomp.seccomp_release(seccomp_filter)
    pfc = (tmp_path / "filter.pfc").read_text()
    assert "filter for arch aarch64" in pfc and "x86_64" not in pfc
    numbers = {name: int(n) for name, n in re.findall(r'filter for syscall "(\w+)" \((\d+)\)', pfc)}
    named = {*execution.REFUSED_SYSCALLS, *execution.SIGNALS_TO_SELF_ONLY, "clone", "clone3", "prlimit64",
             "fcntl", "ioctl"}
    assert set(numbers) == named
    absent = {name for name, number in numbers.items() if number >= 2**31}  # libseccomp's negative pseudo-numbers
    assert absent == {"fork", "vfork", "chmod"}
    assert {name: numbers[name] for name in ("socket", "execve", "clone", "clone3", "kill", "fcntl", "ioctl")} == {
        "socket": 198, "execve": 221, "clone": 220, "clone3": 435, "kill": 129, "fcntl": 25, "ioctl": 29}
    assert "if ($a0.lo32 == 4242)" in pfc  # signals to the given pid only


@kernel_only
def test_without_libseccomp_it_warns_naming_the_package_and_falls_back_to_guards(monkeypatch, caplog, precious):
    monkeypatch.setattr(execution, "LIBSECCOMP", "libseccomp-absent.so.0")
    execution._libseccomp.cache_clear()
    kernel_confinement.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="nanochat.execution"):
            result = execute(f"import os\nos.remove({str(precious / 'data.txt')!r})\n")
    finally:
        execution._libseccomp.cache_clear()
        kernel_confinement.cache_clear()
    assert result.status == "failed" and "os.remove is disabled" in result.stderr
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "libseccomp-absent.so.0" in warnings[0] and "libseccomp2" in warnings[0]


@kernel_only
@pytest.mark.parametrize("call, command", [("fcntl", "fcntl.F_SETOWN"), ("ioctl", "0x5412")],
                         ids=["fcntl F_SETOWN", "ioctl TIOCSTI"])
def test_a_refused_command_with_its_upper_half_set_is_still_refused(call, command):
    # The kernel reads fcntl's and ioctl's command as an unsigned int, so the filter must compare only that.
    number = execution._libseccomp().seccomp_syscall_resolve_name(call.encode())
    program = (
        "import ctypes, fcntl, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "r, w = os.pipe()\n"
        f"arguments = [r, {command} | 1 << 32, os.getpid()]\n"
        f"print(libc.syscall({number}, *map(ctypes.c_long, arguments)), ctypes.get_errno())\n"
    )
    result = execute(program)
    assert result.stdout == f"-1 {errno.EPERM}\n", result.stderr


@kernel_only
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="machine code for x86_64")
def test_a_system_call_of_another_abi_in_a_thread_kills_the_whole_program():
    # libseccomp's default for another ABI kills only the calling thread; the filter asks for the process.
    program = (
        "import ctypes, mmap, threading\n"
        "page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
        "page.write(bytes.fromhex('b814000000cd80c3'))\n"  # getpid through int 0x80, the i386 entry point
        "call = ctypes.CFUNCTYPE(ctypes.c_long)(ctypes.addressof(ctypes.c_char.from_buffer(page)))\n"
        "worker = threading.Thread(target=call)\n"
        "worker.start(); worker.join()\n"
        "print('survived')\n"
    )
    result = execute(program)
    assert result.status == "error" and "SIGSYS" in result.stderr and result.stdout == ""
