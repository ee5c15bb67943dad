"""Shard sets in a bucket: written, read, verified and trained on from s3:// on a local S3-compatible
server (moto, tests/conftest.py), byte-identical to the same set on local disk."""
from __future__ import annotations

import json

import pytest

from conftest import make_class_tree, shard_cfg
from kdkit.shards import contract
from kdkit.shards.location import location
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


def assert_same_set(local_folder, url: str) -> None:
    """Every file of the local set is an object of the bucket set with the same bytes; manifests may differ
    only in the command line that made them (it names the output: the folder, or the URL)."""
    local, remote = files(local_folder), objects(url)
    assert sorted(remote) == sorted(local)
    for name in local:
        if name.endswith(contract.MANIFEST):
            mine, theirs = json.loads(local[name]), json.loads(remote[name])
            mine.pop("command"), theirs.pop("command")
            assert mine == theirs, name
        else:
            assert remote[name] == local[name], name


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
    assert list(man["teacher"]["members"].values()) == [contract.TEACHER_EXT] and man["num_samples"] == 18


def test_teacher_pass_in_place_in_a_bucket_swaps_each_shard_whole(tmp_path, bucket):
    """--in-place on a bucket set: each new shard uploaded under the state prefix, then copied over the old one
    (S3 has no rename); the set ends as the local --out pass writes it."""
    from kdkit.teach import TeacherPassConfig, TeacherSpec, add_teacher_logits

    data = set_in_bucket(tmp_path, f"{bucket}/set")
    write_dataset(list_folder(tmp_path / "raw"), tmp_path / "set", shard_cfg())
    run = dict(teachers=[TeacherSpec(tiny_teacher(tmp_path / "t.pth"))], batch_size=8, threads=1, progress=False,
               device="cpu", splits=["val"])
    add_teacher_logits(TeacherPassConfig(shards=tmp_path / "set", out=tmp_path / "kd", **run))
    add_teacher_logits(TeacherPassConfig(shards=data, in_place=True, **run))
    remote = objects(str(data))
    local = files(tmp_path / "kd")
    assert {k: v for k, v in remote.items() if k.startswith("val/") and k.endswith((".tar", ".idx"))} == \
        {k: v for k, v in local.items() if k.endswith((".tar", ".idx"))}
    assert not list((data / "val" / contract.STATE_DIR / "teacher").glob("*.tar"))  # the staged copies moved


@pytest.mark.slow
def test_bench_loader_and_lr_find_read_a_bucket(tmp_path, bucket, capsys):
    from kdkit.cli import main

    data = set_in_bucket(tmp_path, f"{bucket}/set")
    assert main(["bench-loader", str(data), "--batch-size", "4", "--threads", "1", "--size", "32", "--batches", "2",
                 "--warmup", "1", "--shuffle-buffer", "8", "--device", "cpu", "--no-baseline",
                 "--json", str(tmp_path / "b.json")]) == 0
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["shard_folder"] == f"{data}/train" and report["results"][0]["images"] >= 8
    assert main(["lr-find", str(data), *TRAIN, "--num-steps", "5", "--output", str(tmp_path / "runs")]) == 0
    found = json.loads((tmp_path / "runs" / "lr-find-test_efficientnet" / "lr_find.json").read_text())
    assert len(found["lrs"]) == 5


# ---------------------------------------------------------------------------------------------
# faults: each one line naming the URL (never a credential), exit status 2, nothing lost

def one_line(capsys) -> str:
    """The one error line on stderr (a command may first say where it runs); no traceback."""
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("kdkit: error: ") and not any("Traceback" in e for e in err), err
    assert not any(e.startswith(("kdkit: error", "Error", "  File")) for e in err[:-1]), err
    return err[-1]


def test_unknown_schemes_and_credentials_in_urls_are_refused(capsys, tmp_path):
    from kdkit.cli import main

    with pytest.raises(SystemExit) as e:
        main(["verify", "hdfs://cluster/sets/food"])
    assert e.value.code == 2
    line = one_line(capsys)
    assert "hdfs://cluster/sets/food" in line and "does not read hdfs://" in line
    # a config's data reaches the same check (kdkit train takes DATA as text)
    assert main(["train", "teacher", "azure://acct/sets/food", "--model", "test_efficientnet", "--output",
                 str(tmp_path / "runs"), "--no-progress"]) == 2
    assert "azure://acct/sets/food: kdkit does not read azure:// URLs" in one_line(capsys)
    with pytest.raises(SystemExit):
        main(["verify", "s3://AKIAEXAMPLE:hunter2@bucket/sets/food?X-Amz-Security-Token=tok"])
    line = one_line(capsys)
    assert "s3://bucket/sets/food" in line and not any(s in line for s in ("hunter2", "AKIAEXAMPLE", "tok"))


def test_missing_bucket_and_prefix_are_one_line(bucket, capsys):
    from kdkit.cli import main

    assert main(["verify", "s3://no-such-bucket-kdkit/sets/food"]) == 2
    assert "s3://no-such-bucket-kdkit: no such bucket at http://127.0.0.1:" in one_line(capsys)
    assert main(["verify", f"{bucket}/nothing-here"]) == 2
    assert f"{bucket}/nothing-here: no such object" in one_line(capsys)  # as a local folder: No such file


def set_in_bucket(tmp_path, url: str, **kw):
    root = tmp_path / "raw"
    make_class_tree(root, splits=("train", "val"), **kw)
    write_dataset(list_folder(root), url, shard_cfg())
    return location(url)


def test_image_headers_of_unchecked_bucket_shards_are_read_from_the_bucket(tmp_path, bucket):
    """What a reader does with shards no checksum vouched for (KDKIT_CHECKSUMS=0, or no manifest record):
    walk their image headers before DALI; from a bucket too, and a damaged header is named."""
    from kdkit.shards.headers import check_headers
    from kdkit.shards.reader import ShardError

    data = set_in_bucket(tmp_path, f"{bucket}/set")
    tars = sorted((data / "train").glob("*.tar"))
    assert tars
    check_headers(tars)  # every image of the set parses
    body = tars[0].read_bytes()
    start = body.index(b"\xff\xd8\xff")  # the first JPEG: keep its size, zero its header
    tars[0].write_bytes(body[:start + 2] + bytes(64) + body[start + 66:])
    with pytest.raises(ShardError, match=str(tars[0]).replace(".", r"\.")):
        check_headers(tars)


# a shuffle buffer smaller than the set: DALI fills a larger one by reading the set round and round, one
# request per member and sample from a bucket
TRAIN = ["--model", "test_efficientnet", "--image-size", "32", "--batch-size", "4", "--loader-threads", "1",
         "--shuffle-buffer", "16", "--device", "cpu", "--no-progress"]


def test_missing_or_truncated_objects_stop_before_training_naming_them(tmp_path, bucket, capsys):
    from kdkit.cli import main

    data = set_in_bucket(tmp_path, f"{bucket}/set")
    tar = data / "train" / "train-000001.tar"
    whole = tar.read_bytes()
    tar.unlink()
    runs = ["--output", str(tmp_path / "runs"), "--epochs", "1"]
    assert main(["train", "teacher", str(data), *TRAIN, *runs]) == 2
    assert f"{tar}: shard missing" in one_line(capsys)
    tar.write_bytes(whole[:len(whole) // 2])
    assert main(["train", "teacher", str(data), *TRAIN, *runs]) == 2
    line = one_line(capsys)
    assert f"{tar}: sample" in line and "truncated shard?" in line
    assert main(["verify", str(data)]) == 1  # and verify names it against the manifest
    assert f"PROBLEM {tar}: {len(whole) // 2} bytes, manifest says {len(whole)}" in capsys.readouterr().out


def test_a_shard_changed_in_the_bucket_is_refused_by_its_checksum(tmp_path, bucket, monkeypatch):
    from kdkit.shards.reader import ShardError, check_checksums, resolve_shards

    monkeypatch.setenv("KDKIT_CACHE", str(tmp_path / "cache"))
    data = set_in_bucket(tmp_path, f"{bucket}/set")
    shards = resolve_shards(data, "train")
    check_checksums(shards, shards.tars, progress=False)  # every shard read once, remembered by its ETag
    tar = shards.tars[1]
    damaged = bytearray(tar.read_bytes())
    damaged[700] ^= 0xFF  # inside the first image: same size, other bytes, a new upload
    tar.write_bytes(bytes(damaged))
    with pytest.raises(ShardError, match=f"{tar}: its bytes differ from the checksum in its manifest"):
        check_checksums(shards, shards.tars, progress=False)


def test_wrong_or_missing_credentials_are_one_line_and_never_printed(tmp_path, bucket, s3_server, monkeypatch,
                                                                     capsys):
    import urllib.request

    import s3fs

    from kdkit.cli import main

    data = set_in_bucket(tmp_path, f"{bucket}/set")

    def auth(count: str):  # moto checks signatures against its IAM users after `count` more requests
        urllib.request.urlopen(urllib.request.Request(f"{s3_server}/moto-api/reset-auth", data=count.encode(),
                                                      method="POST", headers={"Content-Type": "text/plain"}))

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
    s3fs.S3FileSystem.clear_instance_cache()
    auth("0")
    try:
        assert main(["verify", str(data)]) == 2
    finally:
        auth("inf")
    line = one_line(capsys)
    assert f"{data}/" in line and "http://127.0.0.1:" in line and "refused access" in line
    assert "check the credentials" in line
    assert "wrong-secret-value" not in line and "AKIAWRONGKEY" not in line

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    s3fs.S3FileSystem.clear_instance_cache()
    assert main(["verify", str(data)]) == 2
    line = one_line(capsys)
    assert f"{data}/" in line and "no credentials for s3://" in line and "AWS_PROFILE" in line


def test_store_going_away_mid_upload_then_a_rerun_completes_the_same_set(tmp_path, bucket, relay, monkeypatch,
                                                                         capsys):
    from kdkit.cli import main
    from kdkit.shards import resume

    root = tmp_path / "raw"
    make_class_tree(root)  # 18 images: 4 shards of 5
    args = ["shard", "folder", str(root)]
    opts = ["--samples-per-shard", "5", "--workers", "1", "--quiet"]
    assert main([*args, str(tmp_path / "set"), *opts]) == 0
    real, calls = resume.ShardJob.write, []

    def write(self, name, samples, extra=None):
        if len(calls) == 2:
            relay.stop()  # the store goes away after two shards were uploaded and recorded
        calls.append(name)
        return real(self, name, samples, extra)

    with monkeypatch.context() as m:
        m.setattr(resume.ShardJob, "write", write)
        assert main([*args, f"{bucket}/set", *opts]) == 2
    line = one_line(capsys)
    assert f"{bucket}/set/train/" in line and f"cannot reach {relay.url}" in line
    assert "nothing written is lost" in line
    relay.start()
    assert not (location(bucket) / "set" / "train" / contract.MANIFEST).exists()
    assert main([*args, f"{bucket}/set", *opts[:-1]]) == 0  # without --quiet: it says what it kept
    assert "train: resuming, 2 of 4 shards already written and kept" in capsys.readouterr().err
    local, remote = files(tmp_path / "set"), objects(f"{bucket}/set")
    assert sorted(remote) == sorted(local) and all(remote[k] == local[k] for k in local)


@pytest.mark.slow
def test_store_going_away_mid_training_stops_keeps_the_checkpoint_and_resumes(tmp_path, bucket, relay,
                                                                               monkeypatch, capsys):
    from kdkit.cli import main
    from kdkit.train import loop

    data = set_in_bucket(tmp_path, f"{bucket}/set", per_class=12)  # 36 train images: 9 steps of 4
    real = loop.train_one_epoch

    def epoch(p, e, *a, **k):
        if e == 1:
            relay.stop()  # the store goes away after epoch 1 was trained and checkpointed
        return real(p, e, *a, **k)

    runs = tmp_path / "runs"
    run = [*TRAIN, "--output", str(runs), "--name", "r", "--epochs", "2"]
    with monkeypatch.context() as m:
        m.setattr(loop, "train_one_epoch", epoch)
        assert main(["train", "teacher", str(data), *run]) == 2
    line = one_line(capsys)
    assert f"{data}/" in line and f"reading from {relay.url} failed" in line and "--resume" in line
    rows = [json.loads(r) for r in (runs / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1] and (runs / "r" / "last.pth").exists()
    relay.start()
    assert main(["train", "teacher", str(data), *run, "--resume"]) == 0
    rows = [json.loads(r) for r in (runs / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]


# `kdkit shard` into a bucket, in a process that SIGKILLs itself in the middle of uploading its third shard:
# uploads are cut into parts of 8 KB here, and the process dies as the tar's second part is sent (its first
# part uploaded, the upload never completed): a kill -9 mid-upload at a known point, no timing involved
KILLED_MID_UPLOAD = """
import os, signal, sys
import s3fs
import s3fs.core

s3fs.core.calculate_chunksize = lambda size, chunksize=None, **kw: 8192
real = s3fs.S3FileSystem._call_s3

async def call(self, method, *args, **kw):
    if method == "upload_part" and kw.get("Key", "").endswith("train-000002.tar") and kw.get("PartNumber") == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return await real(self, method, *args, **kw)

s3fs.S3FileSystem._call_s3 = call
from kdkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_9_mid_upload_then_rerun_gives_the_local_set(tmp_path, bucket, s3_server):
    import os
    import signal
    import subprocess
    import sys

    import s3fs

    from conftest import s3_env

    root = tmp_path / "raw"
    make_class_tree(root, per_class=8, size=(96, 96))  # 24 images, shards of 4: ~40 KB, 5 parts each
    args, opts = ["shard", "folder", str(root)], ["--samples-per-shard", "4", "--workers", "1", "--quiet"]
    env = {**os.environ, **s3_env(s3_server)}
    run = dict(capture_output=True, text=True, env=env, timeout=240)
    subprocess.run([sys.executable, "-m", "kdkit", *args, str(tmp_path / "set"), *opts], check=True, **run)
    out = f"{bucket}/set"
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_UPLOAD, *args, out, *opts], **run)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    fs = s3fs.S3FileSystem(use_listings_cache=False)
    name = bucket.split("://")[1]
    pending = fs.call_s3("list_multipart_uploads", Bucket=name).get("Uploads", [])
    assert [u["Key"] for u in pending] == ["set/train/train-000002.tar"]  # killed mid-upload indeed
    assert sorted(p.name for p in location(out).glob("train/*.tar")) == ["train-000000.tar", "train-000001.tar"]
    assert not (location(out) / "train" / contract.MANIFEST).exists()
    again = subprocess.run([sys.executable, "-m", "kdkit", *args, out, *opts[:-1]], **run)
    assert again.returncode == 0, again.stderr
    assert "train: resuming, 2 of 6 shards already written and kept" in again.stderr
    assert fs.call_s3("list_multipart_uploads", Bucket=name).get("Uploads", []) == []  # the dead upload aborted
    assert_same_set(tmp_path / "set", out)


# ---------------------------------------------------------------------------------------------
# end to end: shard into the bucket -> teacher pass bucket -> bucket -> torchrun --nproc_per_node 2 student
# training from the bucket -> eval from the bucket; nothing on local disk but the raw images and the run

RECORDING_RANK = """
import json, os, sys
from kdkit.train import loop

seen, state = {}, {}
real_epoch, real_step = loop.train_one_epoch, loop.train_step

def epoch(p, e, *a, **k):
    state["epoch"] = e
    return real_epoch(p, e, *a, **k)

def step(p, batch, *a, **k):
    seen.setdefault(state["epoch"], []).extend(batch.labels.view(-1).tolist())
    return real_step(p, batch, *a, **k)

loop.train_one_epoch, loop.train_step = epoch, step
from kdkit.cli import main
code = main(sys.argv[1:])
with open(os.path.join(os.environ["SEEN_DIR"], f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump(seen, f)
sys.exit(code)
"""


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bucket_end_to_end_shard_teacher_torchrun_student_eval(tmp_path, bucket, s3_server):
    import os
    import socket
    import subprocess
    import sys

    import torch

    from conftest import s3_env
    from test_teacher import kdkit_ckpt

    classes = 16  # one image per class, so a label names its sample
    make_class_tree(tmp_path / "raw", [f"c{c:02d}" for c in range(classes)], per_class=1, seed=3, size=(40, 48),
                    splits=("train", "val"))
    secrets = {"AWS_ACCESS_KEY_ID": "AKIAKDKITE2EKEY", "AWS_SECRET_ACCESS_KEY": "kdkit-e2e-secret-value"}
    env = {**os.environ, **s3_env(s3_server), **secrets, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    kdkit = [sys.executable, "-m", "kdkit"]
    said = []  # everything the commands printed

    def run(*cmd, **kw):
        r = subprocess.run(cmd, capture_output=True, text=True, env={**env, **kw}, timeout=400)
        assert r.returncode == 0, r.stderr[-3000:]
        said.append(r.stdout + r.stderr)
        return r

    data, kd = f"{bucket}/set", f"{bucket}/set-kd"
    run(*kdkit, "shard", "folder", str(tmp_path / "raw"), data, "--samples-per-shard", "3", "--workers", "1",
        "--quiet")
    ckpt = kdkit_ckpt(tmp_path / "teacher.pth", 0, torch.rand(8, 3, 32, 32) * 2 - 1, num_classes=classes)
    run(*kdkit, "add-teacher-logits", data, "--checkpoint", str(ckpt), "--out", kd, "--device", "cpu",
        "--batch-size", "8", "--threads", "1", "--quiet")
    assert run(*kdkit, "verify", kd).stdout.count(": OK:") == 2

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "rank.py"
    script.write_text(RECORDING_RANK)
    runs = tmp_path / "runs"
    run(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
        str(script), "train", "student", kd, "--kd", "stored", *TRAIN, "--epochs", "2", "--output", str(runs),
        "--name", "s", SEEN_DIR=str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for e in ("0", "1"):  # each rank its half, together every sample exactly once per epoch
        halves = [r[e] for r in ranks]
        assert len(halves[0]) == len(halves[1]) == classes // 2
        assert sorted(halves[0] + halves[1]) == list(range(classes)), e
    rows = [json.loads(r) for r in (runs / "s" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert f"data: {kd}" in (runs / "s" / "config.yaml").read_text()  # the URL, as given, in the run folder

    # eval from the bucket = eval of the same images on local disk
    run(*kdkit, "shard", "folder", str(tmp_path / "raw"), str(tmp_path / "local"), "--samples-per-shard", "3",
        "--workers", "1", "--quiet")
    reports = []
    for where in (kd, str(tmp_path / "local")):
        out = tmp_path / f"eval-{len(reports)}.json"
        run(*kdkit, "eval", str(runs / "s" / "last.pth"), "--data", where, "--device", "cpu", "--json", str(out),
            "--out", str(tmp_path / f"eval-{len(reports)}"), "--no-plots")
        reports.append(json.loads(out.read_text()))
    assert reports[0]["data"]["path"] == f"{kd}/val" and reports[0]["metrics"]["num_samples"] == classes
    assert reports[0]["metrics"] == reports[1]["metrics"]

    # no credential printed, logged or stored: not in any output, run folder, eval output or object written
    written = {str(f): f.read_bytes() for f in tmp_path.rglob("*") if f.is_file() and f.name != "rank.py"}
    import s3fs

    store = s3fs.S3FileSystem(use_listings_cache=False)  # every object in the bucket, job state included
    written.update({key: store.cat_file(key) for key in store.find(bucket.split("://", 1)[1])})
    for secret in secrets.values():
        assert not any(secret in text for text in said), secret
        assert [name for name, body in written.items() if secret.encode() in body] == [], secret


def test_stock_webdataset_and_timm_read_the_bucket_set_through_pipe_urls(tmp_path, bucket):
    """What docs/scale.md tells webdataset and timm users: `pipe:python -m kdkit.shards.location URL`."""
    import webdataset as wds
    from timm.data import create_dataset

    from conftest import read_with_webdataset
    from kdkit.shards.location import PIPE, webdataset_url

    data = set_in_bucket(tmp_path, f"{bucket}/set")
    write_dataset(list_folder(tmp_path / "raw"), tmp_path / "set", shard_cfg())
    want = read_with_webdataset(tmp_path / "set" / "train")
    tars = [webdataset_url(t) for t in sorted((data / "train").glob("*.tar"))]
    assert tars[0] == f"{PIPE} {data}/train/train-000000.tar"
    got = {s["__key__"]: (s["jpg"], int(s["cls"])) for s in wds.WebDataset(tars, shardshuffle=False, empty_check=False)}
    assert got == want
    ds = create_dataset("wds/", root=f"{PIPE} {data}", split="train")  # timm reads _info.json, then the shards
    labels = sorted(int(target) for _, target in ds)
    assert labels == sorted(label for _, label in want.values())
