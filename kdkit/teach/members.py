"""Teacher outputs <-> the .npy members of a sample, as the shard contract names and types them.

Full logits are fp16 (C,) or (K, C); top-k storage keeps the k largest as fp16 values plus int32
class indices, (k,) or (K, k), which bounds the size for many-class teachers (1000 classes: 2 KB a
view in full, 40 bytes at k=10). Top-k values are log-probabilities, log_softmax of the logits
(TOPK_VALUES): logits of the same distribution (a softmax over them is the softmax over the same k
raw logits, at any temperature) that also keep the mass of the classes left out, 1 - sum(exp(values)),
for FKD's marginal smoothing (kdkit.train.kd.dense_logits_from_topk). Views are float32 (K, 5).
Everything is a plain .npy, so DALI decodes it in-graph and webdataset users read it with np.load.
"""
from __future__ import annotations

import io
import tarfile

import numpy as np
import torch

from kdkit.shards import contract

TOPK_VALUES = "log_softmax"  # the teacher block's `topk_values`: what top-k values are (absent: raw logits)
TEACHER_EXTS = (contract.LOGITS_EXT, contract.TOPK_VALUES_EXT, contract.TOPK_INDICES_EXT, contract.VIEWS_EXT)


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def npy_load(raw: bytes) -> np.ndarray:
    return np.load(io.BytesIO(raw), allow_pickle=False)


def member_names(topk: int | None, views: bool) -> dict[str, str]:
    """The members a teacher block promises in every sample (what `kdkit verify` checks)."""
    names = ({"topk_values": contract.TOPK_VALUES_EXT, "topk_indices": contract.TOPK_INDICES_EXT} if topk
             else {"logits": contract.LOGITS_EXT})
    if views:
        names["views"] = contract.VIEWS_EXT
    return names


def encode(logits: np.ndarray, boxes: np.ndarray | None, topk: int | None) -> dict[str, bytes]:
    """One sample's members from its float logits (C,) / (K, C) and boxes (K, 5) or None."""
    out: dict[str, bytes] = {}
    if topk:
        t = torch.from_numpy(np.asarray(logits, np.float32)).log_softmax(-1)  # TOPK_VALUES
        # top-k of the fp32 log-probabilities, then rounded: the order never depends on fp16 ties
        values, idx = t.topk(min(topk, t.shape[-1]), dim=-1)
        out[contract.TOPK_VALUES_EXT] = npy_bytes(values.numpy().astype(np.float16))
        out[contract.TOPK_INDICES_EXT] = npy_bytes(idx.numpy().astype(np.int32))
    else:
        out[contract.LOGITS_EXT] = npy_bytes(np.asarray(logits).astype(np.float16))
    if boxes is not None:
        out[contract.VIEWS_EXT] = npy_bytes(np.asarray(boxes, np.float32))
    return out


def decode(members: dict[str, bytes]) -> dict[str, np.ndarray]:
    """The teacher members a sample holds, as arrays (keys: the member extensions)."""
    return {ext: npy_load(members[ext]) for ext in TEACHER_EXTS if ext in members}


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
