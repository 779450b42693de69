"""Tests of infra/processes.py: a child holds its byte of the lock file exactly while it
lives, and stopping signals the process groups of live children only — never a recorded
pid whose byte is free, which may belong to an unrelated process by now."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from infra import ROOT
from infra.net import free_port, port_open, wait_until
from infra.processes import OWNER_SLOT, SlotTaken, StackLock, spawn, stop

SLEEPER = [sys.executable, "-c", "import time; time.sleep(300)"]
LISTENER = "import socket, time; s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(300)"


def listening(port: int, ignore_term: bool = False) -> list[str]:
    """A process that listens on port once it is ready (so a test can see it live and
    die), optionally ignoring SIGTERM."""
    prelude = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); " if ignore_term else ""
    return [sys.executable, "-c", prelude + LISTENER.format(port=port)]


def parent_of_listening(port: int) -> list[str]:
    """A process whose own child (in its process group) listens on port."""
    child = listening(port)
    return [sys.executable, "-c", f"import subprocess, time; subprocess.Popen({child!r}); time.sleep(300)"]


@pytest.fixture
def lock(tmp_path):
    with StackLock(tmp_path) as lock:
        yield lock


@pytest.fixture
def start(lock, tmp_path):
    """start(argv, slot) -> Popen, through processes.spawn; whatever is left is killed."""
    started = []

    def run(argv: list[str], slot: int) -> subprocess.Popen:
        p = spawn(argv, lock=lock, slot=slot, log_path=tmp_path / f"child-{slot}.log", env=dict(os.environ),
                  cwd=tmp_path)
        started.append(p)
        return p

    yield run
    for p in started:
        if p.returncode is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@pytest.fixture
def bystander():
    """An unrelated process leading its own session and group: what a recycled pid may
    belong to, and the worst case for a stale killpg."""
    p = subprocess.Popen(SLEEPER, start_new_session=True)
    yield p
    p.kill()
    p.wait()


def test_a_child_holds_its_byte_exactly_while_it_lives(lock, start):
    p = start(SLEEPER, 1)
    assert lock.held(1) and not lock.held(2)
    p.terminate()
    p.wait(10)
    assert not lock.held(1)


def test_a_byte_has_one_holder_at_a_time(lock, start):
    start(SLEEPER, 1)
    with pytest.raises(SlotTaken):
        start(SLEEPER, 1)


def test_another_process_sees_the_owner_byte_until_the_owner_lets_go(tmp_path):
    probe = [sys.executable, "-c", "import sys; from infra.processes import StackLock; "
                                   "print(StackLock(sys.argv[1]).held(0))", str(tmp_path)]
    with StackLock(tmp_path) as lock:
        assert lock.take(OWNER_SLOT)
        assert subprocess.run(probe, cwd=ROOT, capture_output=True, text=True).stdout == "True\n"
    assert subprocess.run(probe, cwd=ROOT, capture_output=True, text=True).stdout == "False\n"


def test_stop_ends_a_live_child_and_what_it_started_in_its_group(lock, start):
    port = free_port()
    p = start(parent_of_listening(port), 1)
    assert wait_until(lambda: port_open(port), 30)
    assert stop({"parent": (p.pid, 1)}, lock) == ["parent"]
    assert p.wait(10) == -signal.SIGTERM
    assert not lock.held(1)
    assert wait_until(lambda: not port_open(port), 10), "the child's own child still listens"


def test_stop_kills_a_child_that_ignores_sigterm_after_the_grace_period(lock, start):
    port = free_port()
    p = start(listening(port, ignore_term=True), 1)
    assert wait_until(lambda: port_open(port), 30)  # its SIGTERM handler is in place
    said = []
    assert stop({"stubborn": (p.pid, 1)}, lock, grace_s=0.5, log=said.append) == ["stubborn"]
    assert p.wait(10) == -signal.SIGKILL
    assert len(said) == 1 and "stubborn" in said[0] and "killing" in said[0]


def test_stop_spares_a_recorded_pid_whose_byte_is_free(lock, start, bystander):
    live = start(SLEEPER, 1)
    # devmodel is long gone and its pid now belongs to the bystander.
    stopped = stop({"moto": (live.pid, 1), "devmodel": (bystander.pid, 2)}, lock)
    assert stopped == ["moto"]
    assert live.wait(10) == -signal.SIGTERM
    assert bystander.poll() is None
