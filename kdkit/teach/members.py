"""Teacher outputs <-> the packed `.teacher` member of a sample, as the shard contract lays it out.

Full logits are fp16 (C,) or (K, C); top-k storage keeps the k largest as fp16 values plus their
class indices (uint16 where the class count allows), (k,) or (K, k), which bounds the size for
many-class teachers (1000 classes: 2 KB a view in full, 40 bytes at k=10). Top-k values are
log-probabilities, log_softmax of the logits (TOPK_VALUES): logits of the same distribution (a
softmax over them is the softmax over the same k raw logits, at any temperature) that also keep the
mass of the classes left out, 1 - sum(exp(values)), for FKD's marginal smoothing
(kdkit.train.kd.dense_logits_from_topk). View boxes are integer pixel boxes (K, 5). All of a
sample's arrays are one member, raw bytes back to back (kdkit.shards.contract.teacher_layout): one
tar header and one padding instead of one per array (docs/teacher.md has the sizes).

Sets written before the packed member hold one .npy member per array and relative float boxes;
`decode_legacy` reads them and `legacy_to_packed` converts them (`kdkit add-teacher-logits --repack`).
"""
from __future__ import annotations

import io
import tarfile

import numpy as np
import torch

from kdkit.errors import KdkitError
from kdkit.shards import contract

TOPK_VALUES = "log_softmax"  # the teacher block's `topk_values`: what top-k values are (absent: raw logits)
TEACHER_EXTS = (contract.TEACHER_EXT, *contract.LEGACY_TEACHER_EXTS)  # every member a teacher pass replaces


def member_names() -> dict[str, str]:
    """The members a teacher block promises in every sample (what `kdkit verify` checks)."""
    return {"teacher": contract.TEACHER_EXT}


def layout_json(parts: tuple[contract.TeacherPart, ...]) -> list[dict]:
    """The teacher block's `layout`: every array's name, dtype, shape and byte offset in the member."""
    return [p.to_json() for p in parts]


def pack(values: np.ndarray, indices: np.ndarray | None, boxes: np.ndarray | None, num_classes: int) -> bytes:
    """One sample's member from its arrays: values (W,) / (K, W), top-k class indices of the same shape or
    None, integer pixel boxes (K, 5) or None. Refuses values that do not fit the layout's types."""
    views = boxes.shape[0] if boxes is not None else None
    topk = values.shape[-1] if indices is not None else None
    parts = contract.teacher_layout(num_classes, topk, views)
    arrays = {"values": values, "indices": indices, "boxes": boxes}
    out = []
    for p in parts:
        a = np.asarray(arrays[p.name])
        if a.shape != p.shape:
            raise KdkitError(f"teacher output {p.name} of shape {a.shape}, the layout says {p.shape}")
        if p.name != "values":
            info = np.iinfo(np.dtype(p.dtype))
            if a.size and (a.min() < max(info.min, 0) or a.max() > info.max):
                raise KdkitError(f"teacher output {p.name} holds {a.min()}..{a.max()}, outside the {p.dtype} of "
                                 "the packed member")
        out.append(np.ascontiguousarray(a).astype(p.dtype).tobytes())
    return b"".join(out)


def unpack(raw: bytes, parts: tuple[contract.TeacherPart, ...]) -> dict[str, np.ndarray]:
    """The arrays of one packed member (what np.frombuffer makes of it, FORMAT.md's recipe)."""
    size = sum(p.nbytes for p in parts)
    if len(raw) != size:
        raise ValueError(f"{len(raw)} bytes, the layout holds {size}")
    return {p.name: np.frombuffer(raw, p.dtype, p.count, p.offset).reshape(p.shape) for p in parts}


def encode(logits: np.ndarray, boxes: np.ndarray | None, topk: int | None) -> dict[str, bytes]:
    """One sample's member from its float logits (C,) / (K, C) and integer pixel boxes (K, 5) or None."""
    logits = np.asarray(logits, np.float32)
    if topk:
        t = torch.from_numpy(logits).log_softmax(-1)  # TOPK_VALUES
        # top-k of the fp32 log-probabilities, then rounded: the order never depends on fp16 ties
        values, idx = t.topk(min(topk, t.shape[-1]), dim=-1)
        member = pack(values.numpy().astype(np.float16), idx.numpy(), boxes, logits.shape[-1])
    else:
        member = pack(logits.astype(np.float16), None, boxes, logits.shape[-1])
    return {contract.TEACHER_EXT: member}


def decode(members: dict[str, bytes], teacher: dict, num_classes: int) -> dict[str, np.ndarray]:
    """The teacher arrays a sample holds (values, indices, boxes), as its set's teacher block lays them out."""
    return unpack(members[contract.TEACHER_EXT], contract.block_layout(teacher, num_classes))


def decode_legacy(members: dict[str, bytes]) -> dict[str, np.ndarray]:
    """The .npy members of a sample written before the packed member, as arrays (keys: their extensions)."""
    return {ext: np.load(io.BytesIO(members[ext]), allow_pickle=False)
            for ext in contract.LEGACY_TEACHER_EXTS if ext in members}


def pixel_boxes(relative: np.ndarray, width: int, height: int) -> np.ndarray:
    """Relative float32 boxes (K, 5) of a set before the packed member -> the integer pixel boxes the
    replay pipeline cut from them: round(x * width) in float32 as its graph computed it, the corner
    inside the image and the size at least 1 and inside it."""
    r = np.asarray(relative, np.float32)
    extent = np.array([width, height, width, height], np.float32)
    px = np.floor(r[:, :4] * extent + np.float32(0.5)).astype(np.int64)
    limit = np.array([width, height])
    anchor = np.clip(px[:, :2], 0, limit - 1)
    size = np.maximum(np.minimum(px[:, 2:4], limit - anchor), 1)
    return np.concatenate([anchor, size, (r[:, 4:5] > 0.5).astype(np.int64)], axis=1)


def legacy_to_packed(members: dict[str, bytes], num_classes: int, image_size: tuple[int, int] | None
                     ) -> dict[str, bytes]:
    """A sample's old .npy teacher members as the packed member (`kdkit add-teacher-logits --repack`);
    image_size (width, height) as decoded, for the view boxes."""
    old = decode_legacy(members)
    if contract.LEGACY_LOGITS_EXT in old:
        values, indices = old[contract.LEGACY_LOGITS_EXT], None
    else:
        values, indices = old[contract.LEGACY_TOPK_VALUES_EXT], old[contract.LEGACY_TOPK_INDICES_EXT]
    boxes = old.get(contract.LEGACY_VIEWS_EXT)
    if boxes is not None:
        boxes = pixel_boxes(boxes, *image_size)
    return {contract.TEACHER_EXT: pack(values.astype(np.float16), indices, boxes, num_classes)}


def without_teacher(members: dict[str, bytes]) -> dict[str, bytes]:
    """A sample's own members: older teacher outputs are replaced, never mixed with new ones."""
    return {ext: data for ext, data in members.items() if ext not in TEACHER_EXTS}


def tar_bytes(key: str, ext: str, size: int) -> int:
    """Bytes a member takes inside a tar: its header block(s) plus data padded to 512."""
    ti = tarfile.TarInfo(f"{key}.{ext}")
    ti.size = size
    header = len(ti.tobuf(tarfile.DEFAULT_FORMAT, "utf-8", "surrogateescape"))
    return header + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def added_bytes(key: str, teacher_members: dict[str, bytes]) -> tuple[int, int]:
    """(payload, in-tar) bytes the teacher members add to one sample."""
    payload = sum(len(v) for v in teacher_members.values())
    return payload, sum(tar_bytes(key, ext, len(v)) for ext, v in teacher_members.items())
