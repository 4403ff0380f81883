"""``python -m server.guard GRACE -- ARGV...``: run one engine so that it can never outlive the gateway.

The gateway starts this guard in a new session (its own process group) with a pipe on stdin. The
guard starts ``ARGV`` (the engine) in that group and becomes a child subreaper, so every process the
engine forks stays below it. It stops the engine when any of these happens:

- its stdin reaches EOF: the gateway closed the pipe or died, even by SIGKILL;
- its parent dies (``PR_SET_PDEATHSIG``, Linux);
- it receives SIGTERM, SIGINT or SIGHUP.

Stopping is SIGTERM to the engine → up to GRACE seconds → SIGKILL to every remaining descendant and
member of the process group. The guard exits with the engine's exit status (128 + signal number when
a signal ended it), after it has swept every descendant, also when the engine exited on its own.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time

import psutil

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, arg: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(option, arg, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the stdin pipe still ends the engine


def _sweep(grace: float) -> None:
    """SIGTERM, then after ``grace`` seconds SIGKILL, every descendant and group member but us."""
    me = psutil.Process()
    pgid = os.getpgid(0)

    def others() -> list[psutil.Process]:
        found = {p.pid: p for p in me.children(recursive=True)}
        for p in psutil.process_iter():
            try:
                if p.pid != me.pid and os.getpgid(p.pid) == pgid:
                    found[p.pid] = p
            except (psutil.Error, ProcessLookupError, PermissionError):
                continue
        return list(found.values())

    procs = others()
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive + others():
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(others(), timeout=5)


class _Stop:
    """Why the engine must stop. Plain attribute writes only: a signal handler must take no lock
    (``threading.Event.set`` does, and a second signal arriving inside it deadlocks the guard)."""

    requested = False


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m server.guard GRACE_SECONDS -- COMMAND...", file=sys.stderr)
        return 2
    grace = float(argv[0])
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    def on_signal(*_: object) -> None:
        _Stop.requested = True

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    if os.getppid() == 1:  # the gateway died before PDEATHSIG was armed
        return 1

    def watch_stdin() -> None:
        try:
            while sys.stdin.buffer.read(4096):
                pass
        except (OSError, ValueError):
            pass
        _Stop.requested = True

    threading.Thread(target=watch_stdin, daemon=True).start()
    child = subprocess.Popen(argv[2:], stdin=subprocess.DEVNULL)
    while child.poll() is None and not _Stop.requested:
        time.sleep(0.1)
    if child.poll() is None:
        print(f"vramgate guard: stopping engine pid {child.pid} (SIGTERM, grace {grace:g}s)",
              file=sys.stderr, flush=True)
        child.terminate()
        deadline = time.monotonic() + grace
        while child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
    _sweep(grace=min(grace, 5.0) if child.poll() is not None else 0.0)
    rc = child.wait()
    return 128 - rc if rc < 0 else rc


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # Not sys.exit: interpreter shutdown can abort (SIGABRT) while the stdin watcher thread holds
    # the stdin lock, which would replace the engine's exit status with -6.
    os._exit(code)
