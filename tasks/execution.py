"""Run untrusted, model-generated Python (a completion plus its unit tests) and report how it went.

    result = execute(program, timeout=5.0, memory_mb=512)
    result.status   # "passed" | "failed" | "timeout" | "error"

Each program runs in a fresh interpreter (`python -I`: no user site, no PYTHON*
variables) with a minimal environment, stdin closed, in a throw-away working
directory (also $HOME and $TMPDIR) that is deleted afterwards. Before the
program's first line, the child confines itself through the kernel, in this
order: resource limits, no_new_privs, an empty capability set (root keeps its
uid but none of its powers), a Landlock ruleset and a seccomp filter. Kernel
restrictions only ever tighten and hold whatever the program does: re-imported
private modules (`del sys.modules["posix"]; import posix`), ctypes, C
extensions, frames and method resolution order reach the same system calls.

Contained by the kernel (needs Linux >= 6.2 with Landlock enabled, libseccomp2, x86_64 or aarch64):
- Writes outside the working directory (Landlock): creating, writing,
  truncating, deleting, renaming or linking anything outside it fails, whichever
  call does it (`open`, `_io.FileIO`, `os.open`, sqlite3, ...); so do hard links
  and renames from outside into it (EXDEV). /dev/null stays writable. Landlock
  does not cover permission bits, so chmod fails everywhere (seccomp) and chown
  for want of CAP_CHOWN; hence shutil.copy, copy2 and move, which copy the
  bits, fail even inside the working directory (shutil.copyfile works).
- New processes (seccomp): fork, vfork, execve, execveat and clone without
  CLONE_THREAD fail with EPERM. clone3 answers ENOSYS, its flags being out of a
  filter's reach, so that glibc falls back to clone: threads still work.
- Network (seccomp): socket() fails for every family, so no TCP, UDP or Unix
  socket to a local daemon; socketpair() works (two ends, nothing outside).
  io_uring fails too: it can create sockets without calling socket().
- Other processes (Landlock restricts ptrace to the sandbox's own domain):
  /proc/<pid>/environ, mem, fd, cwd and root of every process outside it
  (the parent, pid 1, other sandboxes) cannot be read, nor can they be
  ptraced. Signals (seccomp) may be sent only to the program's own pid, and no
  file may be given an owner (F_SETOWN, FIOSETOWN), whose I/O would signal it.
  TIOCSTI, which types into a terminal, fails.
- Its own limits (seccomp): setrlimit, and prlimit with a new limit, fail; the
  limits are frozen as set. Without CAP_SYS_RESOURCE no hard limit could be
  raised anyway. unshare and setns fail, so no namespace hands capabilities back.
- System calls through another ABI (32-bit, x32) kill the process: the filter
  knows only the native numbers, which libseccomp resolves from the calls' names.

Accident protections (limits, not a security boundary):
- Address space and data segment (`memory_mb`), CPU seconds, size of any file
  written (MAX_FILE_BYTES), open files, no core dumps.
- A wall-clock timeout that SIGKILLs the child's process group and the child.
- Only the first MAX_OUTPUT_BYTES of stdout and of stderr are kept.
- Exiting early through Python (`exit()`, `sys.exit(0)`, `os._exit`, `os.abort`)
  counts as failed, so an accident cannot skip the tests that follow.
- execute() uses no signals and shares only the probe's cached answer, so several
  threads can call it.

Not contained:
- Reading: every file the caller may read stays readable (Landlock is given
  write rules only), and so are other processes' /proc/<pid>/cmdline and status.
- SysV IPC and POSIX message queues, which the machine shares; the CPU and I/O
  priority and CPU affinity of the caller's other processes; timestamps and
  extended attributes of files the caller owns (as root: most of the system);
  the settings of a terminal it can open for reading.
- Filling the disk: each file is capped at MAX_FILE_BYTES, not their number.
- CPU and memory pressure on the machine while the program runs.
- Kernel exploits and side channels: the filter is a deny list on a shared
  kernel, not a virtual machine.

Why the verdict cannot be made unforgeable here. "passed" means the child
exited 0, which the harness does only once exec() of the whole program
returned. A deliberate program can forge it, and no in-process design fixes
that, because the code under test and its tests share one interpreter:
- Whatever the harness does after the tests to prove they ran (an exit code, a
  nonce written to a pipe), the program can do before them: it has the same
  memory (the harness's frames, `gc.get_objects()`, /proc/self/mem), the same
  descriptors and the same system calls; `posix._exit(0)` from a re-imported
  posix skips the tests with status 0.
- The kernel cannot tell the two apart either: seccomp and Landlock only ever
  tighten, so nothing can be withheld from the program and given back to the
  harness afterwards.
- The program can also make the tests themselves succeed: return an object
  whose __eq__ is always true, patch a module the tests call, or set a trace
  function that jumps over the test lines.
Grading that cannot be forged needs the tests in a second process that gets
only plain data (never objects) back from the code under test. HumanEval's
tests are in-process code that also calls helpers defined in the prompt, so
that is a different harness, not this module.

Without Landlock ABI 3, seccomp or libseccomp2 (an older kernel, Landlock left out
of the boot's lsm= list, a container profile that refuses the calls), execute() warns
once and falls back to Python-level guards that catch accidents only: process
creation, signalling, destructive file calls, sockets and limit changes raise
PermissionError, `ctypes` and `multiprocessing` cannot be imported, files may
be opened for writing only inside the working directory, and RLIMIT_NPROC is 0
(which the kernel ignores for root, and which refuses threads to anyone else);
re-importing a private module walks around every one of them.

Why not bubblewrap: for a caller that is not root it needs user namespaces,
which Ubuntu 24.04 (hence DGX OS 7) restricts for unprivileged programs by
default (kernel.apparmor_restrict_unprivileged_userns), and it is one more
package and process. Landlock and seccomp need no privilege and cover the same
classes; what bubblewrap's pid and mount namespaces would add is hiding other
processes and chosen files from reading.
"""

from __future__ import annotations

import builtins
import contextlib
import ctypes
import errno
import functools
import io
import logging
import math
import os
import posix
import resource
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import types
from dataclasses import dataclass

log = logging.getLogger("nanochat.execution")

PROGRAM_FILE = "program.py"
MAX_OUTPUT_BYTES = 10_000  # kept of stdout and of stderr each
MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_OPEN_FILES = 64
DRAIN_SECONDS = 1.0  # after the kill, how long to wait for the last output
PROGRAM_FAILED = 1  # child exit code for a program that raised or exited early
SANDBOX_BROKEN = 3  # child exit code for a wrapper that could not set itself up
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

# ---- kernel confinement: constants from the kernel's uapi headers -----------------------------

LANDLOCK_CREATE_RULESET, LANDLOCK_ADD_RULE, LANDLOCK_RESTRICT_SELF = 444, 445, 446  # same on every arch
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
LANDLOCK_MIN_ABI = 3  # Linux 6.2: the first ABI that also handles truncate(2)
# The rights that change the tree; reading and executing stay unhandled, hence allowed everywhere.
FS_WRITE_FILE, FS_REMOVE_DIR, FS_REMOVE_FILE = 1 << 1, 1 << 4, 1 << 5
FS_MAKE_CHAR, FS_MAKE_DIR, FS_MAKE_REG, FS_MAKE_SOCK, FS_MAKE_FIFO, FS_MAKE_BLOCK, FS_MAKE_SYM = (
    1 << bit for bit in range(6, 13))
FS_REFER, FS_TRUNCATE = 1 << 13, 1 << 14  # link or rename across directories (ABI 2); truncate (ABI 3)
FS_MODIFY = (
    FS_WRITE_FILE | FS_REMOVE_DIR | FS_REMOVE_FILE | FS_MAKE_CHAR | FS_MAKE_DIR | FS_MAKE_REG | FS_MAKE_SOCK
    | FS_MAKE_FIFO | FS_MAKE_BLOCK | FS_MAKE_SYM | FS_REFER | FS_TRUNCATE
)
PR_GET_SECCOMP, PR_SET_NO_NEW_PRIVS = 21, 38
CAPABILITY_VERSION_3 = 0x20080522

# ---- the seccomp filter, built by libseccomp from system call names --------------------------

LIBSECCOMP = "libseccomp.so.2"  # a soname, not a path: the loader finds it wherever the distribution put it
# Where the rules' argument positions were checked: clone's flags are argument 0 (s390 swaps the first two).
SECCOMP_MACHINES = ("x86_64", "aarch64")
REFUSED_SYSCALLS = (  # fork, vfork and chmod do not exist on aarch64: libseccomp leaves their rules out there
    "fork", "vfork", "execve", "execveat", "socket", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "chmod", "fchmod", "fchmodat", "fchmodat2", "setrlimit", "unshare", "setns", "tkill", "pidfd_send_signal",
)
SIGNALS_TO_SELF_ONLY = ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo")  # the pid is argument 0
CLONE_THREAD = 0x00010000
# A file's owner gets a signal of the file's choosing (SIGKILL too) on I/O; TIOCSTI types into a terminal.
F_SETOWN, F_SETOWN_EX = 8, 15
FIOSETOWN, SIOCSPGRP, TIOCSTI = 0x8901, 0x8902, 0x5412
LOW_32_BITS = 0xFFFFFFFF  # fcntl and ioctl read their command as an unsigned int: the upper half is ignored
# From libseccomp's seccomp.h: actions (the kernel's SECCOMP_RET_* values), a filter attribute and
# argument comparisons (enum scmp_compare).
SCMP_ACT_KILL_PROCESS, SCMP_ACT_ERRNO, SCMP_ACT_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000
SCMP_FLTATR_ACT_BADARCH = 2
SCMP_CMP_NE, SCMP_CMP_MASKED_EQ = 1, 7


class _ArgCmp(ctypes.Structure):
    """libseccomp's struct scmp_arg_cmp: the rule applies when argument `arg` compares true."""
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


# ---- Python-level guards: the fallback without kernel confinement -----------------------------

EXIT_CALLS = ("_exit", "abort")  # end the process without unwinding, which would skip the exit check
DISABLED_OS_CALLS = (
    # new processes
    "system", "popen", "fork", "forkpty", "posix_spawn", "posix_spawnp",
    "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
    "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp", "execvpe",
    # other processes, and leaving the process group that the timeout kills
    "kill", "killpg", "setsid", "setpgid", "setpgrp",
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


@functools.cache
def kernel_confinement() -> bool:
    """Whether children confine themselves through Landlock and seccomp; warns once when they cannot."""
    problem = _confinement_problem()
    if problem:
        log.warning(
            "code sandbox: %s, so programs run under Python-level guards only, which catch accidents but "
            "not a deliberate program (see tasks/execution.py). Needs Linux >= 6.2 with Landlock enabled "
            "(CONFIG_SECURITY_LANDLOCK, 'landlock' in /sys/kernel/security/lsm or the lsm= boot option).",
            problem,
        )
    return problem is None


def _confinement_problem() -> str | None:
    machine = os.uname().machine
    if machine not in SECCOMP_MACHINES:
        return f"the seccomp filter's rules were not checked for {machine}"
    try:
        abi = _libc("syscall", LANDLOCK_CREATE_RULESET, 0, 0, LANDLOCK_CREATE_RULESET_VERSION)
    except OSError as e:
        return f"Landlock is not available ({e.strerror})"
    if abi < LANDLOCK_MIN_ABI:
        return f"Landlock ABI {abi} is older than the {LANDLOCK_MIN_ABI} needed"
    try:
        _libc("prctl", PR_GET_SECCOMP, 0, 0, 0, 0)
    except OSError as e:
        return f"seccomp is not available ({e.strerror})"
    try:
        with _seccomp_filter(os.getpid()):
            pass  # built, not loaded: this libseccomp knows every name and takes every rule
    except (OSError, LookupError) as e:
        return f"libseccomp cannot build the filter ({e}); install or update the libseccomp2 package (>= 2.4)"
    return None


def _libc(name: str, *args: int) -> int:
    """Call a libc function with integer arguments (pointers as addresses); OSError when it fails."""
    function = getattr(ctypes.CDLL(None, use_errno=True), name)
    # Arguments as longs, since variadics such as syscall() read whole registers; the result as an int
    # (ctypes' default), since prctl and capset set only its low half, and our syscalls' results fit.
    result = function(*map(ctypes.c_long, args))
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), name)
    return result


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
    confinement = "kernel" if kernel_confinement() else "guards"
    return [sys.executable, "-I", "-X", "utf8", os.path.abspath(__file__), str(memory_bytes), str(cpu_seconds),
            confinement]


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


def _child_main(memory_bytes: int, cpu_seconds: int, confinement: str) -> None:
    real_exit = os._exit  # kept before the guards take it away from the program
    try:
        with open(PROGRAM_FILE, "rb") as f:
            source = f.read()  # bytes: compile() honours a coding declaration
        kernel = confinement == "kernel"
        _limit_resources(memory_bytes, cpu_seconds, limit_processes=not kernel)  # first: seccomp freezes them
        workdir = os.path.realpath(os.getcwd())
        if kernel:
            _confine(workdir)
        else:
            _install_guards(workdir)
        _guard_exits()
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        real_exit(SANDBOX_BROKEN)
    code = _run_program(source)
    _flush_output()
    # Skips atexit handlers and thread joins: the program gets no say after it ends.
    real_exit(code)


def _limit_resources(memory_bytes: int, cpu_seconds: int, limit_processes: bool) -> None:
    limits = {
        resource.RLIMIT_AS: memory_bytes,
        resource.RLIMIT_DATA: memory_bytes,
        resource.RLIMIT_CPU: cpu_seconds,
        resource.RLIMIT_FSIZE: MAX_FILE_BYTES,
        resource.RLIMIT_NOFILE: MAX_OPEN_FILES,
        resource.RLIMIT_CORE: 0,
    }
    if limit_processes:  # ignored by the kernel for root; for anyone else it refuses threads too
        limits[resource.RLIMIT_NPROC] = 0
    for which, value in limits.items():
        _, hard = resource.getrlimit(which)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (value, value))  # hard too: raising it back needs a capability


def _confine(workdir: str) -> None:
    """Kernel restrictions on this process and on every thread it starts later; none can be lifted."""
    if len(os.listdir("/proc/self/task")) != 1:
        raise RuntimeError("threads already run: capabilities and Landlock would confine only this one")
    _libc("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # what Landlock and seccomp ask of a process without CAP_SYS_ADMIN
    _drop_capabilities()
    _restrict_writes(workdir)
    with _seccomp_filter(os.getpid()) as seccomp_filter:
        _seccomp_check(_libseccomp().seccomp_load(seccomp_filter), "seccomp_load")


def _drop_capabilities() -> None:
    # Root keeps uid 0 but loses its powers: no file permission override, no raising a hard limit, no chown.
    header = ctypes.create_string_buffer(struct.pack("=Ii", CAPABILITY_VERSION_3, 0))
    empty = ctypes.create_string_buffer(24)  # two (effective, permitted, inheritable) triples of 32 bits
    _libc("capset", ctypes.addressof(header), ctypes.addressof(empty))


def _restrict_writes(workdir: str) -> None:
    attr = ctypes.create_string_buffer(struct.pack("=Q", FS_MODIFY))  # handled_access_fs: writes only
    ruleset = _libc("syscall", LANDLOCK_CREATE_RULESET, ctypes.addressof(attr), 8, 0)
    try:
        _allow_beneath(ruleset, workdir, FS_MODIFY)
        _allow_beneath(ruleset, os.devnull, FS_WRITE_FILE | FS_TRUNCATE)
        _libc("syscall", LANDLOCK_RESTRICT_SELF, ruleset, 0)
    finally:
        os.close(ruleset)


def _allow_beneath(ruleset: int, path: str, access: int) -> None:
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        rule = ctypes.create_string_buffer(struct.pack("=Qi", access, fd))  # the packed landlock_path_beneath_attr
        _libc("syscall", LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH, ctypes.addressof(rule), 0)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _seccomp_filter(pid: int):
    """A filter for this machine, built but not loaded: calls through another ABI kill the process (by
    default libseccomp kills only the thread), _add_seccomp_rules' calls fail, the rest are allowed."""
    seccomp = _libseccomp()
    seccomp_filter = seccomp.seccomp_init(SCMP_ACT_ALLOW)
    if not seccomp_filter:
        raise OSError(errno.ENOMEM, "seccomp_init failed")
    try:
        _seccomp_check(seccomp.seccomp_attr_set(seccomp_filter, SCMP_FLTATR_ACT_BADARCH, SCMP_ACT_KILL_PROCESS),
                       "seccomp_attr_set")
        _add_seccomp_rules(seccomp_filter, pid)
        yield seccomp_filter
    finally:
        seccomp.seccomp_release(seccomp_filter)


def _add_seccomp_rules(seccomp_filter: int, pid: int) -> None:
    """REFUSED_SYSCALLS fail, clone makes threads only, prlimit only reads, signals reach only `pid`,
    and no file gets an owner to signal. A rule refuses when all its comparisons hold."""
    seccomp = _libseccomp()

    def refuse(name: str, *comparisons: tuple[int, int, int, int], code: int = errno.EPERM) -> None:
        # Negative for a call this architecture lacks (fork on aarch64): a pseudo-number whose rule is left out.
        number = seccomp.seccomp_syscall_resolve_name(name.encode())
        if number == -1:  # __NR_SCMP_ERROR
            raise LookupError(f"the system call {name!r} is unknown to this libseccomp")
        array = (_ArgCmp * len(comparisons))(*(_ArgCmp(*c) for c in comparisons))
        _seccomp_check(seccomp.seccomp_rule_add_array(seccomp_filter, SCMP_ACT_ERRNO | code, number,
                                                      len(comparisons), array), f"seccomp_rule_add({name})")

    for name in REFUSED_SYSCALLS:
        refuse(name)
    refuse("clone3", code=errno.ENOSYS)  # its flags are in memory, out of a filter's reach; glibc falls back to clone
    refuse("clone", (0, SCMP_CMP_MASKED_EQ, CLONE_THREAD, 0))
    refuse("prlimit64", (2, SCMP_CMP_NE, 0, 0))  # a new limit is argument 2
    for name in SIGNALS_TO_SELF_ONLY:
        refuse(name, (0, SCMP_CMP_NE, pid, 0))  # all 64 bits: only the exact pid passes
    for name, command in [("fcntl", F_SETOWN), ("fcntl", F_SETOWN_EX),
                          ("ioctl", FIOSETOWN), ("ioctl", SIOCSPGRP), ("ioctl", TIOCSTI)]:
        refuse(name, (1, SCMP_CMP_MASKED_EQ, LOW_32_BITS, command))


@functools.cache
def _libseccomp() -> ctypes.CDLL:
    """The six functions we call, declared: smaller than the pyseccomp package (whole API, last release
    2021), which raises at import when the library is missing. OSError when it is missing."""
    seccomp = ctypes.CDLL(LIBSECCOMP)
    for name, result, arguments in [  # the filter is an opaque pointer
        ("seccomp_init", ctypes.c_void_p, [ctypes.c_uint32]),
        ("seccomp_attr_set", ctypes.c_int, [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]),
        ("seccomp_syscall_resolve_name", ctypes.c_int, [ctypes.c_char_p]),
        ("seccomp_rule_add_array", ctypes.c_int,
         [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_ArgCmp)]),
        ("seccomp_load", ctypes.c_int, [ctypes.c_void_p]),
        ("seccomp_release", None, [ctypes.c_void_p]),
    ]:
        function = getattr(seccomp, name)
        function.restype, function.argtypes = result, arguments
    return seccomp


def _seccomp_check(result: int, call: str) -> None:
    if result < 0:  # libseccomp answers -errno
        raise OSError(-result, os.strerror(-result), call)


def _guard_exits() -> None:
    for module in (os, posix):
        for name in EXIT_CALLS:
            setattr(module, name, _refusal(f"os.{name}"))


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
    _child_main(memory_bytes=int(sys.argv[1]), cpu_seconds=int(sys.argv[2]), confinement=sys.argv[3])
