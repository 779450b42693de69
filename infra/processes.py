"""The stack's child processes: each starts in a session of its own and holds one byte of
the stack's lock file while it lives, so that any process — `make down` long after
`make up` returned, or after the process that started the stack crashed — can tell
which recorded pids are still the processes the stack started, without reading /proc
and without ever signalling a pid the system has since given to something else.

Why a lock byte proves identity: a POSIX record lock (fcntl/lockf) belongs to the
process that took it. It survives exec, is not inherited by children, and the kernel
drops it when the process exits. A child takes its byte between fork and exec and
nothing else locks that byte while the child lives, so "byte k of DIR/stack.lock is
locked" means "the process started as child k is alive", and its pid is the one the
stack recorded. A recycled pid holds no lock. Byte 0 is the owner's: the process that
runs the stack (`stack up` until it returns, `stack run`, a test session). While the
owner lives, no second stack starts in the same directory.

A child leads its own session and process group (start_new_session), so signalling its
group reaches whatever it started in that group. A group is signalled only while its
leader is known to be ours: while its byte is locked, or by its parent before reaping
it (a child keeps its pid until its parent reaps it). cargo lambda watch starts each
function instance in a session of its own, out of reach of its group: watch stops them
itself on SIGTERM, and if watch dies any other way they exit by themselves, because
their long poll for the next invocation to watch fails. (Each instance is the runtime
shim, infra/runtime_shim.py, with the function as its child: the shim passes SIGTERM on,
and exits, stopping its function, when watch's Runtime API goes away.)

One caveat of POSIX locks shapes the code: closing any descriptor of the lock file drops
every lock the closing process holds on it. So each process opens the file once
(StackLock) and keeps that descriptor while it holds a byte.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import time
from pathlib import Path

from .net import wait_until

LOCK_FILE = "stack.lock"
OWNER_SLOT = 0


class SlotTaken(RuntimeError):
    """A child could not take its lock byte: a process of an earlier stack holds it."""


class StackLock:
    """The lock file of one state directory, opened once by this process."""

    def __init__(self, state_dir: Path | str, *, create: bool = True):
        self.path = Path(state_dir) / LOCK_FILE
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        self.fd = os.open(self.path, flags, 0o600)

    @classmethod
    def existing(cls, state_dir: Path | str) -> "StackLock | None":
        """The lock of a state dir, or None if no stack ever ran there."""
        try:
            return cls(state_dir, create=False)
        except FileNotFoundError:
            return None

    def take(self, slot: int) -> bool:
        """Lock byte `slot` for this process; False if another process holds it."""
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, slot)
            return True
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):
                return False
            raise

    def release(self, slot: int) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, slot)

    def held(self, slot: int) -> bool:
        """True while another process holds byte `slot` (this process's own locks do not count)."""
        if self.take(slot):
            self.release(slot)
            return False
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # drops every byte this process holds
            self.fd = -1

    def __enter__(self) -> "StackLock":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def spawn(argv: list[str], *, lock: StackLock, slot: int, log_path: Path, env: dict,
          cwd: Path) -> subprocess.Popen:
    """Start argv in a session of its own, holding byte `slot` of the lock from before its
    first instruction until it exits; its output goes to log_path (fresh for each start)."""
    fd = lock.fd

    def hold_slot() -> None:  # runs in the child, between fork and exec
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, slot)

    with open(log_path, "wb", buffering=0) as logf:
        logf.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        try:
            return subprocess.Popen(argv, cwd=str(cwd), env=env, stdin=subprocess.DEVNULL, stdout=logf,
                                    stderr=subprocess.STDOUT, start_new_session=True, pass_fds=(fd,),
                                    preexec_fn=hold_slot)
        except subprocess.SubprocessError as e:  # only hold_slot raises one
            raise SlotTaken(f"byte {slot} of {lock.path} is held by a process of an earlier stack") from e


def signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group is empty already


def stop(children: dict[str, tuple[int, int]], lock: StackLock, grace_s: float = 10.0, log=None) -> list[str]:
    """Stop the children {name: (pid, slot)} whose slot is still held: SIGTERM to each
    one's group, then SIGKILL to the groups of those still holding their slot after
    grace_s. Returns the names of those that were running."""
    running = {name: (pid, slot) for name, (pid, slot) in children.items() if lock.held(slot)}
    for pid, _ in running.values():
        signal_group(pid, signal.SIGTERM)

    def all_gone() -> bool:
        return not any(lock.held(slot) for _, slot in running.values())

    if not wait_until(all_gone, grace_s):
        for name, (pid, slot) in running.items():
            if lock.held(slot):  # still the child we started: its byte is locked
                if log:
                    log(f"stack: {name} (pid {pid}) did not stop within {grace_s:.0f}s, killing it")
                signal_group(pid, signal.SIGKILL)
        wait_until(all_gone, 5.0)
    return list(running)
