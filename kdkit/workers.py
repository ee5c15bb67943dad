"""Worker processes that prepare a writer's items (images to encode, views to corrupt) and hand the
results back in order; a worker that raises or dies ends the writer with one line, never a wait.

Why not multiprocessing.Pool: it replaces a worker that dies (killed, out of memory) and loses the
task it held, so `imap` / `map` wait forever for a result that never comes. concurrent.futures'
ProcessPoolExecutor notices a dead worker (BrokenProcessPool) and fails every pending result.
Workers are spawned, not forked: forking a process that runs DALI or torch threads is unsafe.
"""
from __future__ import annotations

import collections
import multiprocessing as mp
import signal
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from kdkit.errors import KdkitError


def ignore_ctrl_c() -> None:
    """In a worker: Ctrl-C is handled once, by the main process (which then stops the pool)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _Failed(Exception):
    """Raised in a worker: which item of its chunk failed, and how (picklable: plain args)."""


def _run_chunk(fn: Callable, items: list) -> list:
    out = []
    for i, item in enumerate(items):
        try:
            out.append(fn(item))
        except Exception as e:  # noqa: BLE001 - any failure of the item is reported with the item
            raise _Failed(i, f"{type(e).__name__}: {e}") from None
    return out


class WorkerPool:
    """`workers` spawned processes; `what` says what they do, for the one-line failure ("preparing images")."""

    def __init__(self, workers: int, what: str):
        self.what = what
        self._ex = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=ignore_ctrl_c)
        self._ahead = 4 * workers  # chunks in flight: results never pile up faster than the writer takes them

    def imap(self, fn: Callable, items: Iterable, chunksize: int = 1,
             describe: Callable[[object], str] = str) -> Iterator:
        """fn(item) for each item, in order, computed ahead in the workers (a top-level fn: it is pickled)."""
        pending: collections.deque = collections.deque()
        it = iter(items)

        def submit() -> bool:
            chunk = [x for _, x in zip(range(chunksize), it)]
            if chunk:
                pending.append((chunk, self._ex.submit(_run_chunk, fn, chunk)))
            return bool(chunk)

        chunk: list = []
        try:
            while len(pending) < self._ahead and submit():
                pass
            while pending:
                chunk, future = pending.popleft()
                yield from self._result(chunk, future, describe)
                submit()
        except BrokenProcessPool:  # noticed when submitting more work
            raise self._died(chunk, describe) from None

    def map(self, fn: Callable, items: list, chunksize: int = 1, describe: Callable[[object], str] = str) -> list:
        return list(self.imap(fn, items, chunksize, describe))

    def _result(self, chunk: list, future, describe) -> list:
        try:
            return future.result()
        except _Failed as e:
            i, why = e.args
            raise KdkitError(f"{describe(chunk[i])}: a worker process failed while {self.what} ({why}); "
                             "what was finished is kept, run the same command again to continue") from None
        except BrokenProcessPool:
            raise self._died(chunk, describe) from None

    def _died(self, chunk: list, describe) -> KdkitError:
        at = f" (at {describe(chunk[0])} or soon after)" if chunk else ""
        return KdkitError(f"a worker process died while {self.what}{at}: killed, or out of memory (see `dmesg`); "
                          "what was finished is kept, run the same command again to continue (fewer --workers "
                          "use less memory)")

    def close(self) -> None:
        """Stop: pending items are cancelled, each worker finishes the one it is on and exits. Not killed: a
        worker killed while it sends its result leaves half a message that the executor then waits for
        forever (seen here: the process hung at exit). No item waits on anything forever (prepare.read_file)."""
        self._ex.shutdown(wait=False, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
