"""The engine guard as a real process: it stops its engine whatever ends it, even a burst of
signals (a signal handler that takes a lock can deadlock on a second signal)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.gateway import ROOT, alive, describe, wait_gone


def guard(grace: float = 2.0, *cmd: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "server.guard", str(grace), "--",
                             *(cmd or ("sleep", "300"))], cwd=ROOT, stdin=subprocess.PIPE,
                            start_new_session=True)


def child_of(proc: subprocess.Popen | int) -> int:
    """The first child of ``proc`` (a ``Popen`` or a pid), once it has one."""
    import psutil
    pid = proc.pid if isinstance(proc, subprocess.Popen) else proc
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        kids = psutil.Process(pid).children()
        if kids:
            return kids[0].pid
        time.sleep(0.05)
    raise AssertionError("the guard started no child")


@pytest.mark.parametrize("round_", range(8))
def test_a_burst_of_signals_stops_guard_and_engine(round_):
    g = guard()  # its signal handlers are set before it starts the child
    engine = child_of(g)
    end = time.monotonic() + 0.03
    while time.monotonic() < end:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            try:
                os.kill(g.pid, sig)
            except ProcessLookupError:
                break
    left = wait_gone([g.pid, engine], 10)
    if left:
        os.killpg(g.pid, signal.SIGKILL)
    assert left == [], describe(left)
    assert g.wait(5) == 128 + signal.SIGTERM  # sleep ended by the guard's SIGTERM


def test_closing_stdin_stops_the_engine_and_keeps_its_exit_status():
    g = guard()
    engine = child_of(g)
    g.stdin.close()
    assert wait_gone([g.pid, engine], 10) == []
    done = guard(2.0, sys.executable, "-c", "import sys; sys.exit(7)")
    assert done.wait(10) == 7
    done.stdin.close()


def test_an_engine_ignoring_sigterm_is_killed_after_the_grace():
    g = guard(1.0, "sh", "-c", "trap '' TERM; sleep 300")
    shell = child_of(g)
    child_of(shell)  # the shell runs sleep: its trap is set
    t0 = time.monotonic()
    g.send_signal(signal.SIGTERM)
    assert wait_gone([g.pid, shell], 10) == []
    assert time.monotonic() - t0 < 6
    assert not alive(shell)
