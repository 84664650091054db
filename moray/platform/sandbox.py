"""Run untrusted Python in a sandbox: a model's HumanEval completion and its unit tests (evaluation),
or a crawled code document and its doctests (curation's code-execution labels).

Code-generation benchmarks score a completion by *executing* it, so the evaluator has to run text a
model wrote. That text may loop forever, allocate all memory, delete files, open sockets or kill
processes, by accident or otherwise. The evaluator therefore never imports or `exec`s it; each program
runs in a fresh child interpreter and only the child's exit status comes back:

    exit 0              -> "passed"
    MemoryError         -> "memory"   (RLIMIT_AS turns an oversize allocation into a MemoryError)
    wall clock / SIGXCPU -> "timeout" (the evaluator SIGKILLs the child's whole process group)
    anything else       -> "failed"   (detail: the last line of stderr, e.g. "AssertionError")
    could not start     -> "error"

The layers, outermost first:

1. A separate process: `sys.executable -I` (isolated mode: no user site, no PYTHON* variables), a
   new session (so one `killpg` reaches everything it spawned), a minimal environment (nothing of the
   evaluator's leaks, secrets included), stdin from /dev/null, an empty temporary working directory
   removed afterwards, stdout and stderr written to files and read back truncated.
2. Namespaces: a small launcher (`_LAUNCHER`, run as `python -I -c`) calls unshare(2) with
   CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID. The new network namespace has no interface but a
   loopback that is down, so no connect, DNS lookup or listen reaches anything: this is the real
   network isolation. The new PID namespace hides every other process (kill(2) cannot name the
   evaluator) and makes the launcher's child PID 1 there, so when it exits the kernel kills whatever
   the program left behind. Where namespaces are not allowed (some container runtimes, seccomp
   profiles, sysctls), the launcher falls back to fewer namespaces or none, and the result says so
   (`network_isolated=False`).
3. Resource limits (setrlimit in the launcher, inherited across fork and exec): RLIMIT_AS (memory),
   RLIMIT_CPU (a CPU-time backstop behind the wall-clock timeout), RLIMIT_FSIZE (no filling the
   disk), RLIMIT_CORE 0 (no core dumps). Hard limits equal soft ones, so the program cannot raise them
   back (inside a user namespace it lacks CAP_SYS_RESOURCE in the initial namespace).
4. A guard (`_GUARD`) run in the child's interpreter before the program, like OpenAI human-eval's
   `reliability_guard`: socket creation and name resolution raise OSError, and destructive functions
   (os.kill, os.system, fork/exec/spawn, subprocess.Popen, os.remove, shutil.rmtree, ...) raise
   PermissionError. This is defence in depth against *accidents* (a completion that calls
   shutil.rmtree on the wrong path), not a security boundary: Python code can always reach the
   originals again (`import posix`, ctypes). It is also the only network barrier on hosts where the
   namespaces are refused, which is why both layers exist.

Why a launcher rather than `preexec_fn`: `run_programs` starts children from several threads, and
CPython documents preexec_fn as unsafe in the presence of threads (it runs Python code between fork
and exec). The launcher does the unshare and setrlimit calls in its own single-threaded interpreter,
so the evaluator only uses Popen's thread-safe fork_exec path.

Not covered: the file system. Inside the user namespace the child keeps its real uid (root in our
containers), so files its uid owns stay writable; only the guard stands in the way of deleting them.
A mount namespace with a read-only root, or a container per evaluation, would close that. RLIMIT_NPROC
is not used: it counts every process of the *user* (the evaluator's and other jobs' included) and is
not enforced for root at all; the PID namespace and the fork guard cover the common fork-bomb-by-
accident case.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SandboxLimits", "SandboxResult", "run_program", "run_programs"]

_OUTPUT_TAIL_BYTES = 8192  # what is kept of each of stdout and stderr
_DETAIL_CHARS = 500


@dataclass(frozen=True)
class SandboxLimits:
    """What one program may use.

    timeout_s: wall clock from start (interpreter start-up included) to exit; the CPU-time limit is
        ceil(timeout_s) + 1 s, a backstop in case the evaluator itself stalls.
    memory_mb: address space (RLIMIT_AS) of the child; Python itself needs some 30 MB of it.
    file_size_mb: the largest file the child may write (RLIMIT_FSIZE), its stdout/stderr included;
        CPython ignores SIGXFSZ, so a write past it raises OSError (EFBIG) in the program.
    """

    timeout_s: float = 10.0
    memory_mb: int = 1024
    file_size_mb: int = 16

    @property
    def cpu_s(self) -> int:
        return math.ceil(self.timeout_s) + 1


@dataclass(frozen=True)
class SandboxResult:
    """The outcome of one program. `stdout`/`stderr` are the tails of its output, for debugging."""

    status: str  # "passed" | "failed" | "timeout" | "memory" | "error"
    detail: str  # last line of stderr ("AssertionError"), or why it timed out / could not start
    network_isolated: bool  # the child ran in its own, empty network namespace
    stdout: str = ""
    stderr: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# Runs in `python -I -c` with argv: status_fd memory_mb cpu_s file_size_mb namespaces program_path.
# It reports on status_fd, one line each: "isolation <net 0|1> <pid 0|1>", then the program's
# "exit <code>" or "signal <signum>", or "error <message>" if it could not run the program at all.
# Kept stdlib-only and short: it runs before the limits exist.
_LAUNCHER = r"""
import ctypes, os, resource, sys

fd, memory_mb, cpu_s, fsize_mb, namespaces = (int(a) for a in sys.argv[1:6])
program = sys.argv[6]
os.set_inheritable(fd, False)  # the launcher's processes keep it across fork; the program's exec drops it

def report(line):
    os.write(fd, (line + "\n").encode())

CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWPID = 0x10000000, 0x40000000, 0x20000000
net = pid = False
try:
    if not namespaces:
        raise OSError("namespaces turned off")
    libc = ctypes.CDLL(None, use_errno=True)
    # unshare(2) applies all flags or none; try the most isolation first.
    for flags, n, p in ((CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID, True, True),
                        (CLONE_NEWUSER | CLONE_NEWNET, True, False)):
        if libc.unshare(flags) == 0:
            net, pid = n, p
            break
except Exception:
    pass
report(f"isolation {int(net)} {int(pid)}")

limit = lambda res, n: resource.setrlimit(res, (n, n))
limit(resource.RLIMIT_CORE, 0)
limit(resource.RLIMIT_FSIZE, fsize_mb << 20)
resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))  # SIGXCPU first, SIGKILL a second later
limit(resource.RLIMIT_AS, memory_mb << 20)

def run_program():
    # Fork the program and wait for it; returns the exit code for this process to pass on.
    try:
        child = os.fork()
    except OSError as e:
        report(f"error fork failed: {e}")
        return 125
    if child == 0:
        try:
            os.execv(sys.executable, [sys.executable, "-I", "-c", RUNNER, program])
        except BaseException as e:
            report(f"error exec failed: {e}")
        os._exit(127)
    status = os.waitpid(child, 0)[1]
    if os.WIFSIGNALED(status):
        report(f"signal {os.WTERMSIG(status)}")
        return 128 + os.WTERMSIG(status)
    report(f"exit {os.WEXITSTATUS(status)}")
    return os.WEXITSTATUS(status)

if pid:
    # Only the launcher's children enter the new PID namespace; the first becomes its PID 1, and the
    # kernel kills the rest of the namespace when it exits. The program is not PID 1 itself because
    # PID 1 ignores signals it has no handler for (SIGXCPU included).
    init = os.fork()
    if init == 0:
        os._exit(run_program())
    status = os.waitpid(init, 0)[1]
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
os._exit(run_program())
"""

# Defence in depth, run in the program's interpreter before the program (see the module docstring).
# Replacements raise instead of being None (as in human-eval) so the program's traceback says why.
_GUARD = r"""
def _moray_sandbox_guard():
    import builtins, os, shutil, socket, subprocess, _socket

    def disabled(name, error):
        def refuse(*args, **kwargs):
            raise error(f"{name} is disabled in the sandbox")
        return refuse

    message = "network access is disabled in the sandbox"

    class NoSocket(socket.socket):  # a subclass, so `class X(socket.socket)` in ssl etc. still imports
        def __init__(self, *args, **kwargs):
            raise OSError(message)

    for module in (socket, _socket):
        module.socket = module.SocketType = NoSocket
        for name in ("create_connection", "create_server", "getaddrinfo", "gethostbyname",
                     "gethostbyname_ex", "gethostbyaddr", "getnameinfo", "socketpair", "fromfd"):
            if hasattr(module, name):
                setattr(module, name, disabled(f"socket.{name}", OSError))

    # os.putenv stays (human-eval's guard removes it): it changes only this child's own environment,
    # and numpy sets variables on import, so without it no program that uses numpy could run.
    for name in ("kill", "killpg", "system", "popen", "fork", "forkpty", "posix_spawn", "posix_spawnp",
                 "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
                 "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
                 "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate",
                 "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "chroot", "setuid"):
        if hasattr(os, name):
            setattr(os, name, disabled(f"os.{name}", PermissionError))
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, disabled(f"shutil.{name}", PermissionError))
    subprocess.Popen = disabled("subprocess.Popen", PermissionError)
    import resource
    resource.setrlimit = disabled("resource.setrlimit", PermissionError)
    builtins.help = disabled("help", PermissionError)  # it could start a pager

_moray_sandbox_guard()
del _moray_sandbox_guard
"""

# The program runs as __main__ (so `if __name__ == "__main__":` works) under its own file name, so
# tracebacks show its own line numbers.
_RUNNER = (
    _GUARD
    + r"""
import sys
__file__ = sys.argv[0] = sys.argv.pop(1)
with open(__file__, encoding="utf-8") as _f:
    _code = compile(_f.read(), "program.py", "exec")
del _f
exec(_code)
"""
)
_LAUNCHER = f"RUNNER = {_RUNNER!r}\n" + _LAUNCHER

# Tests turn this off to exercise the fallback of hosts that refuse namespaces (the guard alone).
_USE_NAMESPACES = True

_SIGNAL_DETAIL = {signal.SIGXCPU: "CPU time limit exceeded", signal.SIGXFSZ: "file size limit exceeded"}


def run_program(source: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run `source` as a Python program in a sandbox and say whether it exited 0 (see the module
    docstring). Blocks until it ends or `limits.timeout_s` passes. Thread-safe."""
    root = Path(tempfile.mkdtemp(prefix="moray-sandbox-"))
    try:
        return _run(source, limits, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_programs(
    sources: list[str],
    limits: SandboxLimits = SandboxLimits(),
    workers: int = 2,
) -> list[SandboxResult]:
    """`run_program` for each source, `workers` at a time; the results are in the order of `sources`.

    Threads only drive the subprocesses (they spend their time waiting), so the work runs in parallel."""
    if not sources:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(sources)))) as pool:
        return list(pool.map(lambda s: run_program(s, limits), sources))


def _run(source: str, limits: SandboxLimits, root: Path) -> SandboxResult:
    work = root / "work"  # the program's cwd: empty, and its outputs and source are outside it
    work.mkdir()
    program = root / "program.py"
    program.write_text(source, encoding="utf-8")
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(work)}
    read_fd, write_fd = os.pipe()
    try:
        with open(root / "stdout", "wb") as out, open(root / "stderr", "wb") as err:
            args = [
                write_fd,
                limits.memory_mb,
                limits.cpu_s,
                limits.file_size_mb,
                int(_USE_NAMESPACES),
                program,
            ]
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-c", _LAUNCHER, *map(str, args)],
                    cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                    start_new_session=True, pass_fds=(write_fd,), close_fds=True,
                )  # fmt: skip
            except OSError as e:
                return SandboxResult("error", f"could not start the sandbox: {e}", False)
            finally:
                os.close(write_fd)
            timed_out = not _wait_unreaped(proc.pid, limits.timeout_s)
            # Kill the whole process group before reaping the launcher, while its pid still names the
            # group: on timeout that stops the program, otherwise it sweeps up anything it left running.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            returncode = proc.wait()
        reports = _read_all(read_fd).decode(errors="replace").splitlines()
    finally:
        os.close(read_fd)
    stdout = _tail(root / "stdout")
    stderr = _tail(root / "stderr")
    isolation = next((r.split() for r in reports if r.startswith("isolation ")), None)
    network_isolated = bool(isolation and isolation[1] == "1")

    def result(status: str, detail: str) -> SandboxResult:
        return SandboxResult(status, detail[:_DETAIL_CHARS], network_isolated, stdout, stderr)

    if timed_out:
        return result("timeout", f"timed out after {limits.timeout_s} s")
    errors = [r[len("error ") :] for r in reports if r.startswith("error ")]
    if isolation is None or errors:
        why = errors[0] if errors else _last_line(stderr) or f"launcher exit status {returncode}"
        return result("error", f"the sandbox could not run the program: {why}")
    outcome = next((r.split() for r in reports if r.startswith(("exit ", "signal "))), None)
    if outcome is None:  # the launcher died without a word: treat its own status as the program's
        outcome = ["signal", str(-returncode)] if returncode < 0 else ["exit", str(returncode)]
    kind, number = outcome[0], int(outcome[1])
    last = _last_line(stderr)
    if kind == "exit" and number == 0:
        return result("passed", last)
    if "MemoryError" in last or "Cannot allocate memory" in last:
        return result("memory", last)
    if kind == "signal":
        if number == signal.SIGXCPU:
            return result("timeout", f"CPU time limit of {limits.cpu_s - 1} s exceeded")
        name = signal.Signals(number).name if number in signal.valid_signals() else str(number)
        return result(
            "failed", _SIGNAL_DETAIL.get(number, f"killed by {name}") + (f": {last}" if last else "")
        )
    return result("failed", last or f"exit status {number}")


def _wait_unreaped(pid: int, timeout_s: float) -> bool:
    """Wait up to `timeout_s` for `pid` to exit, leaving it unreaped (a zombie) so its pid, and so its
    process group id, cannot be reused before we kill the group. True if it exited."""
    deadline = time.monotonic() + timeout_s
    pause = 0.005
    while True:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(pause, left))
        pause = min(pause * 2, 0.05)


def _read_all(fd: int) -> bytes:
    # EOF comes once the launcher and its PID-1 child are gone; both were killed or have exited.
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _tail(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - _OUTPUT_TAIL_BYTES))
        return f.read().decode(errors="replace")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""
