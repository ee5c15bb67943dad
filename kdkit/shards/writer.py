"""Write a listed dataset (SourceDataset) as kdkit shard sets: one folder per split.

The flow per split:
  order   all samples sorted by key, then shuffled with the seed: classes interleave across shards
          and the order does not depend on how the file system lists folders;
  plan    fixed samples per shard (given, or estimated once from the first images and stored), so
          shard i always holds the same samples: that is what makes `--part i/N`, resume, and
          "identical to an uninterrupted run" possible;
  write   images prepared in worker processes, shards written in order by this process, each
          atomically and then recorded as done (kdkit.shards.resume, the plan and records every
          shard-writing job shares);
  finish  once every shard of the plan is done (by this run or other parts), the manifest,
          skip report and timm `_info.json` are written.

OUT is a local folder or a bucket prefix (kdkit.shards.location; resume.py says what changes there).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from kdkit import __version__
from kdkit.errors import KdkitError
from kdkit.shards import contract, tario
from kdkit.shards.images import ImageOptions
from kdkit.shards.location import BucketPath, location
from kdkit.shards.resume import ShardJob, open_job
from kdkit.shards.prepare import process_sample
from kdkit.shards.sources.base import SourceDataset, SourceSample, SourceSplit
from kdkit.workers import WorkerPool

ESTIMATE_SAMPLES = 32  # images encoded up front to turn --shard-size-mb into samples per shard


@dataclass
class ShardConfig:
    samples_per_shard: int | None = None  # wins over shard_size_mb when given
    shard_size_mb: float = 256.0
    image: ImageOptions = field(default_factory=ImageOptions)
    workers: int = max(1, (os.cpu_count() or 1))
    seed: int = 0
    part: tuple[int, int] = (0, 1)  # (i, N): write shards with index % N == i
    strict: bool = False  # a bad image stops the run instead of being skipped and reported
    command: str = ""
    progress: bool = True

    def output_options(self) -> dict:
        """The options that change the bytes written: part of the set's identity."""
        return {
            "samples_per_shard": self.samples_per_shard,
            "shard_size_mb": None if self.samples_per_shard else self.shard_size_mb,
            "max_size": self.image.max_size,
            "resize_side": self.image.resize_side,
            "quality": self.image.quality,
            "seed": self.seed,
        }


# ---------------------------------------------------------------------------------------------

def ordered_samples(samples: list[SourceSample], seed: int) -> list[SourceSample]:
    out = sorted(samples, key=lambda s: s.key)
    random.Random(seed).shuffle(out)
    return out


def fingerprint(split: SourceSplit, cfg: ShardConfig) -> str:
    h = hashlib.sha256(json.dumps(cfg.output_options(), sort_keys=True).encode())
    for s in sorted(split.samples, key=lambda s: s.key):
        h.update(f"{s.key}\t{s.label}\n".encode())
    return h.hexdigest()


def _estimate_samples_per_shard(samples: list[SourceSample], cfg: ShardConfig) -> int:
    sizes = []
    for s in samples[:ESTIMATE_SAMPLES]:
        _, jpg, err, _ = process_sample((s, cfg.image))
        if jpg is not None:
            sizes.append(len(jpg) + 1536)  # + tar headers and padding for the image and label
    mean = sum(sizes) / len(sizes) if sizes else 100_000
    return max(1, int(cfg.shard_size_mb * 1e6 // mean))


def _open(folder: Path, split: SourceSplit, order: list[SourceSample], cfg: ShardConfig) -> tuple[ShardJob, dict]:
    def plan() -> dict:
        per = cfg.samples_per_shard or _estimate_samples_per_shard(order, cfg)
        return {"samples_per_shard": per, "num_shards": (len(order) + per - 1) // per}

    return open_job(folder, fingerprint(split, cfg), cfg.command, "shard set",
                    facts={"options": cfg.output_options(), "num_samples": len(order)}, plan=plan, part=cfg.part)


def write_split(ds: SourceDataset, split: SourceSplit, out: Path, cfg: ShardConfig) -> contract.Manifest | None:
    """Write (or continue writing) one split. Returns its manifest once the whole set is complete."""
    if not split.samples:
        raise KdkitError(f"{ds.root}: split '{split.name}' has no images; check the path and layout")
    folder = out / split.name
    order = ordered_samples(split.samples, cfg.seed)
    job, plan = _open(folder, split, order, cfg)
    with job:  # the folder's writer lock (kdkit.locks), until the split is written
        return _write(ds, split, order, job, plan, cfg)


def _write(ds: SourceDataset, split: SourceSplit, order: list[SourceSample], job: ShardJob, plan: dict,
           cfg: ShardConfig) -> contract.Manifest | None:
    folder = job.folder
    per, n_shards = plan["samples_per_shard"], plan["num_shards"]
    part_i, part_n = cfg.part
    mine = [i for i in range(n_shards) if i % part_n == part_i]
    names = {contract.tar_name(split.name, i): i for i in mine}
    todo = [names[n] for n in job.todo(list(names), cfg.progress)]  # missing, or damaged since written
    job.clear_temps([contract.tar_name(split.name, i) for i in todo])  # a killed run's, never a real name
    kept = len(mine) - len(todo)
    if kept and cfg.progress:
        print(f"{split.name}: resuming, {kept} of {len(mine)} shards already written and kept", file=sys.stderr)

    work = [(s, cfg.image) for i in todo for s in order[i * per:(i + 1) * per]]
    t0 = time.perf_counter()
    bar = tqdm(total=len(work), unit="img", desc=f"{split.name}", disable=not cfg.progress, smoothing=0.1)
    pool = None
    try:
        if cfg.workers > 1 and len(work) > 1:
            pool = WorkerPool(cfg.workers, "preparing images")
            results = pool.imap(process_sample, work, chunksize=8, describe=lambda w: w[0].origin)
        else:
            results = map(process_sample, work)
        for i in todo:
            n_in = len(order[i * per:(i + 1) * per])
            skipped: list[list[str]] = []
            converted: dict[str, int] = {}  # images.to_rgb's changes (EXIF orientation applied, ...), counted

            def samples_of_shard():
                for _ in range(n_in):
                    sample, jpg, err, changed = next(results)
                    for what in changed:
                        converted[what] = converted.get(what, 0) + 1
                    bar.update(1)
                    if err is not None:
                        if cfg.strict:
                            raise KdkitError(f"{sample.origin}: {err} (--strict; drop --strict to skip and report bad images)")
                        skipped.append([sample.origin, err])
                        bar.set_postfix(skipped=len(skipped))
                        continue
                    yield {"__key__": sample.key, contract.IMAGE_EXT: jpg,
                           contract.LABEL_EXT: contract.encode_label(sample.label)}

            job.write(contract.tar_name(split.name, i), samples_of_shard(), {"skipped": skipped, "converted": converted})
    except KeyboardInterrupt:
        job.clear_temps([contract.tar_name(split.name, i) for i in todo])
        print(f"\n{split.name}: interrupted; finished shards in {folder} are kept, run the same command again "
              "to continue", file=sys.stderr)
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.close()
    elapsed = time.perf_counter() - t0
    return _finish(ds, split, job, plan, cfg, written=len(work), elapsed=elapsed)


def _finish(ds, split, job: ShardJob, plan, cfg, written, elapsed) -> contract.Manifest | None:
    folder = job.folder
    records = job.complete([contract.tar_name(split.name, i) for i in range(plan["num_shards"])])
    if records is None:
        print(f"{split.name}: part {cfg.part[0]}/{cfg.part[1]} done ({written} images in {elapsed:.1f}s); "
              "other parts still have shards to write (the last part to finish writes the manifest)",
              file=sys.stderr)
        return None
    skipped = [row for r in records for row in r["skipped"]]
    write_skip_report(folder / contract.SKIP_REPORT, skipped, split.ignored)
    if not any(r["num_samples"] for r in records):
        raise KdkitError(f"{ds.root}: split '{split.name}': none of its {len(skipped)} images could be read (the "
                         f"first: {skipped[0][0]}: {skipped[0][1]}; all in {folder / contract.SKIP_REPORT}); no "
                         f"manifest written. Fix or remove those files, delete {folder}, and run again")
    manifest = contract.Manifest(
        split=split.name,
        classes=ds.classes,
        shards=[contract.ShardRecord(r["tar"], r["idx"], r["num_samples"], r["bytes"], r["sha256"],
                                     len(r["skipped"])) for r in records],
        source={"converter": ds.converter, "root": str(ds.root), "listed_samples": plan["num_samples"], **ds.info},
        options={**plan["options"], "samples_per_shard": plan["samples_per_shard"]},
        command=plan.get("command", ""),
        kdkit_version=__version__,
        skipped=len(skipped),
        ignored_files=len(split.ignored),
        converted=converted_counts(records),
    )
    tario.atomic_write_json(folder / contract.MANIFEST, manifest.to_json())
    write_timm_info(folder.parent)
    total = sum(r["bytes"] for r in records)
    rate = f", {written / elapsed:.0f} img/s" if written and elapsed > 0 else ""
    print(f"{split.name}: {manifest.num_samples} samples of {class_list(ds.classes)} in {len(records)} shards "
          f"({total / 1e6:.1f} MB){rate}; {len(skipped)} skipped, {len(split.ignored)} ignored"
          + (f" (see {folder / contract.SKIP_REPORT})" if skipped or split.ignored else "")
          + "".join(f"; {n} {CONVERSIONS.get(what, what)}" for what, n in manifest.converted.items()),
          file=sys.stderr)
    return manifest


CONVERSIONS = {"orientation": "turned upright (EXIF orientation)", "high_bit_depth": "scaled from high bit depth",
               "alpha": "with transparency composited on white"}


def class_list(classes: list[contract.ClassInfo], show: int = 8) -> str:
    """"3 classes (a, b, c)": what a user checks first after converting a folder tree."""
    names = [c.id for c in classes[:show]] + (["..."] if len(classes) > show else [])
    return f"{len(classes)} class{'es' if len(classes) != 1 else ''} ({', '.join(names)})"


def _tsv_field(text: str) -> str:
    """A path or reason as one TSV field: tabs and line breaks (legal in file names) would split the row."""
    text = text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")  # undecodable bytes: \\xNN


def write_skip_report(path: Path | BucketPath, skipped: list, ignored: list) -> None:
    """skipped.tsv: a header, then one `path<TAB>reason` row per file left out; tabs, line breaks and
    backslashes in a field are written as \\t, \\n, \\r, \\\\ (so every row has two fields), and a
    file name that is not valid UTF-8 keeps its bytes as \\xNN (Python's backslashreplace)."""
    report = "path\treason\n" + "".join(f"{_tsv_field(p)}\t{_tsv_field(why)}\n" for p, why in skipped) \
        + "".join(f"{_tsv_field(p)}\tignored: {_tsv_field(why)}\n" for p, why in ignored)
    tario.atomic_write_bytes(path, report.encode("utf-8"))


def converted_counts(records: list[dict]) -> dict[str, int]:
    """How many images of the set each of images.to_rgb's changes was made to (records of sets written
    before they were counted have none)."""
    total: dict[str, int] = {}
    for r in records:
        for what, n in r.get("converted", {}).items():
            total[what] = total.get(what, 0) + n
    return dict(sorted(total.items()))


def write_timm_info(root: Path | BucketPath) -> None:
    """timm's `_info.json` for every complete split under root, so timm's train.py reads the set."""
    splits = {}
    for m in sorted(root.glob(f"*/{contract.MANIFEST}")):
        d = json.loads(m.read_text())
        rel = m.parent.name
        splits[d["split"]] = {
            "name": d["split"],
            "num_samples": d["num_samples"],
            "filenames": [f"{rel}/{s['tar']}" for s in d["shards"]],
            "shard_lengths": [s["num_samples"] for s in d["shards"]],
        }
    if splits:
        info = {"name": root.name, "num_classes": d["num_classes"], "splits": splits}
        tario.atomic_write_json(root / contract.TIMM_INFO, info)


def write_dataset(ds: SourceDataset, out: Path | BucketPath | str,
                  cfg: ShardConfig) -> dict[str, contract.Manifest | None]:
    out = location(out)
    root = Path(ds.root)
    if root.is_dir() and (out.resolve() == root.resolve() or root.resolve() in out.resolve().parents):
        raise KdkitError(f"{out}: the output folder is inside the input {root} (a later run would read its own "
                         "shards as a class); write the shards somewhere else")
    if not ds.classes:
        raise KdkitError(f"{ds.root}: no classes found; check the path and layout")
    if len(ds.classes) > contract.MAX_CLASSES:
        raise KdkitError(f"{ds.root}: {len(ds.classes)} classes; the format holds at most {contract.MAX_CLASSES}")
    i, n = cfg.part
    if not (n >= 1 and 0 <= i < n):
        raise KdkitError(f"--part {i}/{n}: expected i/N with 0 <= i < N")
    for split in ds.splits:
        seen: dict[str, str] = {}
        for s in split.samples:
            if s.key in seen:
                raise KdkitError(f"{s.origin}: same sample key {s.key!r} as {seen[s.key]} in split {split.name}; "
                                 "rename one of the two")
            seen[s.key] = s.origin
    out.mkdir(parents=True, exist_ok=True)
    return {split.name: write_split(ds, split, out, cfg) for split in ds.splits}


__all__ = ["ShardConfig", "write_dataset", "write_split", "ordered_samples", "asdict"]
