"""Shard sets in a bucket: written, read, verified and trained on from s3:// on a local S3-compatible
server (moto, tests/conftest.py), byte-identical to the same set on local disk."""
from __future__ import annotations

import hashlib
import json

import pytest

from conftest import make_class_tree, shard_cfg
from kdkit.shards import contract
from kdkit.shards.location import BucketPath, location
from kdkit.shards.sources.folder import list_folder
from kdkit.shards.writer import write_dataset


def objects(prefix: str) -> dict[str, bytes]:
    """{relative key: bytes} of every object under a prefix (the plan and records left out)."""
    import s3fs

    fs = s3fs.S3FileSystem(use_listings_cache=False)
    base = prefix.split("://", 1)[1]
    return {k[len(base) + 1:]: fs.cat_file(k) for k in fs.find(base) if f"/{contract.STATE_DIR}/" not in k}


def files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and contract.STATE_DIR not in p.parts}


def test_shard_into_a_bucket_is_byte_identical_to_local(tmp_path, bucket):
    root = tmp_path / "raw"
    make_class_tree(root, splits=("train", "val"))
    write_dataset(list_folder(root), tmp_path / "set", shard_cfg())
    write_dataset(list_folder(root), f"{bucket}/set", shard_cfg())
    local, remote = files(tmp_path / "set"), objects(f"{bucket}/set")
    assert sorted(remote) == sorted(local)
    for name in local:
        assert remote[name] == local[name], name


def tiny_teacher(path):
    """A random resnet18 checkpoint at 32 px for 3 classes (the teacher tests' kind, BN set on noise)."""
    import torch

    from test_teacher import kdkit_ckpt

    return kdkit_ckpt(path, 0, torch.rand(8, 3, 32, 32) * 2 - 1)


def test_teacher_pass_from_a_bucket_into_a_bucket_equals_the_local_pass(tmp_path, bucket):
    from kdkit.teach import TeacherPassConfig, TeacherSpec, add_teacher_logits

    root = tmp_path / "raw"
    make_class_tree(root, splits=("train", "val"))
    ckpt = tiny_teacher(tmp_path / "t.pth")
    write_dataset(list_folder(root), tmp_path / "set", shard_cfg())
    write_dataset(list_folder(root), f"{bucket}/set", shard_cfg())
    run = dict(teachers=[TeacherSpec(ckpt)], batch_size=8, threads=1, progress=False, device="cpu")
    add_teacher_logits(TeacherPassConfig(shards=tmp_path / "set", out=tmp_path / "kd", **run))
    reports = add_teacher_logits(TeacherPassConfig(shards=location(f"{bucket}/set"), out=location(f"{bucket}/kd"),
                                                   **run))
    assert [(r.split, r.complete) for r in reports] == [("train", True), ("val", True)]
    local, remote = files(tmp_path / "kd"), objects(f"{bucket}/kd")
    assert sorted(remote) == sorted(local) and all(remote[k] == local[k] for k in local)
    man = json.loads(remote["train/manifest.json"])
    assert list(man["teacher"]["members"].values()) == [contract.LOGITS_EXT] and man["num_samples"] == 18
