"""Resumable shard writing: the one plan-and-records mechanism of every job that writes shards
(`kdkit shard`, the teacher pass, corrupted copies), so an interrupted job continues where it stopped.

    FOLDER/.kdkit-state[/JOB]/plan.json       the job's fingerprint and command (+ its own plan fields)
                              /<shard>.json    one record per finished shard: tar, idx, num_samples,
                                               bytes, sha256, fingerprint (+ the job's own fields)

A shard is done when its record exists, carries the job's fingerprint, and its tar has the recorded
size with its index beside it; done shards are never rewritten, unless their bytes no longer match
the record (`todo` checks them as readers do, kdkit.shards.checksums): a rerun writes again the
shards that are missing or damaged, from the job's input. Shards are written atomically
(tario.write_shard: temp file + rename). Staged jobs (a teacher pass --in-place) write a shard's new
tar and index under the state folder, save a *pending* record naming them, and only then rename
them over the old pair: the old shard stays valid until its rename, and a job killed between the two
renames (tar and index cannot be swapped as one) is rolled forward from the pending record by the
next `done` call, before anything reads that shard. The manifest is written last, by whoever finds
every shard done (`complete`).

Several processes may work on one job (torchrun ranks, `--part i/N` machines), each on its own
shards: nothing here touches another process's shards or temp files.

FOLDER may be a bucket prefix (kdkit.shards.location): then the plan and the records live in the bucket
too (machines writing parts of one set share no filesystem), each shard is built in this machine's
scratch and uploaded whole under its real name, and a shard counts as done only when the object has the
recorded size and carries the recorded sha256 (set when it was uploaded), so a rerun keeps exactly the
shards that were uploaded completely. "Renames" of staged shards are server-side copies.

Every writer holds the folder's lock (kdkit.locks, FOLDER/.kdkit-state/lock) from open_job until
close(): a second writer of the same shards is refused at once, naming the first; parts of one job
run side by side. The lock of a bucket prefix is a file in this machine's scratch for it: it keeps two
writers on one machine apart, not two machines (nothing locks an object store).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kdkit import atomic, locks
from kdkit.errors import KdkitError
from kdkit.shards import checksums, contract, tario
from kdkit.shards.location import BucketPath, abort_uploads, local_side, location, matches_checksum, replace

LOCK = "lock"  # FOLDER/.kdkit-state/lock: the folder's writer lock (kdkit.locks)


def fingerprint(identity: dict) -> str:
    """A short stable hash of what makes a job's bytes what they are (its options and its input)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class ShardJob:
    folder: Path | BucketPath  # where the finished shards live
    fingerprint: str  # what makes the bytes what they are; records of another fingerprint do not count
    state: Path | BucketPath  # FOLDER/.kdkit-state[/JOB]
    staged: bool = False  # in place: write under `state`, then swap over the old shard
    lock: locks.Lock | None = None  # the folder's writer lock, held until close()

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def record_path(self, tar_name: str) -> Path | BucketPath:
        return self.state / (Path(tar_name).stem + ".json")

    def done(self, tar_name: str) -> dict | None:
        """The shard's record if this job finished it (rolling a pending in-place swap forward)."""
        p = self.record_path(tar_name)
        if not p.exists():
            return None
        rec = json.loads(p.read_text())
        if rec.get("fingerprint") != self.fingerprint:
            return None
        if rec.get("pending"):
            for tmp, real in ((rec["tmp_tar"], rec["tar"]), (rec["tmp_idx"], rec["idx"])):
                if (self.state / tmp).exists():
                    replace(self.state / tmp, self.folder / real)
            for key in ("pending", "tmp_tar", "tmp_idx"):
                rec.pop(key)
            tario.atomic_write_json(p, rec)
        tar = self.folder / rec["tar"]
        if not tar.exists() or tar.stat().st_size != rec["bytes"] or not (self.folder / rec["idx"]).exists() \
                or not matches_checksum(tar, rec["sha256"]):
            return None
        return rec

    def write(self, tar_name: str, samples, extra: dict | None = None) -> dict:
        """Write one shard (an iterable of {"__key__", ext: bytes} samples) and record it as done."""
        idx_name = str(Path(tar_name).with_suffix(".idx"))
        target = (self.state if self.staged else self.folder) / tar_name
        info = tario.write_shard(target, samples)
        rec = {"tar": tar_name, "idx": idx_name, **info, "fingerprint": self.fingerprint, **(extra or {})}
        if not self.staged:
            tario.atomic_write_json(self.record_path(tar_name), rec)
            checksums.remember(target, rec["sha256"])  # hashed as written: readers need not hash it again
            return rec
        rec.update(pending=True, tmp_tar=target.name, tmp_idx=target.with_suffix(".idx").name)
        tario.atomic_write_json(self.record_path(tar_name), rec)  # from here on a crash is rolled forward
        done = self.done(tar_name)
        if done is None:
            raise KdkitError(f"{self.folder / tar_name}: replaced, but does not match its record; run the same "
                             "command again")
        checksums.remember(self.folder / tar_name, done["sha256"])
        return done

    def todo(self, tar_names: list[str], progress: bool = True) -> list[str]:
        """The shards of tar_names still to write: not done, or done but their bytes differ from the record
        (damaged since: written again from the job's input). A staged job's done shard is the only copy of
        its images, so a damaged one is refused instead."""
        done = {n: self.done(n) for n in tar_names}
        # an object in a bucket was checked by done() against the sha256 it was uploaded with (the store
        # keeps its own bytes intact); a local file is hashed as readers do
        local = not isinstance(self.folder, BucketPath)
        differ = checksums.changed({self.folder / n: r["sha256"] for n, r in done.items() if r is not None and local},
                                   progress, "checking the shards already written")
        if differ and self.staged:
            first = next(iter(differ))
            raise KdkitError(f"{first}: damaged since this job rewrote it in place (its bytes differ from the "
                             f"record in {self.state}), and it holds the only copy of its images; nothing was "
                             "changed. Do not delete it: restore it from a backup, or write the set again from its "
                             "source images into a new folder")
        return [n for n in tar_names if done[n] is None or self.folder / n in differ]

    def complete(self, tar_names: list[str]) -> list[dict] | None:
        """Every shard's record, once all are done (then the manifest can be written); else None."""
        records = [self.done(t) for t in tar_names]
        return None if any(r is None for r in records) else records

    def clear_temps(self, tar_names: list[str]) -> None:
        """Remove this process's leftover temp files (a killed run's), for the shards it is about to
        write: never a shard's real name, never another process's shard."""
        names = [n for name in tar_names for n in (name, str(Path(name).with_suffix(".idx")))]
        for base in {self.folder, self.state}:
            for name in names:
                for tmp in atomic.leftovers(base / name):  # this job holds the folder's lock: no live writer's
                    tmp.unlink(missing_ok=True)
            abort_uploads(base, names)


def open_job(folder: Path | BucketPath, fingerprint: str, command: str, what: str, job: str | None = None,
             staged: bool = False, finished: str | None = None, facts: dict | None = None,
             plan: Callable[[], dict] | None = None, part: tuple[int, int] = (0, 1)) -> tuple[ShardJob, dict]:
    """Open (or start) the job that writes `folder`; returns it with its plan.

    what: the job in words for errors ("shard set", "teacher pass"). job: its state sub-folder
    (None: the job that creates the folder). staged: in place (see the module doc). finished: the
    fingerprint of the finished result the folder holds (its manifest's), which a staged job may
    replace. facts: what the fingerprint stands for, in words a user knows (options, device), kept in
    the plan so that a refusal can say which of them differ. plan(): the job's own plan fields,
    computed once when the job starts.

    part: (i, N), this process's share of the shards (`--part`, torchrun ranks): parts of one job may
    write at once, a second writer of the same shards may not (kdkit.locks).

    Refused, with nothing touched: a folder another process is writing, a folder holding another job's
    unfinished shards, a finished result of other options (except in place), and a non-empty folder
    this job did not start. The returned job holds the folder's lock: close() it when done.
    """
    folder = location(folder)
    if not staged and not (folder / contract.STATE_DIR).exists():
        _refuse_foreign(folder)  # before the lock file is made in a folder that is not kdkit's
    lock = locks.hold(local_side(folder) / contract.STATE_DIR / LOCK, f"{folder} ({what})",
                      "wait for it to finish, or stop it first (what it finished is kept, and its rerun continues)",
                      part)
    try:
        job, current = _open(folder, fingerprint, command, what, job, staged, finished, facts, plan)
    except BaseException:
        lock.release()
        raise
    job.lock = lock
    return job, current


def _refuse_foreign(folder: Path | BucketPath) -> None:
    if folder.exists():
        leftovers = [p.name for p in folder.iterdir() if p.name != contract.STATE_DIR]
        if leftovers:
            raise KdkitError(f"{folder} is not empty and was not started by this command "
                             f"({', '.join(sorted(leftovers)[:3])}); nothing was overwritten. Use an empty or new "
                             "output folder")


def _open(folder: Path | BucketPath, fingerprint: str, command: str, what: str, job: str | None, staged: bool,
          finished: str | None, facts: dict | None, plan: Callable[[], dict] | None) -> tuple[ShardJob, dict]:
    state = folder / contract.STATE_DIR / job if job else folder / contract.STATE_DIR
    plan_path = state / contract.PLAN_FILE
    current = json.loads(plan_path.read_text()) if plan_path.exists() else None
    if current is not None and current.get("fingerprint") != fingerprint:
        done = finished is not None and finished == current.get("fingerprint")
        if not (staged and done):
            hint = "use another output folder" if done else "rerun that command to finish it, or " + (
                f"delete {state} to redo every shard with these options" if staged
                else "use another output folder (or delete this one to start over)")
            differ = [f"{k} {current[k]!r} then, {v!r} now" for k, v in (facts or {}).items()
                      if k in current and current[k] != v]
            raise KdkitError(f"{folder} holds a different {what} ({'finished' if done else 'unfinished'}, made by: "
                             f"{current.get('command') or 'unknown'}" + (f"; {', '.join(differ)}" if differ else "")
                             + f"); nothing was overwritten: {hint}")
        current = None  # a finished result is being replaced in place: its records no longer apply
        for old in state.glob("*.json"):
            old.unlink()
    if current is None and not staged:
        _refuse_foreign(folder)
    if current is None:
        current = {"fingerprint": fingerprint, "command": command, **(facts or {}), **(plan() if plan else {})}
        state.mkdir(parents=True, exist_ok=True)
        tario.atomic_write_json(plan_path, current)
    return ShardJob(folder, fingerprint, state, staged), current
