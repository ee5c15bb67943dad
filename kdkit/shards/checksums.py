"""Is a shard still the bytes its writer recorded? The sha256 check every reader runs before DALI sees
a shard (kdkit.shards.reader.check_checksums) and every writer's rerun runs before it keeps a shard
(kdkit.shards.resume.ShardJob.todo), with the cache that makes it cheap.

What the cache promises. $KDKIT_CACHE/checked/<folder hash>.json records, per tar, the (size,
mtime_ns, sha256) it had when its bytes were last hashed and matched (for a shard in a bucket its
ETag instead of the mtime: every new upload changes it) (by a reader, by `kdkit verify`,
or by the writer that wrote it). A tar whose size or mtime changed since is hashed again before it
is used. One whose size and mtime did not change is trusted without hashing, and that is exactly what
silent damage keeps (bit rot, a faulty disk or controller, a write under the file system). So each
check also re-hashes the cached shards verified longest ago, RECHECK_SHARE of the checked bytes (at
least one shard): such damage is caught within 1 / RECHECK_SHARE checks of the set (50), at a cost of
2% of a first check per run. KDKIT_CHECKSUMS=full re-hashes every shard (as `kdkit verify` always
does); KDKIT_CHECKSUMS=0 skips the check (a set being rewritten on purpose).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kdkit.errors import KdkitError
from kdkit.shards import contract
from kdkit.shards.location import location, version
from kdkit.shards.tario import sha256_file

RECHECK_SHARE = 0.02  # of the checked bytes re-hashed on every check although cached (bit rot)
VERSION = 2  # of the cache file; another version is read as empty (each shard hashed once more)


def mode() -> str:
    """KDKIT_CHECKSUMS: "0" (off), "full" (every shard hashed) or "on" (the default: cache + rotation)."""
    value = os.environ.get("KDKIT_CHECKSUMS", "").strip().lower()
    if value in ("", "1", "on"):
        return "on"
    if value in ("0", "full"):
        return value
    raise KdkitError(f"KDKIT_CHECKSUMS={value!r}: expected 0 (no check), full (hash every shard) or leave it unset")


def _cache_file(folder) -> Path:
    from kdkit import cache_root

    return cache_root("checked") / (hashlib.sha256(str(folder).encode()).hexdigest()[:16] + ".json")


def _load(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
        if d.get("version") == VERSION:
            return d
    except (OSError, ValueError, AttributeError):
        pass
    return {"version": VERSION, "checks": 0, "shards": {}}


def _update(folder, verified: dict[str, list], dropped: set[str], checks: int | None = None) -> None:
    """Merge into the cache file what this process learnt. Ranks check their own shards at the same moment:
    each merges into what is on disk just before writing (kdkit.atomic: a temp file of its own)."""
    if not verified and not dropped:
        return
    from kdkit import atomic

    path = _cache_file(folder)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        d = _load(path)
        now = {k: v[:3] + [d["checks"]] if v[3] is None else v for k, v in verified.items()}  # None: as of now
        d["shards"] = {k: v for k, v in {**d["shards"], **now}.items() if k not in dropped}
        d["checks"] = max(d["checks"], checks or 0)
        atomic.write_text(path, json.dumps(d))
    except OSError:  # an unwritable cache only costs the same hashing next time
        pass


def record(matched: dict[Path, str], differ=(), stats: dict | None = None) -> None:
    """The tars of `matched` ({tar: sha256}) hold these bytes (their writer just hashed them, or `kdkit
    verify` did), with the stamps of `stats` ({tar: stat taken before hashing}; else taken now); those
    of `differ` no longer match what was recorded: the next check hashes them, whatever their stamps
    say. One update of each folder's cache file, however many tars."""
    by_folder: dict = {}
    for tar, sha256 in matched.items():
        st = (stats or {}).get(tar)
        tar = location(tar).resolve()
        st = st or tar.stat()
        by_folder.setdefault(tar.parent, ({}, set()))[0][tar.name] = [st.st_size, version(st), sha256, None]
    for tar in differ:
        tar = location(tar).resolve()
        by_folder.setdefault(tar.parent, ({}, set()))[1].add(tar.name)
    for folder, (verified, dropped) in by_folder.items():
        _update(folder, verified, dropped)


def remember(tar: Path, sha256: str) -> None:
    """`tar` holds these bytes now (its writer just hashed them)."""
    record({tar: sha256})


def changed(expected: dict[Path, str], progress: bool = True, what: str = "checking shard checksums"
            ) -> dict[Path, str]:
    """{tar: its actual sha256} for the tars of `expected` ({tar: sha256 recorded}) whose bytes differ;
    the tars that match are recorded as verified. Hashes what the cache cannot vouch for, plus the
    rotating re-check (module doc); nothing with KDKIT_CHECKSUMS=0."""
    how = mode()
    if how == "0" or not expected:
        return {}
    by_folder: dict[Path, dict[Path, str]] = {}
    for tar, want in expected.items():
        tar = location(tar)
        by_folder.setdefault(tar.resolve().parent, {})[tar] = want
    plans = []
    for folder, tars in by_folder.items():
        cache = _load(_cache_file(folder))
        stats = {t: t.stat() for t in tars}
        entries = cache["shards"]
        cached = [t for t, want in tars.items()
                  if entries.get(t.name, [None] * 3)[:3] == [stats[t].st_size, version(stats[t]), want]]
        known = set(cached)  # a set: a list's membership test is quadratic over a folder of shards
        todo = [t for t in tars if t not in known] if how == "on" else list(tars)
        if how == "on" and cached:  # the rotating re-check: longest since verified first
            budget = RECHECK_SHARE * sum(st.st_size for st in stats.values())
            spent = 0
            for t in sorted(cached, key=lambda t: (entries[t.name][3], t.name)):
                if spent and spent >= budget:
                    break
                todo.append(t)
                spent += stats[t].st_size
        plans.append((folder, tars, stats, todo, cache["checks"] + 1))
    jobs = [(folder, t) for folder, _, _, todo, _ in plans for t in todo]
    total = sum(stats[t].st_size for _, _, stats, todo, _ in plans for t in todo)
    from tqdm import tqdm

    differ: dict[Path, str] = {}
    results: dict[Path, str] = {}
    # hashlib releases the GIL while it hashes, so threads hash several shards at once; the shards that
    # match are recorded even when another differs, so a rerun hashes only what is left
    try:
        with tqdm(total=total, unit="B", unit_scale=True, file=sys.stderr, desc=what,
                  disable=not progress or total < 1 << 30) as bar, \
                ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            for (folder, tar), got in zip(jobs, pool.map(lambda job: sha256_file(job[1]), jobs)):
                results[tar] = got
                bar.update(next(p[2][tar] for p in plans if p[0] == folder).st_size)
    finally:
        for folder, tars, stats, todo, checks in plans:
            verified, dropped = {}, set()
            for t in todo:
                if t not in results:
                    continue
                if results[t] == tars[t]:
                    verified[t.name] = [stats[t].st_size, version(stats[t]), tars[t], checks]
                else:
                    dropped.add(t.name)
                    differ[t] = results[t]
            _update(folder, verified, dropped, checks)
    return differ


# ---------------------------------------------------------------------------------------------
# what a user can do about a shard that differs

def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def rewritten_by(tar: Path, actual: str) -> str | None:
    """The command of an unfinished job that rewrote `tar` in place (its record holds these bytes), if any."""
    state = tar.parent / contract.STATE_DIR
    for record in sorted(state.glob(f"*/{tar.stem}.json")):
        rec, plan = _json(record), _json(record.parent / contract.PLAN_FILE)
        if rec.get("sha256") == actual and plan.get("fingerprint") == rec.get("fingerprint"):
            return plan.get("command") or f"the job in {record.parent}"
    return None


def in_place(manifest) -> bool:
    """Whether a teacher pass wrote its outputs into this set itself (then its shards are the only copy
    of their images)."""
    teacher = (manifest.teacher or {}) if manifest is not None else {}
    return bool(teacher.get("in_place", "--in-place" in str(teacher.get("command", ""))))


def refusal(manifest, differ: dict[Path, str]) -> str:
    """The one line for shards whose bytes differ from their manifest: which, why if kdkit knows, and what
    to do (never advice that could delete the only copy of data)."""
    first = next(iter(differ))
    if manifest is None:
        from kdkit.shards.verify import load_manifest

        try:
            manifest = load_manifest(first.parent)
        except KdkitError:
            pass
    more = f" (and {len(differ) - 1} more shards)" if len(differ) > 1 else ""
    head = f"{first}{more}: its bytes differ from the checksum in its manifest"
    command = rewritten_by(first, differ[first])
    if command:
        return (f"{head}: an unfinished in-place job rewrote it (`{command}`); rerun that command to finish it "
                "(it continues where it stopped). The shard is not damaged")
    names = f"`kdkit verify --decode {first.parent}` names the damaged samples"
    teacher = (manifest.teacher or {}) if manifest is not None else {}
    if in_place(manifest):
        source = f" (`{manifest.command}`, into a new folder)" if manifest.command else ""
        return (f"{head} (damaged since it was written), and it holds the only copy of its images: the teacher "
                f"pass added its outputs to this set in place. Do not delete it: restore it from a backup, or write "
                f"the set again from its source images{source} and rerun the teacher pass on that; {names}; "
                "KDKIT_CHECKSUMS=0 reads it as it is")
    command = teacher.get("command") or (manifest.command if manifest is not None else "")
    rerun = f"rerun the command that wrote it (`{command}`)" if command else "rerun the command that wrote it"
    return (f"{head} (changed or damaged since it was written); {names}; {rerun}: it writes again the shards "
            "that are missing or differ from their checksum and keeps the others; or set KDKIT_CHECKSUMS=0 to "
            "read it as it is")
