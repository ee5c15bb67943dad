"""What a resumed `kdkit train student --kd stored` run spends reading its train set's DALI indexes before
its first step, on an ImageNet-size index.

    .venv/bin/python scripts/bench_index_scan.py                       # 1,281,167 samples in 1,000 shards
    .venv/bin/python scripts/bench_index_scan.py --code /path/to/older/checkout   # the same with older code

The indexes are written as kdkit writes them (v1.2 lines: jpg, cls and the packed teacher member, with
member names); the tars are sparse files of the size the offsets need, so nothing but the indexes is
read, as at a run's start. Timed: the reader calls the run makes in order (kdkit.train.kd Stored.check_data:
teacher_format + a scan; kdkit.train.state.check_same_train_set: the set's sample keys; the loader:
teacher_format + its scan), on one ShardSet as the run holds it. `--code DIR` imports kdkit from another
checkout first (before 2026-12-07 each of these read the indexes again; its same-set check was a scan).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def write_set(root: Path, samples: int, shards: int) -> list[Path]:
    from kdkit.shards import contract

    tars = []
    for s in range(shards):
        n, off, lines = samples // shards + (s < samples % shards), 0, []
        for i in range(n):
            key = f"n{s:08d}__n{s:08d}_{i}"
            members = (("jpg", 110_000), ("cls", contract.LABEL_WIDTH), ("teacher", 500))
            line = []
            for ext, size in members:
                line += [ext, str(off + 512), str(size), f"{key}.{ext}"]
                off += 512 + -(-size // 512) * 512
            lines.append(" ".join(line))
        tar = root / f"train-{s:06d}.tar"
        tar.with_suffix(".idx").write_text(f"{contract.DALI_INDEX_VERSION} {n}\n" + "\n".join(lines) + "\n")
        with open(tar, "wb") as f:
            f.truncate(off)  # sparse: the size the index's offsets need, no blocks on disk
        tars.append(tar)
    return tars


def resumed_kd_start(tars: list[Path]) -> float:
    from kdkit.shards import reader

    t0 = time.perf_counter()
    shards = reader.ShardSet(tars=tars)
    reader.teacher_format(shards)  # the KD check
    reader.scan_shards(shards, ["jpg", "cls"], probe=["teacher"])
    if hasattr(reader, "sample_keys"):  # the same-set check on resume
        reader.sample_keys(shards)
    else:
        reader.scan_shards(shards, [], label_ext=None)
    reader.teacher_format(shards)  # the loader
    reader.scan_shards(shards, ["jpg", "cls", "teacher"], probe=["teacher"])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=1_281_167)
    ap.add_argument("--shards", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--code", type=Path, help="a kdkit checkout to import instead of the installed one")
    a = ap.parse_args()
    if a.code:
        sys.path.insert(0, str(a.code.resolve()))
    import kdkit.shards.reader as reader

    with tempfile.TemporaryDirectory() as tmp:
        tars = write_set(Path(tmp), a.samples, a.shards)
        times = [resumed_kd_start(tars) for _ in range(a.repeats)]
    print(f"{reader.__file__}: {a.samples:,} samples in {a.shards:,} shards, the index reads of a resumed KD "
          f"run's start: {min(times):.1f} s (best of {a.repeats}: {', '.join(f'{t:.1f}' for t in times)})")


if __name__ == "__main__":
    main()
