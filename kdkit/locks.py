"""One writer per folder: the lock every kdkit command that writes a folder takes first (a training
run's folder, a shard set being written, a teacher pass's output, a corrupted-set folder,
an OpenVINO export).

    lock = locks.hold(folder / ".kdkit-lock", "training run in runs/r18", "give this run another --name")
    ...
    lock.release()          # or `with locks.hold(...):`; a process that dies releases it too

Why flock(2) on a lock file, and not a pid file or O_EXCL: the kernel holds the lock for the open file
and drops it when the process ends however it ends (kill -9, OOM killer, a power cut on the next
boot), so a lock left by a killed process never blocks its resume and nothing has to decide whether
a recorded pid is still alive (pids are reused, and on a shared file system they belong to other
hosts). On NFS, Linux maps flock to NFS byte-range locks, so it holds across machines too. The file
stays after release (removing it would race with a process that has just opened it); it holds the
current holder's pid, host, command and start time, which a refused writer names.

Parts: several processes may write disjoint shards of one set at once (`--part i/N`, the ranks of a
torchrun teacher pass). A part writer holds the folder's lock shared plus `LOCK-part-i-of-N`
exclusive; a whole-folder writer holds it exclusive. So parts run side by side, the same part twice
is refused, and a whole-set writer is refused while any part runs (and the other way round). Parts
with different N are not checked against each other.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import shlex
import socket
import sys
from pathlib import Path

from kdkit.errors import KdkitError


LOCK_TAG = ".kdkit-lock"


class Busy(KdkitError):
    """Another process holds the lock: the message names it (pid, host, command, since when)."""


def _holder() -> bytes:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
                       "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}).encode()


def _describe(path: Path) -> str:
    try:
        h = json.loads(path.read_text())
        return f"pid {h['pid']} on {h['host']}, `{h['command']}`, since {h['since']}"
    except (OSError, ValueError, KeyError, TypeError):  # a holder between its lock and its note
        return "a process that has not said who it is yet"


def _try(path: Path, mode: int) -> int | None:
    """An fd holding `path` locked in `mode`, or None when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # O_CLOEXEC (Python's default): spawned children never hold it
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


class Lock:
    def __init__(self, fds: list[int], noted: int | None):
        self._fds, self._noted = fds, noted

    def release(self) -> None:
        if self._noted is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._noted, 0)  # no stale note once released
        for fd in reversed(self._fds):
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
        self._fds, self._noted = [], None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def __del__(self):  # a lock dropped without release (an exception through its owner): freed all the same
        try:
            self.release()
        except Exception:  # noqa: BLE001 - at interpreter exit the modules may be gone; the kernel frees it then
            pass


def _note(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, _holder(), 0)


def part_file(path: Path, part: tuple[int, int]) -> Path:
    return path.with_name(f"{path.name}-part-{part[0]}-of-{part[1]}")


def hold(path: Path, what: str, hint: str, part: tuple[int, int] = (0, 1)) -> Lock:
    """Lock `path` (created, with its folder) for writing `what`, or raise Busy at once naming the holder
    and `hint` (what the user can do). part=(i, N) with N > 1: one part of a set written in parts."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    whole = part[1] <= 1
    fd = _try(path, fcntl.LOCK_EX if whole else fcntl.LOCK_SH)
    if fd is None:
        holders = [_describe(p) for p in sorted(path.parent.glob(f"{path.name}-part-*")) if _held(p)] if whole else []
        who = "; ".join(holders) if holders else _describe(path)
        raise Busy(f"{what} is being written by another process ({who}); nothing was changed: {hint}")
    if whole:
        _note(fd)
        return Lock([fd], fd)
    mine = part_file(path, part)
    part_fd = _try(mine, fcntl.LOCK_EX)
    if part_fd is None:
        os.close(fd)
        raise Busy(f"{what}, part {part[0]}/{part[1]}, is being written by another process ({_describe(mine)}); "
                   f"nothing was changed: {hint}")
    _note(part_fd)
    return Lock([fd, part_fd], part_fd)


def beside(folder: Path, what: str, hint: str) -> Lock:
    """The lock of a folder that is replaced or created whole (a run folder, an export swapped in at its
    end): `.NAME.kdkit-lock` beside it, so a writer refused before it starts leaves no folder behind and
    the lock outlives the swap."""
    folder = Path(folder)
    return hold(folder.with_name(f".{folder.name}{LOCK_TAG}"), what, hint)


def _held(path: Path) -> bool:
    fd = _try(path, fcntl.LOCK_SH)
    if fd is None:
        return True
    os.close(fd)  # closing drops the probe's lock
    return False
