"""Shared fixtures: tiny generated datasets and shard sets, so every test runs in seconds."""
from __future__ import annotations

import io
import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CLASSES = ["cat", "dog", "eel"]


def shard_cfg(**kw):
    """A ShardConfig for tests: one worker, no progress bars, 5 samples per shard unless given."""
    from kdkit.shards.writer import ShardConfig

    return ShardConfig(**{"workers": 1, "progress": False, "samples_per_shard": 5, **kw})


def read_with_webdataset(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Stock webdataset, no kdkit code: {key: (jpg bytes, label)}; a sample seen twice fails."""
    import webdataset as wds

    out = {}
    for s in wds.WebDataset(sorted(str(p) for p in folder.glob("*.tar")), shardshuffle=False, empty_check=False):
        assert s["__key__"] not in out, "a sample appears twice"
        out[s["__key__"]] = (s["jpg"], int(s["cls"]))
    return out


def jpeg_bytes(rng: np.random.Generator, h: int = 40, w: int = 52, quality: int = 90) -> bytes:
    """A random but smooth-ish RGB JPEG (smooth so JPEG round trips are meaningful)."""
    small = rng.integers(0, 255, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def teacher_member(values, indices=None, boxes=None, num_classes: int = 4) -> dict[str, bytes]:
    """A sample's packed teacher member (kdkit.teach.members.pack) from its arrays."""
    from kdkit.shards import contract
    from kdkit.teach.members import pack

    return {contract.TEACHER_EXT: pack(np.asarray(values, np.float16), indices, boxes, num_classes)}


def write_manifest(folder: Path, split: str, num_classes: int, teacher: dict | None = None) -> Path:
    """A manifest.json for tars written by hand in `folder` (every .tar, in name order), with a teacher
    block whose layout is the packed member's for its num_classes / topk / views (as the teacher pass
    writes it): what readers take the layout of the .teacher member from."""
    import json

    from kdkit.shards import contract, tario
    from kdkit.teach import members

    shards = []
    for tar in sorted(folder.glob("*.tar")):
        n = len(tario.parse_dali_index(tar.with_suffix(".idx")))
        shards.append(contract.ShardRecord(tar.name, tar.with_suffix(".idx").name, n, tar.stat().st_size,
                                           tario.sha256_file(tar)))
    classes = [contract.ClassInfo(i, f"c{i}") for i in range(num_classes)]
    man = contract.Manifest(split, classes, shards, {}, {}, "hand-made", "test")
    if teacher is not None:
        block = {"num_classes": num_classes, "topk": None, "views": None, "dtype": "float16", **teacher}
        layout = contract.teacher_layout(num_classes, block["topk"], block["views"])
        man.teacher = {**block, "members": members.member_names(), "layout": members.layout_json(layout)}
    (folder / contract.MANIFEST).write_text(json.dumps(man.to_json()))
    return folder / contract.MANIFEST


def make_class_tree(root: Path, classes=CLASSES, per_class: int = 6, seed: int = 0, size=(40, 52),
                    splits=("train",)) -> dict[str, dict[str, tuple[bytes, int]]]:
    """root/<split>/<class>/<class>_<i>.jpg; returns {split: {relpath: (bytes, label)}}."""
    rng = np.random.default_rng(seed)
    made: dict[str, dict[str, tuple[bytes, int]]] = {}
    for split in splits:
        made[split] = {}
        for label, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                data = jpeg_bytes(rng, *size)
                (d / f"{c}_{i}.jpg").write_bytes(data)
                made[split][f"{c}/{c}_{i}.jpg"] = (data, label)
    return made


@pytest.fixture
def class_tree(tmp_path):
    """A train/val class-folder dataset of 3 classes x 6 JPEGs, with the bytes written."""
    root = tmp_path / "raw"
    made = make_class_tree(root, splits=("train", "val"))
    return root, made


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """A finished shard set (train + val, 3 classes, 24/12 images of 64x80) written by kdkit itself."""
    from kdkit.shards.sources.folder import list_folder
    from kdkit.shards.writer import ShardConfig, write_dataset

    base = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(1)
    for split, n in (("train", 8), ("val", 4)):
        for c in CLASSES:
            d = base / "raw" / split / c
            d.mkdir(parents=True)
            for i in range(n):
                (d / f"{c}_{i}.jpg").write_bytes(jpeg_bytes(rng, 64, 80))
    out = base / "shards"
    write_dataset(list_folder(base / "raw"), out, ShardConfig(samples_per_shard=10, workers=1, progress=False))
    return out


def cuda_only(test):
    """A test of the GPU path: marked `gpu` (`pytest -m gpu`, scripts/gpu_check.sh) and skipped without CUDA."""
    import torch

    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test))


# ---------------------------------------------------------------------------------------------
# an S3-compatible store on this machine: moto's standalone server, in a process of its own (DALI's
# reader holds the GIL while it reads, so a server thread inside the test process could not answer it)

@pytest.fixture(scope="session")
def s3_server():
    """The endpoint URL of a moto S3 server on 127.0.0.1 (an ephemeral port), for the whole session."""
    import os
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # parts of multipart uploads may be small here (S3 wants 5 MiB): the tests cut tiny shards into parts
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "S3_UPLOAD_PART_MIN_SIZE": "1024"})
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto's S3 server did not start (is the test extra installed?)")
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=30)


def s3_env(endpoint: str) -> dict[str, str]:
    """Environment of a process that talks to the test server: its endpoint and dummy credentials, and no
    other source of credentials (no ~/.aws files, no instance metadata lookup)."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE":
            "/nonexistent", "AWS_EC2_METADATA_DISABLED": "true"}


_BUCKETS = itertools.count()  # a new bucket name for every test of the session


@pytest.fixture
def bucket(s3_relay, monkeypatch, request):
    """s3://<a new bucket> on the test server; this test's environment points at it (through the relay,
    see `relay`), with dummy credentials."""
    import re

    import s3fs

    for k, v in s3_env(s3_relay.url).items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()  # credentials are read when an instance is made
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + f"-{next(_BUCKETS)}"
    s3fs.S3FileSystem(use_listings_cache=False).mkdir(name)
    yield f"s3://{name}"
    s3fs.S3FileSystem.clear_instance_cache()


# a TCP relay in front of the test server, in a process of its own (DALI must reach it while it holds
# the GIL): stopping it is the store going away (connections refused), starting it again on the same
# port the store coming back, with everything it held
RELAY = r"""
import socket, sys, threading
listen, target = int(sys.argv[1]), int(sys.argv[2])
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", listen))
srv.listen(64)
print("ready", flush=True)

def pump(a, b):
    try:
        while data := a.recv(1 << 16):
            b.sendall(data)
    except OSError:
        pass
    for s in (a, b):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

while True:
    client, _ = srv.accept()
    try:
        upstream = socket.create_connection(("127.0.0.1", target))
    except OSError:
        client.close()
        continue
    threading.Thread(target=pump, args=(client, upstream), daemon=True).start()
    threading.Thread(target=pump, args=(upstream, client), daemon=True).start()
"""


class Relay:
    def __init__(self, target: str):
        import socket

        self.target = int(target.rsplit(":", 1)[1])
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url, self.proc = f"http://127.0.0.1:{self.port}", None

    def start(self):
        import subprocess
        import sys

        self.proc = subprocess.Popen([sys.executable, "-c", RELAY, str(self.port), str(self.target)],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def stop(self):
        self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def s3_relay(s3_server):
    """The relay every in-process bucket test talks through. One for the session: DALI keeps the S3 client
    (and its endpoint) it made first for the rest of the process."""
    r = Relay(s3_server)
    r.start()
    yield r
    r.stop()


@pytest.fixture
def relay(s3_relay, bucket):
    """The relay in front of the store, for a test to stop (the store goes away) and start again (it comes
    back with everything it held); started again after the test if the test left it stopped."""
    yield s3_relay
    if s3_relay.proc.poll() is not None:
        s3_relay.start()


class HostReads:
    """Counts the times code reads a tensor's values on the host (item, tolist, numpy, float/int/bool): on
    a GPU each one waits for the device to finish everything queued."""

    METHODS = ("item", "tolist", "numpy", "__float__", "__int__", "__bool__")

    def __init__(self, monkeypatch):
        import torch

        self.count = 0
        for name in self.METHODS:
            real = getattr(torch.Tensor, name)

            def counted(t, *a, _real=real, **kw):
                self.count += 1
                return _real(t, *a, **kw)
            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.fixture
def host_reads(monkeypatch):
    return lambda: HostReads(monkeypatch)
