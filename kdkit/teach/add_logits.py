"""`kdkit add-teacher-logits`: run a teacher once over a shard set and store its outputs per sample.

    for each split, for each shard this process owns (index % world == rank) not yet done:
        read the tar's samples            (tario: keys, labels, original members)
        teacher outputs for its views     (compute.run_shards: DALI eval / teacher_views pipelines)
          - or the rows of an HDF5 file   (h5.H5Outputs: joined by key, checked before any work)
        write the tar again: original members unchanged + the teacher members
    when every shard of a set is done: its manifest, with the teacher block, is written last.

Where it writes and how it resumes is kdkit.shards.resume's job (the mechanism every shard writer
shares; input and output may be local folders or bucket prefixes): a new set (--out; the input is
never touched), or each shard replaced in place, staged under DEST/.kdkit-state/teacher/ and swapped
in atomically (--in-place). Under torchrun the ranks
join one process group (kdkit.runtime): each rank computes its own shards, rank 0 writes the plan
and, once every shard is done, the manifest; the set equals the one a single process writes.

Everything that can refuse the run (checkpoint, class count, HDF5 keys, destination) is checked
before the first image is decoded.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from kdkit import __version__, runtime
from kdkit.errors import KdkitError
from kdkit.shards import checksums, contract, tario
from kdkit.shards.location import copy_file, location
from kdkit.shards.resume import ShardJob, fingerprint, open_job
from kdkit.shards.verify import find_sets, load_manifest
from kdkit.teach import members as mem
from kdkit.teach.compute import cpu_threads
from kdkit.teach.config import TeacherPassConfig

STATE_JOB = "teacher"  # the pass's state folder: DEST/.kdkit-state/teacher/
# how long a rank may wait at a barrier for the others (NCCL's default, 10 minutes, kills the job): the
# ranks' remaining shards are balanced, but a shard of a big teacher with many views takes minutes
BARRIER_TIMEOUT_S = 4 * 3600
WRITES_AHEAD = 2  # shards computed and waiting for the background writer (bounded: their outputs are in memory)


@dataclass
class SplitReport:
    split: str
    folder: Path
    samples: int  # in the set
    written: int  # shards written by this process in this run
    kept: int  # shards of this process found done and kept
    images_per_s: float | None
    complete: bool  # manifest written (every shard of the set done)
    payload_bytes_per_sample: float | None = None  # bytes of the packed teacher member per sample
    bytes_per_sample: float | None = None  # the same with tar headers and padding
    share_of_set: float | None = None  # teacher bytes / bytes of the whole set after the pass
    source: str = ""  # where the outputs came from: the teachers and the weights used, or the HDF5 file


def select_sets(path: Path, splits: list[str] | None) -> tuple[list[tuple[str, Path]], bool]:
    """[(split, set folder)] to process, and whether `path` was a dataset root (vs a set folder)."""
    path = location(path)
    folders = find_sets(path)
    is_root = folders != [path]
    found = [(load_manifest(f).split, f) for f in folders]
    if splits:
        unknown = sorted(set(splits) - {s for s, _ in found})
        if unknown:
            raise KdkitError(f"{path}: no shard set for split(s) {', '.join(unknown)} "
                             f"(found: {', '.join(s for s, _ in found)})")
        found = [(s, f) for s, f in found if s in splits]
    return found, is_root


def parts(cfg: TeacherPassConfig, rt: runtime.Runtime) -> tuple[int, int]:
    """(rank, world) of this process's part: the config's (parts run by hand), else torchrun's."""
    rank = cfg.rank if cfg.rank is not None else rt.rank
    world = cfg.world if cfg.world is not None else rt.world
    if not 0 <= rank < world:
        raise KdkitError(f"rank {rank} outside 0..{world - 1}")
    return rank, world


def my_shards(num_shards: int, rank: int, world: int) -> list[int]:
    """Whole shards per rank, interleaved, so ranks finish at about the same time."""
    return [i for i in range(num_shards) if i % world == rank]


def my_work(pending: list[int], num_shards: int, rank: int, world: int, balanced: bool) -> list[int]:
    """The shards this part computes of those not done yet. Ranks of one process group (`balanced`)
    share the pending shards evenly, so a resumed pass keeps every rank busy instead of leaving the
    ranks whose shards are done to wait at the barrier; parts run by hand (--part) own a fixed share."""
    if balanced:
        return pending[rank::world]
    mine = set(my_shards(num_shards, rank, world))
    return [i for i in pending if i in mine]


class BackgroundWriter:
    """Shards written on one thread beside the teacher: the GPU computes shard n + 1 while shard n's tar is
    read, joined, encoded and written. At most WRITES_AHEAD shards wait; a failed write is raised at the
    next submit (or at close), and close() waits for every submitted shard, so what was computed before
    an error or an interruption is on disk and recorded as done."""

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(1, thread_name_prefix="kdkit-teacher-writer")
        self.pending: list = []

    def submit(self, fn, *args) -> None:
        self.pending.append(self.pool.submit(fn, *args))
        while self.pending and (self.pending[0].done() or len(self.pending) > WRITES_AHEAD):
            self.pending.pop(0).result()

    def close(self, quiet: bool = False) -> None:
        """Wait for every submitted shard; raise the first failure, or (quiet: an error is already on its
        way out) none, so the error the user sees is the first one, not a later shard's."""
        try:
            for f in self.pending:
                f.exception() if quiet else f.result()
        finally:
            self.pool.shutdown(wait=True)


class _Source:
    """Where outputs come from: teachers run here, an HDF5 file, or the set's own outputs in the layout
    before the packed member (--repack). `identity` feeds the fingerprint."""

    def __init__(self, cfg: TeacherPassConfig, sets: list[tuple[str, Path]], classes, rt: runtime.Runtime):
        self.cfg, self.rt, self.h5, self.groups, self.repack = cfg, rt, None, {}, {}
        self.num_classes = len(classes)
        if cfg.repack:
            for split, folder in sets:
                block = load_manifest(folder).teacher
                if not contract.is_legacy_teacher(block):
                    raise KdkitError(f"{folder}: " + ("holds no teacher outputs to repack" if not block else
                                                      "already holds the packed .teacher member; nothing to repack"))
                self.repack[split] = block
            self.identity = {"repack": {split: b.get("fingerprint") for split, b in self.repack.items()}}
            return
        if cfg.teachers:
            from kdkit.teach.teachers import load_teachers

            self.ensemble, self.teachers, self.size, self.ratio = load_teachers(
                cfg.teachers, classes, cfg.image_size, cfg.crop_ratio, str(cfg.shards))
            self.ensemble.to(rt.device)
            if rt.device.type == "cuda":  # DALI hands over NHWC memory (layout "channels_last"): keep it
                self.ensemble.to(memory_format=torch.channels_last)
            self.transform = cfg.view_transform(self.size, self.ratio)
            # the checkpoint's path is not part of the identity (its hash is): a moved file is the same teacher
            records = [{k: v for k, v in t.record.items() if k != "checkpoint"} for t in self.teachers]
            # the device and AMP are part of it: CPU and GPU decoders, and fp16, differ in the last bits, and
            # one set must not mix logits of both kinds (a pass resumed elsewhere is refused, naming both)
            self.identity = {"teachers": records, "transform": self.transform, "topk": cfg.topk, "dtype": "float16",
                             "device": rt.dali_device, "amp": cfg.amp and rt.device.type == "cuda"}
            return
        from kdkit.shards.reader import ShardSet, scan_shards

        from kdkit.teach.h5 import H5Outputs

        self.h5 = H5Outputs(cfg.import_h5)
        for split, folder in sets:
            man = load_manifest(folder)
            g = self.h5.group(split, single_split=len(sets) == 1)
            scan = scan_shards(ShardSet([folder / s.tar for s in man.shards]), [contract.IMAGE_EXT])
            self.h5.check(split, g, [k for keys in scan.keys for k in keys], len(man.classes), cfg.topk)
            self.groups[split] = g
        self.identity = {"import_sha256": self.h5.sha256, "topk": cfg.topk, "dtype": "float16"}

    def outputs(self, split: str, src: Path, shards: list[tuple[int, contract.ShardRecord]], bar):
        """(shard index, join) for each shard, as its outputs are ready: join() reads the tar and returns
        (its samples, {key: teacher members}); the background writer calls it."""
        if self.repack:
            for index, samples, out in self._repacked(split, src, shards, bar):
                yield index, lambda s=samples, o=out: (s, o)
            return
        if self.h5 is not None:
            for index, rec in shards:
                samples = list(tario.iter_tar_samples(src / rec.tar))
                bar.update(len(samples))
                members = self.h5.members(split, self.groups[split], samples, self.cfg.topk, self.num_classes)
                yield index, lambda s=samples, m=members: (s, m)
            return
        from kdkit.teach.compute import run_shards

        from kdkit.pipelines.options import Transform

        t = self.teachers[0].info
        tars = {index: src / rec.tar for index, rec in shards}
        view = Transform(self.size, self.ratio, tuple(t.mean), tuple(t.std))  # the first teacher's normalisation
        for index, res in run_shards(list(tars.items()), self.ensemble, self.cfg, self.rt, view,
                                     on_images=bar.update, checksums={src / rec.tar: rec.sha256 for _, rec in shards}):
            yield index, lambda tar=tars[index], res=res: self.join(tar, res)

    def join(self, tar: Path, res) -> tuple[list, dict]:
        """The tar's samples and, by key, the teacher members of its outputs (checked to be the tar's)."""
        samples = list(tario.iter_tar_samples(tar))
        keys = [k for k, _ in samples]
        labels = [contract.decode_label(m[contract.LABEL_EXT]) for _, m in samples]
        if res.keys != keys:
            raise KdkitError(f"{tar}: DALI's index lists the samples in another order than the tar; "
                             "rewrite it with `kdkit verify --fix-index`")
        if res.labels != labels:
            first = next((i for i, (a, b) in enumerate(zip(res.labels, labels)) if a != b), len(labels))
            raise KdkitError(f"{tar}: the pipeline's sample {first} does not match the tar's (label or count "
                             "differs); its outputs cannot be joined by key")
        with np.errstate(over="ignore"):  # float16 overflow: refused with the sample named (refuse_nonfinite)
            return samples, {k: mem.encode(res.logits[i], None if res.boxes is None else res.boxes[i], self.cfg.topk)
                             for i, k in enumerate(keys)}

    def _repacked(self, split: str, src: Path, shards, bar):
        from kdkit.shards.images import decoded_size

        classes = int(self.repack[split]["num_classes"])
        for index, rec in shards:
            samples = list(tario.iter_tar_samples(src / rec.tar))
            out = {}
            for key, m in samples:
                if not set(m) & set(contract.LEGACY_TEACHER_EXTS):
                    raise KdkitError(f"{src / rec.tar}: sample {key} has no teacher outputs to repack; check the set "
                                     "with `kdkit verify`")
                size = decoded_size(m[contract.IMAGE_EXT]) if contract.LEGACY_VIEWS_EXT in m else None
                out[key] = mem.legacy_to_packed(m, classes, size)
            bar.update(len(samples))
            yield index, samples, out

    def describe(self) -> str:
        if self.repack:
            return "teacher outputs of the set itself, repacked into one .teacher member per sample"
        if self.h5 is not None:
            return f"teacher outputs from {self.h5.path}"
        return "teacher " + " + ".join(f"{t.info.source} ({t.info.model}, {t.info.weights} weights)"
                                       for t in self.teachers)

    def block(self, split: str, fp: str, num_classes: int) -> dict:
        cfg = self.cfg
        block = self._block(split, fp, num_classes)
        layout = contract.teacher_layout(num_classes, block["topk"], block["views"])
        return {**block, "members": mem.member_names(), "layout": mem.layout_json(layout)}

    def _block(self, split: str, fp: str, num_classes: int) -> dict:
        cfg = self.cfg
        common = {"fingerprint": fp, "num_classes": num_classes, "dtype": "float16", "topk": cfg.topk,
                  "command": cfg.command, "in_place": cfg.in_place, "kdkit_version": __version__}
        if self.repack:
            old = self.repack[split]
            return {**{k: v for k, v in old.items() if k not in ("storage", "members")}, **common,
                    "topk": old.get("topk"), "views": old.get("views"),
                    "repacked": {"fingerprint": old.get("fingerprint"), "command": old.get("command")}}
        if self.h5 is None:
            return {**common, "source": "computed", "model": "+".join(t.info.model for t in self.teachers),
                    "checkpoint_sha256": "+".join(t.record["checkpoint_sha256"] for t in self.teachers),
                    "teachers": [t.record for t in self.teachers], "combine": self.ensemble.combine,
                    "views": cfg.views, "transform": self.transform,
                    **({"topk_values": mem.TOPK_VALUES} if cfg.topk else {}),
                    "device": self.rt.dali_device, "amp": cfg.amp and self.rt.device.type == "cuda"}
        g, theirs = self.groups[split], self.h5.teacher_block(self.groups[split])
        views = g["views"].shape[1] if "views" in g else None
        topk = cfg.topk or (g["topk_logits"].shape[-1] if "logits" not in g else None)
        # top-k computed here from the file's full logits are log-probabilities; the file's own top-k are what
        # its teacher block says they are
        values = mem.TOPK_VALUES if cfg.topk and "logits" in g else theirs.get("topk_values")
        return {**{k: v for k, v in theirs.items() if k not in ("storage", "fingerprint", "topk_values", "members",
                                                                "layout")}, **common,
                **({"topk_values": values} if topk and values else {}), "topk": topk, "views": views,
                "source": {"import_h5": str(self.h5.path), "sha256": self.h5.sha256}}


def _write_shard(job: ShardJob, rec: contract.ShardRecord, join, source: str,
                 layout: tuple[contract.TeacherPart, ...]) -> dict:
    """The background writer's work for one shard: join its outputs to its samples, write it."""
    samples, outputs = join()
    return _process_shard(job, rec, samples, outputs, source, layout)


def _process_shard(job: ShardJob, rec: contract.ShardRecord, samples: list, outputs: dict, source: str,
                   layout: tuple[contract.TeacherPart, ...]) -> dict:
    """Write one shard again: its own members unchanged, plus the teacher members, and record it."""
    refuse_nonfinite(job.folder / rec.tar, [k for k, _ in samples], outputs, source, layout)
    payload = in_tar = 0
    for key, _ in samples:
        p, b = mem.added_bytes(key, outputs[key])
        payload, in_tar = payload + p, in_tar + b
    new = ({"__key__": k, **mem.without_teacher(m), **outputs[k]} for k, m in samples)
    return job.write(rec.tar, new, {"teacher_payload": payload, "teacher_bytes": in_tar})


def refuse_nonfinite(tar: Path, keys: list[str], outputs: dict, source: str,
                     layout: tuple[contract.TeacherPart, ...]) -> None:
    """Refuse teacher outputs that are not finite, as they would be stored (float16), naming the first sample:
    a diverged teacher (NaN weights), or logits beyond float16's range (|x| > 65504 is stored as inf). A
    student trained on them dies at its first step, far from the cause."""
    for key in keys:
        for ext, a in mem.unpack(outputs[key][contract.TEACHER_EXT], layout).items():
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                what = ("NaN (a diverged teacher, or damaged weights?)" if np.isnan(a).any() else
                        "infinite: beyond float16's range (|x| > 65504), far larger than a trained classifier's "
                        "outputs (a diverged or rescaled teacher?)")
                raise KdkitError(f"{tar}: sample {key}: the teacher outputs ({ext} in .{contract.TEACHER_EXT}) are {what}; nothing was written "
                                 f"for this shard. Check the teacher ({source}), e.g. with `kdkit eval`")


def _storage(records: list[dict], samples: int) -> dict:
    total = sum(r["bytes"] for r in records)
    added = sum(r["teacher_bytes"] for r in records)
    return {"payload_bytes_per_sample": sum(r["teacher_payload"] for r in records) / max(samples, 1),
            "bytes_per_sample": added / max(samples, 1), "share_of_set": added / max(total, 1), "set_bytes": total}


def add_teacher_logits(cfg: TeacherPassConfig) -> list[SplitReport]:
    """Run the pass described by cfg (see the module docstring); one report per split. Under torchrun,
    one process per rank, in one process group."""
    cfg.check()
    with (runtime.start(cfg.device, announce="kdkit add-teacher-logits", timeout=BARRIER_TIMEOUT_S) as rt,
          contextlib.ExitStack() as held):
        return _run(cfg, rt, held)


def _run(cfg: TeacherPassConfig, rt: runtime.Runtime, held: contextlib.ExitStack) -> list[SplitReport]:
    cfg = dataclasses.replace(cfg, threads=runtime.dali_threads(cfg.threads, rt.dali_device == "gpu",
                                                                min(8, runtime.cores())))
    sets, is_root = select_sets(cfg.shards, cfg.splits)
    rank, world = parts(cfg, rt)
    if not (cfg.teachers or cfg.import_h5 or cfg.repack):  # export only: one writer of the file
        if rank == 0:
            n = export_h5(sets, cfg.export_h5)
            print(f"{cfg.export_h5}: teacher outputs of {n} samples exported", file=sys.stderr)
        return []
    mans = {split: load_manifest(folder) for split, folder in sets}
    if len({tuple(c.id for c in m.classes) for m in mans.values()}) != 1:
        raise KdkitError(f"{cfg.shards}: the splits have different classes; run them one at a time (--split)")
    classes = next(iter(mans.values())).classes
    num_classes = len(classes)
    if cfg.topk is not None and cfg.topk >= num_classes:
        raise KdkitError(f"--topk {cfg.topk}: the set has {num_classes} classes, so top-{cfg.topk} would store them "
                         "all; leave --topk out (full logits) or give k < the class count")
    source = _Source(cfg, sets, classes, rt)
    fp = fingerprint(source.identity)
    reports, done_sets = [], []
    for split, folder in sets:
        man = mans[split]
        out = folder if cfg.in_place else (location(cfg.out) / split if is_root else location(cfg.out))
        # rank 0 checks the destination and writes the plan; the others then find it. Each rank holds the
        # lock of its own part of the output (kdkit.locks): a second pass into it is refused at once
        job = None
        if rt.is_main:
            job = _open(out, fp, cfg, source, (rank, world))
        rt.barrier()
        job = held.enter_context(job or _open(out, fp, cfg, source, (rank, world)))
        mine = my_shards(len(man.shards), rank, world)
        finished = teacher_fingerprint(out) == fp
        # ranks of one group share what is left of an unfinished split (my_work); each checks its own part of
        # a finished one. Every rank reads the records before any rank adds one, so they agree on `pending`
        balanced = rt.distributed and cfg.rank is None and not finished
        pending = _todo(job, out, man, list(range(len(man.shards))) if balanced else mine, finished, cfg.progress)
        rt.barrier()
        todo = my_work(pending, len(man.shards), rank, world, balanced)
        if cfg.in_place:  # a missing shard, or a damaged one of the finished set, was the only copy of its images
            _refuse_lost(folder, man, [i for i in todo if finished or not (folder / man.shards[i].tar).exists()])
        if not pending and finished:
            print(f"{split}: {out} already holds the outputs of this teacher pass, every shard present and intact; "
                  "nothing to do", file=sys.stderr)
            reports.append(_report(split, out, load_manifest(out), 0, len(mine), None))
            done_sets.append((split, out))
            continue
        job.clear_temps([man.shards[i].tar for i in todo])
        bar = tqdm(total=sum(man.shards[i].num_samples for i in todo), unit="img", desc=f"teacher {split}",
                   disable=not cfg.progress, smoothing=0.1)
        t0 = time.perf_counter()
        layout = contract.block_layout(source.block(split, fp, num_classes), num_classes)
        writer = BackgroundWriter()
        try:
            with cpu_threads(cfg, rt):
                for i, join in source.outputs(split, folder, [(i, man.shards[i]) for i in todo], bar):
                    bar.set_postfix_str(man.shards[i].tar)
                    writer.submit(_write_shard, job, man.shards[i], join, source.describe(), layout)
        except BaseException:
            try:
                writer.close(quiet=True)  # what was computed is written; the first error is the one raised
            finally:
                bar.close()
            raise
        try:
            writer.close()
        finally:
            bar.close()
        elapsed = time.perf_counter() - t0
        rate = sum(man.shards[i].num_samples for i in todo) / elapsed if todo and elapsed > 0 else None
        rt.barrier()
        new_man = None
        if rt.is_main:
            records = job.complete([s.tar for s in man.shards])
            if records is not None:
                new_man = write_manifest(job, folder, man, records, {**source.block(split, fp, num_classes),
                                                                     "storage": _storage(records, man.num_samples)})
                if is_root and not cfg.in_place:
                    from kdkit.shards.writer import write_timm_info

                    write_timm_info(location(cfg.out))
                done_sets.append((split, out))
            elif finished:  # shards written again into a finished set whose records are gone
                new_man = patch_manifest(job, load_manifest(out))
                done_sets.append((split, out))
            else:
                print(f"{split}: part {rank}/{world} done; other parts still have shards to write "
                      "(the last one to finish writes the manifest)", file=sys.stderr)
        reports.append(_report(split, out, new_man, len(todo), len([i for i in mine if i not in pending]), rate))
    for r in reports:
        r.source = source.describe()
    rt.barrier()
    if source.h5 is not None:
        source.h5.close()
    if cfg.export_h5 and rank == 0 and len(done_sets) == len(sets):
        n = export_h5(done_sets, cfg.export_h5)
        print(f"{cfg.export_h5}: teacher outputs of {n} samples exported", file=sys.stderr)
    return reports


def _open(out: Path, fp: str, cfg: TeacherPassConfig, source: _Source, part: tuple[int, int]) -> ShardJob:
    # device and AMP are in the fingerprint (one set must not mix CPU and GPU logits): named when they differ
    facts = {k: source.identity.get(k) for k in ("device", "amp")}
    job, _ = open_job(out, fp, cfg.command, "teacher pass", job=STATE_JOB, staged=cfg.in_place,
                      finished=teacher_fingerprint(out), facts=facts, part=part)
    return job


def _todo(job: ShardJob, out: Path, man: contract.Manifest, mine: list[int], finished: bool,
          progress: bool) -> list[int]:
    """This process's shards still to write. A shard deleted or damaged since it was written is written
    again, never trusted: a finished set is checked against its manifest (its job records may be gone),
    an unfinished one against the job's records (kdkit.shards.resume)."""
    tars = [man.shards[i].tar for i in mine]
    if finished:
        want = {out / s.tar: s.sha256 for s in load_manifest(out).shards if s.tar in tars and (out / s.tar).exists()}
        differ = checksums.changed(want, progress, "checking the shards already written")
        redo = {t for t in tars if out / t not in want or out / t in differ}
    else:
        redo = set(job.todo(tars, progress))
    return [i for i in mine if man.shards[i].tar in redo]


def _refuse_lost(folder: Path, man: contract.Manifest, lost: list[int]) -> None:
    """An in-place set's shard that is missing or damaged held the only copy of its images: nothing can
    write it again from here."""
    if lost:
        tar = folder / man.shards[lost[0]].tar
        more = f" (and {len(lost) - 1} more)" if len(lost) > 1 else ""
        source = f" (`{man.command}`, into a new folder)" if man.command else ""
        damaged = tar.exists()
        raise KdkitError(f"{tar}{more}: {'damaged' if damaged else 'missing'}, and this set was rewritten in place, so "
                         "that shard holds the only copy of its images; nothing was changed. "
                         + ("Do not delete it: restore" if damaged else "Restore")
                         + f" it from a backup, or write the set again from its source images{source} and run the "
                         "teacher pass on that")


def patch_manifest(job: ShardJob, man: contract.Manifest) -> contract.Manifest:
    """A finished set's manifest with the sizes and checksums of the shards this job wrote again (the
    others were checked against it: _todo)."""
    shards = []
    for s in man.shards:
        rec = job.done(s.tar)
        shards.append(dataclasses.replace(s, bytes=rec["bytes"], sha256=rec["sha256"]) if rec else s)
    new = dataclasses.replace(man, shards=shards)
    tario.atomic_write_json(job.folder / contract.MANIFEST, new.to_json())
    return new


def teacher_fingerprint(folder: Path) -> str | None:
    """The fingerprint of the teacher pass whose outputs a finished set holds (its manifest's)."""
    try:
        man = json.loads((folder / contract.MANIFEST).read_text())
        return (man.get("teacher") or {}).get("fingerprint")
    except (OSError, ValueError):
        return None


def write_manifest(job: ShardJob, source: Path, man: contract.Manifest, records: list[dict],
                   teacher: dict) -> contract.Manifest:
    """The manifest of the finished set: same samples, new shard sizes/checksums, the teacher block."""
    for s, r in zip(man.shards, records):
        if r["num_samples"] != s.num_samples:
            raise KdkitError(f"{job.folder / s.tar}: {r['num_samples']} samples written, the input manifest "
                             f"says {s.num_samples}; the input changed during the pass, run it again")
    shards = [contract.ShardRecord(s.tar, s.idx, r["num_samples"], r["bytes"], r["sha256"], s.skipped)
              for s, r in zip(man.shards, records)]
    new = dataclasses.replace(man, shards=shards, teacher=teacher)
    if not job.staged and (source / contract.SKIP_REPORT).exists():
        copy_file(source / contract.SKIP_REPORT, job.folder / contract.SKIP_REPORT)
    tario.atomic_write_json(job.folder / contract.MANIFEST, new.to_json())
    return new


def export_h5(sets, path):
    from kdkit.teach.h5 import export_h5 as export

    return export(sets, Path(path))


def _report(split, folder, man, written, kept, rate) -> SplitReport:
    rep = SplitReport(split, folder, man.num_samples if man else 0, written, kept, rate, man is not None)
    if man is not None:
        st = man.teacher.get("storage", {})
        rep.payload_bytes_per_sample = st.get("payload_bytes_per_sample")
        rep.bytes_per_sample, rep.share_of_set = st.get("bytes_per_sample"), st.get("share_of_set")
    return rep


def format_report(reports: list[SplitReport]) -> str:
    """Which teacher (and weights) on the first line, then a line per split."""
    lines = [reports[0].source] if reports and reports[0].source else []
    for r in reports:
        speed = f", {r.images_per_s:.0f} img/s" if r.images_per_s else ""
        head = f"{r.split}: {r.written} shards written, {r.kept} kept{speed}"
        if r.complete and r.bytes_per_sample is not None:
            head += (f"; {r.folder}: {r.samples} samples, teacher outputs add {r.bytes_per_sample:.0f} bytes/sample "
                     f"in the tars ({r.payload_bytes_per_sample:.0f} in the packed member), {100 * r.share_of_set:.1f}% of the set")
        lines.append(head)
    return "\n".join(lines)
