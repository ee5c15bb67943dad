"""Where a teacher pass writes, and how it survives being interrupted.

Two destinations, one mechanism:
  new set   --out: each finished shard is written to its real name in the new folder (atomically,
            tario.write_shard), then recorded; the input is never touched.
  in place  --in-place: a shard's new tar and index are written complete under the state folder,
            a *pending* record naming them is saved, and only then are they renamed over the old
            pair. The old shard stays valid until its rename; a run killed between the two renames
            (tar and index cannot be swapped as one) is rolled forward by the next run from the
            pending record, before anything reads that shard.
The state lives in DEST/.kdkit-state/teacher/: plan.json (the pass's fingerprint and command) and
one record per finished shard, which is what resume and "already done" read. The manifest is
rewritten last, from the records, once every shard of the set has one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from kdkit.errors import KdkitError
from kdkit.shards import contract, tario

STATE_SUBDIR = "teacher"


@dataclass
class Destination:
    source: Path  # the set read
    folder: Path  # the set written (== source in place)
    in_place: bool
    fingerprint: str

    @property
    def state(self) -> Path:
        return self.folder / contract.STATE_DIR / STATE_SUBDIR

    def record_path(self, tar_name: str) -> Path:
        return self.state / (Path(tar_name).stem + ".json")


def teacher_fingerprint(folder: Path) -> str | None:
    try:
        man = json.loads((folder / contract.MANIFEST).read_text())
        return (man.get("teacher") or {}).get("fingerprint")
    except (OSError, ValueError):
        return None


def open_destination(source: Path, folder: Path, in_place: bool, fingerprint: str, command: str) -> Destination:
    """Check the destination belongs to this pass (or is new), and note the plan there."""
    dest = Destination(Path(source), Path(folder), in_place, fingerprint)
    plan_path = dest.state / contract.PLAN_FILE
    plan = json.loads(plan_path.read_text()) if plan_path.exists() else None
    if plan is not None and plan["fingerprint"] != fingerprint:
        finished = teacher_fingerprint(dest.folder) == plan["fingerprint"]
        if not (in_place and finished):
            what = "the result of a" if finished else "an unfinished"
            raise KdkitError(
                f"{dest.folder} holds {what} teacher pass with other options (started by: "
                f"{plan.get('command') or 'unknown'}); "
                + ("use another --out folder" if finished else "rerun that command to finish it, "
                   + (f"or delete {dest.state} to redo every shard with these options" if in_place
                      else "or use another --out folder")))
        plan = None  # a finished pass is being replaced by a new one: its records no longer apply
    if plan is None and not in_place and dest.folder.exists():
        leftovers = [p.name for p in dest.folder.iterdir() if p.name != contract.STATE_DIR]
        if leftovers:
            raise KdkitError(f"{dest.folder} is not empty and was not started by this pass "
                             f"({', '.join(sorted(leftovers)[:3])}); nothing was overwritten. Use a new --out folder")
    dest.state.mkdir(parents=True, exist_ok=True)
    for old in dest.state.glob("*.json"):  # records of another (finished) pass: safe to drop, idempotent
        if old.name != contract.PLAN_FILE and json.loads(old.read_text()).get("fingerprint") != fingerprint:
            old.unlink(missing_ok=True)
    if plan is None:
        tario.atomic_write_json(plan_path, {"fingerprint": fingerprint, "command": command})
    # no sweep of temp files here: another rank may be writing its own; a shard's leftovers are
    # overwritten when that shard is redone, which it will be, having no record
    return dest


def shard_done(dest: Destination, tar_name: str) -> dict | None:
    """The shard's record if it was finished by this pass; rolls a pending in-place swap forward."""
    p = dest.record_path(tar_name)
    if not p.exists():
        return None
    rec = json.loads(p.read_text())
    if rec.get("fingerprint") != dest.fingerprint:
        return None
    if rec.get("pending"):
        for tmp, real in ((rec["tmp_tar"], rec["tar"]), (rec["tmp_idx"], rec["idx"])):
            if (dest.state / tmp).exists():
                os.replace(dest.state / tmp, dest.folder / real)
        rec.pop("pending"), rec.pop("tmp_tar"), rec.pop("tmp_idx")
        tario.atomic_write_json(p, rec)
    tar = dest.folder / rec["tar"]
    if not tar.exists() or tar.stat().st_size != rec["bytes"] or not (dest.folder / rec["idx"]).exists():
        return None
    return rec


def write_shard(dest: Destination, record: contract.ShardRecord, samples, extra: dict) -> dict:
    """Write one shard's new samples to the destination atomically and record it as done."""
    tar_name, idx_name = record.tar, record.idx
    rec_path = dest.record_path(tar_name)
    target = dest.folder / tar_name if not dest.in_place else dest.state / tar_name  # index beside it
    try:
        info = tario.write_shard(target, samples)
    except BaseException:
        target.with_name(target.name + tario.TMP_SUFFIX).unlink(missing_ok=True)  # only this shard's
        raise
    if not dest.in_place:
        rec = {"tar": tar_name, "idx": idx_name, **info, "fingerprint": dest.fingerprint, **extra}
        tario.atomic_write_json(rec_path, rec)
        return rec
    tmp_tar = target
    rec = {"tar": tar_name, "idx": idx_name, **info, "fingerprint": dest.fingerprint, **extra,
           "pending": True, "tmp_tar": tmp_tar.name, "tmp_idx": tmp_tar.with_suffix(".idx").name}
    tario.atomic_write_json(rec_path, rec)  # from here on, a crash is rolled forward by shard_done
    done = shard_done(dest, tar_name)
    if done is None:
        raise KdkitError(f"{dest.folder / tar_name}: replaced, but does not match its record; "
                         "run the same command again")
    return done


def complete_records(dest: Destination, man: contract.Manifest) -> list[dict] | None:
    records = [shard_done(dest, s.tar) for s in man.shards]
    return None if any(r is None for r in records) else records


def write_manifest(dest: Destination, man: contract.Manifest, records: list[dict], teacher: dict) -> contract.Manifest:
    """The manifest of the finished set: same samples, new shard sizes/checksums, the teacher block."""
    shards = [contract.ShardRecord(s.tar, s.idx, r["num_samples"], r["bytes"], r["sha256"], s.skipped)
              for s, r in zip(man.shards, records)]
    for s, r in zip(man.shards, records):
        if r["num_samples"] != s.num_samples:
            raise KdkitError(f"{dest.folder / s.tar}: {r['num_samples']} samples written, the input manifest "
                             f"says {s.num_samples}; the input changed during the pass, run it again")
    new = dataclasses.replace(man, shards=shards, teacher=teacher)
    if not dest.in_place:
        report = dest.source / contract.SKIP_REPORT
        if report.exists():
            shutil.copyfile(report, dest.folder / contract.SKIP_REPORT)
    tario.atomic_write_json(dest.folder / contract.MANIFEST, new.to_json())
    return new
