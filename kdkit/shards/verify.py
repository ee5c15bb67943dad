"""`kdkit verify`: check a shard set against its manifest and say exactly what is wrong."""
from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from kdkit.errors import KdkitError
from kdkit.shards import checksums, contract, tario
from kdkit.shards.location import location


@dataclass
class VerifyReport:
    folder: Path
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def find_sets(path: Path) -> list[Path]:
    """A shard-set folder (has a manifest), or a dataset root holding one per split (local or in a bucket)."""
    path = location(path)
    if not path.exists():
        raise KdkitError(f"{path}: does not exist")
    if (path / contract.MANIFEST).exists():
        return [path]
    sets = sorted(p.parent for p in path.glob(f"*/{contract.MANIFEST}"))
    if not sets:
        raise KdkitError(f"{path}: no {contract.MANIFEST} here or in its sub-folders; "
                         "is this a kdkit shard set, and did its writing finish?")
    return sets


def unfinished_sets(path: Path) -> list[Path]:
    """Sub-folders of a dataset root holding shards (or a writer's state) but no manifest: a split whose
    writing did not finish, or whose manifest was lost. find_sets leaves them out; verify reports them."""
    path = location(path)
    if (path / contract.MANIFEST).exists():
        return []
    return sorted(p for p in path.iterdir() if p.is_dir() and not (p / contract.MANIFEST).exists()
                  and (any(p.glob("*.tar")) or (p / contract.STATE_DIR).exists()))


def load_manifest(folder: Path) -> contract.Manifest:
    p = location(folder) / contract.MANIFEST
    try:
        return contract.Manifest.from_json(json.loads(p.read_text()))
    except FileNotFoundError:
        raise KdkitError(f"{p}: missing; is this a kdkit shard set, and did its writing finish?") from None
    except (ValueError, KeyError, TypeError) as e:
        raise KdkitError(f"{p}: unreadable manifest ({e})") from None


def _check_members(key: str, members: dict[str, bytes], man: contract.Manifest, where: str, decode: bool,
                   problems: list[str]) -> None:
    img_ext, lbl_ext = man.members["image"], man.members["label"]
    if img_ext not in members:
        problems.append(f"{where}: sample {key} has no .{img_ext} member")
    if lbl_ext not in members:
        problems.append(f"{where}: sample {key} has no .{lbl_ext} member")
    else:
        raw = members[lbl_ext]
        try:
            label = contract.decode_label(raw)
            if len(raw) != man.label_width:
                problems.append(f"{where}: sample {key} label {raw!r} is not {man.label_width} digits wide")
            if not 0 <= label < len(man.classes):
                problems.append(f"{where}: sample {key} label {label} outside 0..{len(man.classes) - 1}")
        except ValueError:
            problems.append(f"{where}: sample {key} label {raw[:20]!r} is not an integer")
    if decode and img_ext in members:
        from kdkit.errors import BadImage
        from kdkit.shards.images import check_decodes

        try:
            check_decodes(members[img_ext])
        except BadImage as e:
            problems.append(f"{where}: sample {key} image does not decode ({e})")


def _check_teacher(key: str, members: dict[str, bytes], teacher: dict, where: str, problems: list[str]) -> None:
    """Teacher outputs as the manifest's teacher block promises them: the packed member present, as long
    as its layout (classes, views, top-k), values finite, class indices and view boxes in range."""
    import numpy as np  # here: plain `kdkit verify` of a set without teacher outputs never needs it

    from kdkit.shards.images import decoded_size

    ext = contract.TEACHER_EXT
    if ext not in members:
        problems.append(f"{where}: sample {key} has no .{ext} member (the manifest's teacher block lists it)")
        return
    classes = int(teacher["num_classes"])
    parts = contract.block_layout(teacher, classes)
    size = sum(p.nbytes for p in parts)
    if len(members[ext]) != size:
        problems.append(f"{where}: sample {key} .{ext} has {len(members[ext])} bytes, the teacher block's layout "
                        f"{size}")
        return
    a = {p.name: np.frombuffer(members[ext], p.dtype, p.count, p.offset).reshape(p.shape) for p in parts}
    if not np.isfinite(a["values"]).all():
        problems.append(f"{where}: sample {key} .{ext} holds {'NaN' if np.isnan(a['values']).any() else 'infinite'} "
                        "teacher outputs (a diverged teacher, or logits beyond float16's range)")
    if "indices" in a and a["indices"].size and not (0 <= a["indices"].min() and a["indices"].max() < classes):
        problems.append(f"{where}: sample {key} .{ext} holds class indices outside 0..{classes - 1}")
    if "boxes" in a:
        b = a["boxes"].astype(np.int64)
        try:
            w, h = decoded_size(members[contract.IMAGE_EXT])
        except Exception:  # an undecodable image is reported by the image check
            return
        inside = ((b[:, 2:4] >= 1).all() and (b[:, 0] + b[:, 2] <= w).all() and (b[:, 1] + b[:, 3] <= h).all()
                  and np.isin(b[:, 4], (0, 1)).all())
        if not inside:
            problems.append(f"{where}: sample {key} .{ext} holds view boxes outside its {w}x{h} image (or a flip "
                            "other than 0/1)")


def verify_set(folder: Path, decode: bool = False, progress: bool = True) -> VerifyReport:
    folder = location(folder)
    man = load_manifest(folder)
    rep = VerifyReport(folder)
    if contract.is_legacy_teacher(man.teacher):
        rep.problems.append(contract.legacy_teacher_problem(folder))
    listed = {s.tar for s in man.shards}
    for extra in sorted(p.name for p in folder.glob("*.tar") if p.name not in listed):
        rep.problems.append(f"{folder / extra}: tar not listed in the manifest")
    matched, differ, stats = {}, [], {}  # recorded once at the end (one cache write, not one a shard); kept if stopped
    try:
        for s in tqdm(man.shards, desc=f"verify {folder.name}", unit="shard", disable=not progress):
            tar, idx = folder / s.tar, folder / s.idx
            rep.shards += 1
            if not tar.exists():
                rep.problems.append(f"{tar}: missing")
                continue
            stats[tar] = tar.stat()  # before hashing: a tar changed meanwhile is hashed again by the next check
            size = stats[tar].st_size
            if size != s.bytes:
                rep.problems.append(f"{tar}: {size} bytes, manifest says {s.bytes} (truncated or replaced)")
            elif tario.sha256_file(tar) != s.sha256:  # always hashed: verify never trusts the readers' cache
                rep.problems.append(f"{tar}: checksum differs from the manifest (modified after writing)")
                differ.append(tar)  # so that no reader trusts its cached stamps either
            else:
                matched[tar] = s.sha256
            keys = []
            try:
                for key, members in tario.iter_tar_samples(tar):
                    keys.append(key)
                    _check_members(key, members, man, str(tar), decode, rep.problems)
                    if man.teacher and not contract.is_legacy_teacher(man.teacher):
                        _check_teacher(key, members, {"num_classes": len(man.classes), **man.teacher}, str(tar),
                                       rep.problems)
            except (tarfile.TarError, EOFError, OSError) as e:
                rep.problems.append(f"{tar}: unreadable tar after {len(keys)} samples ({e})")
            if len(set(keys)) != len(keys):
                rep.problems.append(f"{tar}: sample keys repeat (members of one sample not adjacent?)")
            if len(keys) != s.num_samples:
                rep.problems.append(f"{tar}: {len(keys)} samples, manifest says {s.num_samples}")
            rep.samples += len(keys)
            if not idx.exists():
                rep.problems.append(f"{idx}: DALI index missing (recreate with `kdkit verify --fix-index`)")
            else:
                try:
                    entries = tario.read_dali_index(idx)
                    if len(entries) != len(keys):
                        rep.problems.append(f"{idx}: indexes {len(entries)} samples, tar holds {len(keys)}")
                    elif tar.exists() and tario.dali_index_lines(tar) != idx.read_text().splitlines()[1:]:
                        rep.problems.append(f"{idx}: offsets do not match the tar (stale index)")
                except (ValueError, tarfile.TarError, EOFError, OSError) as e:
                    rep.problems.append(f"{idx}: {e}")
    finally:
        checksums.record(matched, differ, stats)
    if rep.samples != man.num_samples and not rep.problems:
        rep.problems.append(f"{folder}: {rep.samples} samples, manifest says {man.num_samples}")
    return rep


def fix_indexes(folder: Path) -> int:
    folder = location(folder)
    man = load_manifest(folder)
    n = 0
    for s in man.shards:
        tar = folder / s.tar
        if tar.exists():
            tario.write_dali_index(tar, folder / s.idx)
            n += 1
    return n
