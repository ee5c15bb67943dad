"""Teacher outputs in HDF5, keyed by sample key: the exchange format with other tools and clusters.

    /                      attrs: format "kdkit-teacher-outputs", format_version 2
    /<split>/keys          (N,) UTF-8 strings: the shard set's sample keys
    /<split>/logits        (N, C) or (N, K, C) float16            \\ or, stored as top-k,
    /<split>/topk_logits   (N, k) or (N, K, k) float16 + topk_idx  / their integer class indices
    /<split>/views         (N, K, 5) integer crop boxes (x, y, w, h, flip) in pixels of the decoded image,
                           multi-view only; float boxes relative to the image (format_version 1, kdkit
                           before 2026-12) are read too, and turned into pixels with each image's size
    /<split>               attrs: num_classes, split, teacher (the manifest's teacher block, JSON)

A file made elsewhere may also hold keys/logits at its root when it covers a single split.
Import joins by key and refuses, naming the file, a file that lacks keys the shards have, has keys
the shards lack, or has another class count: no sample is silently left without outputs.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kdkit.errors import KdkitError
from kdkit.shards.tario import sha256_file
from kdkit.shards import contract, tario
from kdkit.teach import members as mem

FORMAT = "kdkit-teacher-outputs"
FORMAT_VERSION = 2
DATASETS = ("logits", "topk_logits", "topk_idx", "views")


def datasets(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A packed member's arrays under the file's dataset names."""
    if "indices" in arrays:
        out = {"topk_logits": arrays["values"], "topk_idx": arrays["indices"]}
    else:
        out = {"logits": arrays["values"]}
    if "boxes" in arrays:
        out["views"] = arrays["boxes"]
    return out


def export_h5(sets: list[tuple[str, Path]], path: Path) -> int:
    """Write the teacher outputs of the given (split, folder) sets; returns samples written."""
    import h5py

    from kdkit.shards.verify import load_manifest

    total = 0
    tmp = Path(str(path) + tario.TMP_SUFFIX)
    with h5py.File(tmp, "w") as f:
        f.attrs["format"], f.attrs["format_version"] = FORMAT, FORMAT_VERSION
        for split, folder in sets:
            man = load_manifest(folder)
            if not man.teacher:
                raise KdkitError(f"{folder}: holds no teacher outputs to export (its manifest has no teacher block)")
            if contract.is_legacy_teacher(man.teacher):
                raise KdkitError(f"{folder}: teacher outputs in the layout before the packed member; convert them once "
                                 f"with `kdkit add-teacher-logits {folder} --repack --in-place`, then export")
            g = f.create_group(split)
            g.attrs.update(num_classes=len(man.classes), split=split, teacher=json.dumps(man.teacher))
            n, row, keys, dsets = man.num_samples, 0, [], {}
            for s in man.shards:
                for key, members in tario.iter_tar_samples(folder / s.tar):
                    if contract.TEACHER_EXT not in members:
                        raise KdkitError(f"{folder / s.tar}: sample {key} has no teacher outputs; "
                                         "check the set with `kdkit verify`")
                    for name, a in datasets(mem.decode(members, man.teacher, len(man.classes))).items():
                        if name not in dsets:
                            dsets[name] = g.create_dataset(name, (n, *a.shape), dtype=a.dtype,
                                                           chunks=(min(n, 1024), *a.shape))
                        dsets[name][row] = a
                    keys.append(key)
                    row += 1
            g.create_dataset("keys", data=np.array(keys, dtype=object), dtype=h5py.string_dtype("utf-8"))
            total += row
    tmp.replace(path)
    return total


class H5Outputs:
    """Outputs read from an HDF5 file, checked against the shard sets they are joined into."""

    def __init__(self, path: Path):
        import h5py

        self.path = Path(path)
        if not self.path.exists():
            raise KdkitError(f"{self.path}: --import-h5 file does not exist")
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as e:
            raise KdkitError(f"{self.path}: not a readable HDF5 file ({e})") from None
        self.sha256 = sha256_file(self.path)
        self._rows: dict[str, dict[str, int]] = {}

    def group(self, split: str, single_split: bool):
        if split in self.file and "keys" in self.file[split]:
            return self.file[split]
        if single_split and "keys" in self.file:
            return self.file
        raise KdkitError(f"{self.path}: no outputs for split {split!r} (expected a group /{split} with 'keys', "
                         "or 'keys'/'logits' at the root when importing a single split)")

    def check(self, split: str, g, shard_keys: list[str], num_classes: int, topk: int | None) -> None:
        """Every key of the shards present, no key left over, the set's class count: else refuse."""
        keys = [k.decode() if isinstance(k, bytes) else str(k) for k in g["keys"][()]]
        rows = {k: i for i, k in enumerate(keys)}
        if len(rows) != len(keys):
            raise KdkitError(f"{self.path}: split {split!r} lists some keys twice")
        have = set(shard_keys)
        lacking = [k for k in shard_keys if k not in rows]
        extra = [k for k in keys if k not in have]
        if lacking or extra:
            parts = []
            if lacking:
                parts.append(f"{len(lacking)} keys of the shards have no outputs in the file "
                             f"(e.g. {', '.join(lacking[:3])})")
            if extra:
                parts.append(f"{len(extra)} keys in the file are not in the shards (e.g. {', '.join(extra[:3])})")
            raise KdkitError(f"{self.path}: split {split!r}: " + "; ".join(parts)
                             + ". Nothing was written; export the outputs for exactly this shard set")
        if "logits" in g:
            classes = int(g["logits"].shape[-1])  # the data says it; an attribute could be stale
        elif "topk_logits" in g and "topk_idx" in g:
            if "num_classes" not in g.attrs:
                raise KdkitError(f"{self.path}: top-k outputs without a num_classes attribute; add it to /{split}")
            classes = int(g.attrs["num_classes"])
            if topk and topk != g["topk_logits"].shape[-1]:
                raise KdkitError(f"{self.path}: holds top-{g['topk_logits'].shape[-1]} outputs, --topk {topk} asked")
        else:
            raise KdkitError(f"{self.path}: split {split!r} has neither 'logits' nor 'topk_logits' + 'topk_idx'")
        if classes != num_classes:
            raise KdkitError(f"{self.path}: outputs for {classes} classes, the shard set has {num_classes}")
        short = [n for n in DATASETS if n in g and g[n].shape[0] != len(keys)]
        if short:
            raise KdkitError(f"{self.path}: /{split}/{short[0]} has {g[short[0]].shape[0]} rows for {len(keys)} keys")
        if "logits" in g and g["logits"].ndim == 3 and "views" not in g:
            raise KdkitError(f"{self.path}: multi-view logits (N, K, C) without their 'views' boxes cannot be replayed")
        self._rows[split] = rows

    def members(self, split: str, g, samples: list, topk: int | None, num_classes: int
                ) -> dict[str, dict[str, bytes]]:
        """The packed teacher member of one shard's samples [(key, members)], read with one sorted slice per
        dataset; relative float boxes (format_version 1) become pixels with each sample's image size."""
        from kdkit.shards.images import decoded_size

        keys = [k for k, _ in samples]
        rows = np.array([self._rows[split][k] for k in keys])
        order = np.argsort(rows)
        back = np.empty_like(order)
        back[order] = np.arange(len(order))

        def take(name):  # h5py wants increasing indices
            return g[name][rows[order]][back] if name in g else None

        logits, views = take("logits"), take("views")
        values, idx = take("topk_logits"), take("topk_idx")
        out = {}
        for i, (key, own) in enumerate(samples):
            boxes = None if views is None else views[i]
            if boxes is not None and boxes.dtype.kind == "f":
                boxes = mem.pixel_boxes(boxes, *decoded_size(own[contract.IMAGE_EXT]))
            if logits is not None:
                out[key] = mem.encode(logits[i], boxes, topk)
            else:
                out[key] = {contract.TEACHER_EXT: mem.pack(values[i].astype(np.float16), idx[i], boxes, num_classes)}
        return out

    def teacher_block(self, g) -> dict:
        try:
            return json.loads(g.attrs.get("teacher", "{}"))
        except ValueError:
            return {}

    def close(self) -> None:
        self.file.close()
