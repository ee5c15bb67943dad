"""`kdkit verify` passes a good set and names exactly what is wrong with a damaged one."""
from __future__ import annotations

import shutil
import tarfile

import pytest

from kdkit.cli import main
from kdkit.shards import tario


@pytest.fixture
def fresh_set(tiny_shards, tmp_path):
    dst = tmp_path / "set"
    shutil.copytree(tiny_shards, dst)
    return dst


def run_verify(capsys, *args):
    code = main(["verify", *map(str, args), "--quiet"])
    return code, capsys.readouterr().out


def test_good_set_passes_with_decode(fresh_set, capsys):
    code, out = run_verify(capsys, fresh_set, "--decode")
    assert code == 0
    assert "train: OK: 3 shards, 24 samples, every image decodes" in out
    assert "val: OK" in out


def test_tampered_byte_is_caught(fresh_set, capsys):
    tar = fresh_set / "train" / "train-000001.tar"
    data = bytearray(tar.read_bytes())
    data[3000] ^= 0xFF  # same size, different content
    tar.write_bytes(bytes(data))
    code, out = run_verify(capsys, fresh_set / "train")
    assert code == 1
    assert "train-000001.tar: checksum differs" in out


def test_truncated_tar_is_caught(fresh_set, capsys):
    tar = fresh_set / "train" / "train-000000.tar"
    tar.write_bytes(tar.read_bytes()[:2500])
    code, out = run_verify(capsys, fresh_set)
    assert code == 1
    assert "train-000000.tar" in out and "truncated" in out


def test_missing_shard_and_index(fresh_set, capsys):
    (fresh_set / "train" / "train-000002.tar").unlink()
    (fresh_set / "val" / "val-000000.idx").unlink()
    code, out = run_verify(capsys, fresh_set)
    assert code == 1
    assert "train-000002.tar: missing" in out
    assert "val-000000.idx: DALI index missing" in out
    # the index can be rebuilt from the tar
    code, out = run_verify(capsys, fresh_set / "val", "--fix-index")
    assert code == 0


def test_corrupt_image_found_only_with_decode(fresh_set, capsys):
    # rewrite one shard with a broken image, keeping the manifest in step so only --decode can tell
    import json

    folder = fresh_set / "train"
    tar = folder / "train-000000.tar"
    samples = [dict(members, __key__=key) for key, members in tario.iter_tar_samples(tar)]
    bad_key = samples[1]["__key__"]
    samples[1]["jpg"] = samples[1]["jpg"][:200]
    rec = tario.write_shard(tar, samples)
    man = json.loads((folder / "manifest.json").read_text())
    man["shards"][0].update(bytes=rec["bytes"], sha256=rec["sha256"])
    (folder / "manifest.json").write_text(json.dumps(man))
    assert run_verify(capsys, folder)[0] == 0
    code, out = run_verify(capsys, folder, "--decode")
    assert code == 1
    assert f"sample {bad_key} image does not decode" in out


def test_not_a_shard_set(tmp_path, capsys):
    assert main(["verify", str(tmp_path), "--quiet"]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_extra_tar_reported(fresh_set, capsys):
    with tarfile.open(fresh_set / "train" / "stray.tar", "w"):
        pass
    code, out = run_verify(capsys, fresh_set / "train")
    assert code == 1 and "stray.tar: tar not listed" in out


@pytest.mark.slow
def test_output_into_a_closed_pipe_is_no_traceback(tiny_shards):
    """`kdkit verify SET | head -1`: the reader closes the pipe early; kdkit stops quietly, as a process
    killed by SIGPIPE would."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # every write to stdout now fails with EPIPE, as after `head` has exited
    try:
        r = subprocess.run([sys.executable, "-m", "kdkit", "verify", str(tiny_shards), "--quiet"], stdout=write,
                           stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write)
    assert r.returncode == 141 and r.stderr == "", r.stderr
