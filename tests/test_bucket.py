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
