"""A job's life around the loop: one job per output directory, exit when the torchrun agent dies,
SIGTERM/SIGINT as exceptions (so cleanup runs), and a fixed shutdown order on every exit path."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import torch.distributed as dist


class OutputDirInUse(RuntimeError):
    """Another live job holds the output directory's lock."""


class AgentDied(RuntimeError):
    """The torchrun agent that started this worker is gone; a relaunch may already be running."""


class OutputDirLock:
    """Exclusive `fcntl` lock on `OUTPUT_DIR/.lock`, held by rank 0 for the job's life.

    A POSIX record lock: released by the kernel when the holding process dies however it dies,
    and not inherited by forked DataLoader workers. The file records the holder's host and pid for
    the error another job gets."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise OutputDirInUse(f"{self.path.parent} is in use by another job ({self._holder()}); "
                                 "wait for it to finish or stop it, or choose another output_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode())
        os.fsync(fd)
        self._fd = fd

    def _holder(self) -> str:
        try:
            holder = json.loads(self.path.read_text())
            return f"host {holder['host']}, pid {holder['pid']}"
        except (OSError, ValueError, KeyError, TypeError):
            return f"holder unknown: {self.path} unreadable"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock; the file stays (no unlink race)
            self._fd = None


def lock_output_dir(directory: Path, is_main: bool) -> OutputDirLock:
    """Collective: rank 0 takes the lock; every rank raises `OutputDirInUse` if it could not."""
    lock = OutputDirLock(directory)
    message = [None]
    if is_main:
        try:
            lock.acquire()
        except OutputDirInUse as error:
            message = [str(error)]
    dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise OutputDirInUse(message[0])
    return lock


class ParentWatch:
    """Under torchrun, the pid of the agent that started us; `check()` raises once it has died
    (we were re-parented), so orphaned workers stop instead of training beside a relaunch."""

    def __init__(self):
        self.agent_pid = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None

    def check(self) -> None:
        if self.agent_pid is not None and os.getppid() != self.agent_pid:
            raise AgentDied(f"the torchrun agent (pid {self.agent_pid}) died; this worker exits so that a "
                            "relaunch does not share the output directory with it")


class Terminated(SystemExit):
    """SIGTERM/SIGINT turned into an exception, so `finally` blocks and the shutdown order run."""


@contextlib.contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """Within the block SIGTERM and SIGINT raise `Terminated(128 + signum)` in the main thread;
    the previous handlers come back afterwards. Outside the main thread: a no-op."""
    def handler(signum, frame):
        raise Terminated(128 + signum)

    try:
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
