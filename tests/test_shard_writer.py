"""The shard writer and the folder converter: round trips, odd files, resume, parts, refusals."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdkit import atomic
from kdkit.cli import main
from kdkit.errors import KdkitError
from kdkit.shards import contract, tario
from kdkit.shards.images import ImageOptions
from kdkit.shards.sources.folder import list_folder
from kdkit.shards.writer import ShardConfig, write_dataset

from conftest import CLASSES, jpeg_bytes, make_class_tree, read_with_webdataset
from conftest import shard_cfg as cfg


def shard_digests(folder: Path) -> dict[str, str]:
    return {p.name: tario.sha256_file(p) for p in sorted(folder.glob("*.tar"))} | {
        p.name: p.read_text() for p in sorted(folder.glob("*.idx"))}


def test_folder_round_trip_bytes_and_labels(class_tree, tmp_path):
    root, made = class_tree
    out = tmp_path / "shards"
    manifests = write_dataset(list_folder(root), out, cfg())
    assert set(manifests) == {"train", "val"}
    for split in ("train", "val"):
        got = read_with_webdataset(out / split)
        want = {contract.key_from_relpath(rel): v for rel, v in made[split].items()}
        assert got == want  # every image once, byte-identical JPEG, right label
        man = json.loads((out / split / contract.MANIFEST).read_text())
        assert man["num_samples"] == len(want)
        assert [c["id"] for c in man["classes"]] == CLASSES
        assert sum(s["num_samples"] for s in man["shards"]) == len(want)


def test_shards_interleave_classes(tmp_path):
    root = tmp_path / "raw"
    make_class_tree(root, per_class=10, size=(16, 16))
    out = tmp_path / "s"
    write_dataset(list_folder(root), out, cfg(samples_per_shard=10))
    for tar in sorted((out / "train").glob("*.tar")):
        labels = {lbl for _, m in tario.iter_tar_samples(tar) for lbl in [int(m["cls"])]}
        assert len(labels) >= 2, f"{tar.name} holds one class only"


def test_timm_info_matches_manifest(class_tree, tmp_path):
    root, _ = class_tree
    out = tmp_path / "shards"
    write_dataset(list_folder(root), out, cfg())
    info = json.loads((out / contract.TIMM_INFO).read_text())
    for split in ("train", "val"):
        man = json.loads((out / split / contract.MANIFEST).read_text())
        si = info["splits"][split]
        assert si["num_samples"] == man["num_samples"]
        assert si["filenames"] == [f"{split}/{s['tar']}" for s in man["shards"]]
        assert si["shard_lengths"] == [s["num_samples"] for s in man["shards"]]
        assert all((out / f).exists() for f in si["filenames"])


def test_dali_cpu_reads_what_we_write(class_tree, tmp_path):
    """DALI's own webdataset reader (CPU backend) with our index files and in-graph label parsing."""
    from nvidia.dali import fn, pipeline_def, types

    root, made = class_tree
    out = tmp_path / "shards"
    write_dataset(list_folder(root), out, cfg())
    folder = out / "train"
    man = json.loads((folder / contract.MANIFEST).read_text())
    tars = [str(folder / s["tar"]) for s in man["shards"]]
    idxs = [str(folder / s["idx"]) for s in man["shards"]]
    weights = np.array([10 ** (contract.LABEL_WIDTH - 1 - i) for i in range(contract.LABEL_WIDTH)], np.int32)

    @pipeline_def(batch_size=man["num_samples"], num_threads=1, device_id=None)
    def pipe():
        jpg, cls = fn.readers.webdataset(paths=tars, index_paths=idxs, ext=["jpg", "cls"],
                                         missing_component_behavior="error", dtypes=[types.UINT8, types.UINT8])
        img = fn.decoders.image(jpg, device="cpu", output_type=types.RGB)
        label = fn.reductions.sum((fn.cast(cls, dtype=types.INT32) - 48) * types.Constant(weights), axes=0)
        return img, label, jpg

    p = pipe()
    p.build()
    imgs, labels, jpgs = p.run()
    want = {v[0]: v[1] for v in made["train"].values()}
    got = {}
    for i in range(man["num_samples"]):
        raw = bytes(np.array(jpgs[i]))
        got[raw] = int(np.array(labels[i]))
        ref = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
        assert np.abs(np.array(imgs[i]).astype(int) - ref.astype(int)).mean() < 2.0
    assert got == want


def test_odd_files_become_decodable_rgb_jpegs(tmp_path):
    root = tmp_path / "raw"
    make_class_tree(root, per_class=2, size=(24, 24))
    Image.new("CMYK", (30, 20), (10, 200, 30, 0)).save(root / "train" / "cat" / "cmyk.jpg")
    Image.new("RGB", (30, 20), (9, 9, 9)).save(root / "train" / "dog" / "png_named.JPEG", format="PNG")
    Image.new("RGBA", (30, 20), (9, 9, 9, 128)).save(root / "train" / "dog" / "alpha.png")
    Image.new("RGB", (30, 20)).save(root / "train" / "eel" / "pic.bmp")
    out = tmp_path / "s"
    write_dataset(list_folder(root), out, cfg())
    got = read_with_webdataset(out / "train")
    for key in ("cat__cmyk", "dog__png_named", "dog__alpha", "eel__pic"):
        im = Image.open(io.BytesIO(got[key][0]))
        assert im.format == "JPEG" and im.mode == "RGB", key
        im.load()


def test_bad_images_skipped_reported_and_strict_fails(tmp_path):
    root = tmp_path / "raw"
    make_class_tree(root, per_class=3, size=(24, 24))
    good = (root / "train" / "eel" / "eel_0.jpg").read_bytes()
    (root / "train" / "eel" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "train" / "eel" / "garbage.jpg").write_bytes(b"not a jpeg at all")
    (root / "train" / "eel" / "empty.jpg").write_bytes(b"")
    (root / "train" / "cat" / "README.txt").write_text("notes")
    out = tmp_path / "s"
    write_dataset(list_folder(root), out, cfg())
    man = json.loads((out / "train" / contract.MANIFEST).read_text())
    assert man["num_samples"] == 9 and man["skipped"] == 3 and man["ignored_files"] == 1
    report = (out / "train" / contract.SKIP_REPORT).read_text()
    for name in ("truncated.jpg", "garbage.jpg", "empty.jpg", "README.txt"):
        assert name in report
    assert "truncated.jpg" not in str(read_with_webdataset(out / "train").keys())

    with pytest.raises(KdkitError, match=r"(truncated|garbage|empty)\.jpg"):
        write_dataset(list_folder(root), tmp_path / "strict", cfg(strict=True))


def test_max_size_and_quality_reencode(tmp_path):
    root = tmp_path / "raw"
    make_class_tree(root, per_class=2, size=(120, 90))
    out = tmp_path / "s"
    write_dataset(list_folder(root), out, cfg(image=ImageOptions(max_size=45, quality=80)))
    for data, _ in read_with_webdataset(out / "train").values():
        im = Image.open(io.BytesIO(data))
        assert min(im.size) == 45 and max(im.size) == 60


def test_refusals_are_one_line_errors(tmp_path, capsys):
    assert main(["shard", "folder", str(tmp_path / "nope"), str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    assert main(["shard", "folder", str(tmp_path / "empty"), str(tmp_path / "o2"), "--quiet"]) == 2
    assert "no class folders" in capsys.readouterr().err
    (tmp_path / "noimg" / "cat").mkdir(parents=True)
    (tmp_path / "noimg" / "cat" / "a.txt").write_text("x")
    assert main(["shard", "folder", str(tmp_path / "noimg"), str(tmp_path / "o3"), "--quiet"]) == 2
    assert "no images" in capsys.readouterr().err


def test_output_holding_another_set_is_not_overwritten(class_tree, tmp_path, capsys):
    root, _ = class_tree
    out = tmp_path / "shards"
    args = ["shard", "folder", str(root), str(out), "--samples-per-shard", "5", "--workers", "1", "--quiet"]
    assert main(args) == 0
    before = shard_digests(out / "train")
    # same command again: a finished set is left alone
    assert main(args) == 0
    assert shard_digests(out / "train") == before
    # different options into the same folder: refused, nothing touched
    assert main(args[:-5] + ["--samples-per-shard", "7", "--workers", "1", "--quiet"]) == 2
    assert "different shard set" in capsys.readouterr().err
    assert shard_digests(out / "train") == before
    # a folder with unrelated files
    other = tmp_path / "other" / "train"
    other.mkdir(parents=True)
    (other / "precious.txt").write_text("keep me")
    assert main(["shard", "folder", str(root), str(tmp_path / "other"), "--quiet", "--workers", "1"]) == 2
    assert (other / "precious.txt").read_text() == "keep me"


def test_resume_after_crash_is_identical(tmp_path, monkeypatch):
    root = tmp_path / "raw"
    make_class_tree(root, per_class=8, size=(32, 32))
    ref = tmp_path / "ref"
    write_dataset(list_folder(root), ref, cfg(samples_per_shard=3))

    out = tmp_path / "out"
    real = tario.atomic_write_json
    calls = {"n": 0}

    def crash_on_third_record(path, obj):
        if path.parent.name == contract.STATE_DIR and path.name.startswith("train-"):
            calls["n"] += 1
            if calls["n"] == 3:  # killed after the 3rd tar was renamed but before it was recorded
                atomic.temp_path(path.parent.parent / "train-000003.tar").write_bytes(b"half a tar")
                raise KeyboardInterrupt
        return real(path, obj)

    monkeypatch.setattr(tario, "atomic_write_json", crash_on_third_record)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(list_folder(root), out, cfg(samples_per_shard=3))
    monkeypatch.setattr(tario, "atomic_write_json", real)
    assert not (out / "train" / contract.MANIFEST).exists()
    assert not list((out / "train").glob("*.tmp")) and not list((out / "train").glob("*" + atomic.TMP_TAG))
    write_dataset(list_folder(root), out, cfg(samples_per_shard=3))
    assert shard_digests(out / "train") == shard_digests(ref / "train")
    assert json.loads((out / "train" / contract.MANIFEST).read_text())["shards"] == \
        json.loads((ref / "train" / contract.MANIFEST).read_text())["shards"]


# the writer run in a process that SIGKILLs itself in the middle of its third shard (after two samples of
# it went into the temp tar): a kill -9 at a known point, with no timing involved
KILLED_MID_SHARD = """
import os, signal, sys
from kdkit.shards import resume
real, calls = resume.ShardJob.write, []

def write(self, name, samples, extra=None):
    calls.append(name)
    if len(calls) < 3:
        return real(self, name, samples, extra)
    def cut():
        for n, sample in enumerate(samples):
            if n == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            yield sample
    return real(self, name, cut(), extra)

resume.ShardJob.write = write
from kdkit import atomic
from kdkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_9_then_rerun_gives_the_same_set(tmp_path):
    root = tmp_path / "raw"
    make_class_tree(root, per_class=40, size=(160, 160))
    ref, out = tmp_path / "ref", tmp_path / "out"
    args = ["shard", "folder", str(root)]
    opts = ["--samples-per-shard", "4", "--max-size", "64", "--workers", "1", "--quiet"]
    subprocess.run([sys.executable, "-m", "kdkit.cli", *args, str(ref), *opts], check=True, capture_output=True)
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_SHARD, *args, str(out), *opts], capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    folder = out / "train"
    assert not (folder / contract.MANIFEST).exists()
    assert len(list(folder.glob("*.tar"))) == 2  # two finished shards kept, the third never under its real name
    subprocess.run([sys.executable, "-m", "kdkit.cli", *args, str(out), *opts], check=True, capture_output=True)
    assert shard_digests(folder) == shard_digests(ref / "train")


def test_parts_write_disjoint_shards_of_one_set(class_tree, tmp_path):
    root, _ = class_tree
    ref, out = tmp_path / "ref", tmp_path / "out"
    write_dataset(list_folder(root), ref, cfg(samples_per_shard=2))
    r0 = write_dataset(list_folder(root), out, cfg(samples_per_shard=2, part=(0, 2)))
    assert r0["train"] is None  # not complete yet: no manifest
    assert not (out / "train" / contract.MANIFEST).exists()
    n_after_first = len(list((out / "train").glob("*.tar")))
    r1 = write_dataset(list_folder(root), out, cfg(samples_per_shard=2, part=(1, 2)))
    assert r1["train"] is not None
    assert 0 < n_after_first < len(list((out / "train").glob("*.tar")))
    assert shard_digests(out / "train") == shard_digests(ref / "train")


def test_the_part_comes_from_the_array_job_where_the_scheduler_tells_it(class_tree, tmp_path, monkeypatch, capsys):
    from kdkit.errors import OptionError
    from kdkit.options import scheduler_part

    assert scheduler_part({}) is None and scheduler_part({"SGE_TASK_ID": "undefined"}) is None
    # SLURM: --array=4-6 (ids from SLURM_ARRAY_TASK_MIN); SGE: -t 1-5:2 (ids 1, 3, 5)
    assert scheduler_part({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4",
                           "SLURM_ARRAY_TASK_COUNT": "3"})[:2] == (1, 3)
    assert scheduler_part({"SGE_TASK_ID": "3", "SGE_TASK_FIRST": "1", "SGE_TASK_LAST": "5",
                           "SGE_TASK_STEPSIZE": "2"})[:2] == (1, 3)
    with pytest.raises(OptionError, match="SLURM_ARRAY_TASK_ID=7 is not one of 3 evenly spaced tasks.*--part"):
        scheduler_part({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "3"})

    root, _ = class_tree
    ref, out = tmp_path / "ref", tmp_path / "out"
    write_dataset(list_folder(root), ref, cfg(samples_per_shard=2))
    args = ["shard", "folder", str(root), str(out), "--samples-per-shard", "2", "--workers", "1"]
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "0")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    assert main(args) == 0
    assert "--part 0/2, from the SLURM array task SLURM_ARRAY_TASK_ID=0 of 2" in capsys.readouterr().err
    assert not (out / "train" / contract.MANIFEST).exists()  # half the shards: the other task's are missing
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    assert main(args) == 0
    assert shard_digests(out / "train") == shard_digests(ref / "train")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "9")  # --part given wins over the scheduler's variables
    assert main([*args[:3], str(tmp_path / "all"), *args[4:], "--part", "0/1"]) == 0
    assert shard_digests(tmp_path / "all" / "train") == shard_digests(ref / "train")


def test_shard_size_mb_sets_shard_count(tmp_path):
    root = tmp_path / "raw"
    make_class_tree(root, per_class=10, size=(64, 64))
    out = tmp_path / "s"
    one = len(jpeg_bytes(np.random.default_rng(0), 64, 64)) + 1536
    write_dataset(list_folder(root), out, ShardConfig(shard_size_mb=one * 6 / 1e6, workers=1, progress=False))
    man = json.loads((out / "train" / contract.MANIFEST).read_text())
    assert 3 <= man["num_shards"] <= 10  # ~6 samples per shard for 30 samples


def test_parallel_workers_give_the_same_bytes(class_tree, tmp_path):
    root, _ = class_tree
    write_dataset(list_folder(root), tmp_path / "a", cfg(workers=1))
    write_dataset(list_folder(root), tmp_path / "b", cfg(workers=2))
    assert shard_digests(tmp_path / "a" / "train") == shard_digests(tmp_path / "b" / "train")


def test_unknown_class_in_val_is_refused(tmp_path):
    root = tmp_path / "raw"
    make_class_tree(root, splits=("train", "val"), per_class=1, size=(16, 16))
    (root / "val" / "fox").mkdir()
    (root / "val" / "fox" / "f.jpg").write_bytes((root / "val" / "cat" / "cat_0.jpg").read_bytes())
    with pytest.raises(KdkitError, match="fox"):
        list_folder(root)


def test_keys_are_stable_and_safe():
    assert contract.key_from_relpath("n01440764/n01440764_10026.JPEG") == "n01440764__n01440764_10026"
    odd = contract.key_from_relpath("my class/photo 1.v2.jpg")
    assert odd == contract.key_from_relpath("my class/photo 1.v2.jpg")
    assert set(odd) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
    assert contract.key_from_relpath("a/b.c.jpg") != contract.key_from_relpath("a/b_c.jpg")
    assert contract.encode_label(42) == b"000042" and contract.decode_label(b"000042") == 42
    with pytest.raises(ValueError):
        contract.encode_label(-1)


def test_cli_help_for_every_command(capsys):
    for argv in (["--help"], ["shard", "--help"], ["shard", "imagenet", "--help"], ["shard", "folder", "--help"],
                 ["shard", "list", "--help"], ["shard", "tfrecord", "--help"], ["shard", "hdf5", "--help"], ["verify", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
        assert "usage: kdkit" in capsys.readouterr().out


@pytest.mark.slow
def test_workers_are_spawned_safely_from_cli(class_tree, tmp_path):
    root, made = class_tree
    out = tmp_path / "s"
    r = subprocess.run([sys.executable, "-m", "kdkit.cli", "shard", "folder", str(root), str(out),
                        "--samples-per-shard", "4", "--workers", "2", "--quiet"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0, r.stderr
    assert len(read_with_webdataset(out / "train")) == len(made["train"])


def test_a_small_member_takes_one_header_and_one_block_in_the_tar(tmp_path):
    # what the manifest's storage accounting assumes (kdkit.teach.members.tar_bytes): no PAX header per
    # member, which tarfile adds for a float mtime (1 KB more for every .cls and .teacher member)
    from kdkit.teach.members import tar_bytes

    samples = [{"__key__": f"n01440764/img{i:06d}", "cls": contract.encode_label(i), "teacher": bytes(500)}
               for i in range(40)]
    tar = tmp_path / contract.tar_name("train", 0)
    tario.write_shard(tar, samples)
    members = sum(tar_bytes(s["__key__"], ext, len(s[ext])) for s in samples for ext in ("cls", "teacher"))
    assert members == 40 * 2 * 1024
    assert members + 1024 <= tar.stat().st_size < members + 1024 + 10240  # + end blocks, record padding
    assert [k for k, _ in tario.iter_tar_samples(tar)] == [s["__key__"] for s in samples]


def test_non_utf8_file_name_is_kept_under_a_stable_key(tmp_path, capsys):
    root = tmp_path / "raw"
    made = make_class_tree(root, per_class=2, size=(16, 16))
    latin1 = os.fsencode(root / "train" / "cat") + b"/caf\xe9.jpg"  # Latin-1 'café' from an old archive
    data = made["train"]["cat/cat_0.jpg"][0]
    with open(latin1, "wb") as f:
        f.write(data)
    assert main(["shard", "folder", str(root), str(tmp_path / "s"), "--quiet", "--workers", "1"]) == 0
    got = read_with_webdataset(tmp_path / "s" / "train")
    key = contract.key_from_relpath(os.fsdecode(b"cat/caf\xe9.jpg"))
    assert key.startswith("cat__caf_-") and got[key] == (data, 0)


def test_same_stem_files_are_both_kept(tmp_path):
    root = tmp_path / "raw"
    make_class_tree(root, per_class=2, size=(16, 16))
    Image.new("RGB", (16, 16), (200, 0, 0)).save(root / "train" / "cat" / "photo.jpg")
    Image.new("RGB", (16, 16), (0, 0, 200)).save(root / "train" / "cat" / "photo.png")
    write_dataset(list_folder(root), tmp_path / "s", cfg())
    photos = {k: np.asarray(Image.open(io.BytesIO(v[0])))[0, 0] for k, v in
              read_with_webdataset(tmp_path / "s" / "train").items() if k.startswith("cat__photo")}
    assert len(photos) == 2 and sorted(int(np.argmax(p)) for p in photos.values()) == [0, 2]
    assert set(photos) == set(contract.unique_keys(["cat/photo.jpg", "cat/photo.png"]))


def test_skip_report_rows_survive_tabs_and_newlines_in_names(tmp_path):
    root = tmp_path / "raw"
    make_class_tree(root, per_class=2, size=(16, 16))
    (root / "train" / "cat" / "bad\tname\n.jpg").write_bytes(b"not an image")
    (root / "train" / "dog" / "notes\t1.txt").write_text("x")
    write_dataset(list_folder(root), tmp_path / "s", cfg())
    rows = (tmp_path / "s" / "train" / contract.SKIP_REPORT).read_text().splitlines()
    assert len(rows) == 3 and all(r.count("\t") == 1 for r in rows)
    assert "bad\\tname\\n.jpg\tcannot decode" in rows[1] and "notes\\t1.txt\tignored" in rows[2]


def test_a_split_whose_every_image_is_bad_is_an_error(tmp_path, capsys):
    for c in "ab":
        (tmp_path / "raw" / "train" / c).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "raw" / "train" / c / f"{i}.jpg").write_text("a HEIC photo renamed by a phone export")
    out = tmp_path / "s"
    assert main(["shard", "folder", str(tmp_path / "raw"), str(out), "--quiet", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none of its 4 images could be read" in err and "skipped.tsv" in err
    assert not (out / "train" / contract.MANIFEST).exists()  # nothing a trainer would take for a set
    assert main(["verify", str(out)]) != 0  # and `kdkit verify` does not call it OK


@pytest.mark.slow
@pytest.mark.parametrize("value,why", [("abc", "expected an integer"), ("0", "expected an integer >= 1"),
                                       ("nan", "expected an integer")])
def test_bad_max_pixels_variable_is_a_one_line_error(value, why, tmp_path):
    root = tmp_path / "raw"
    make_class_tree(root, per_class=1, size=(16, 16))
    r = subprocess.run([sys.executable, "-m", "kdkit.cli", "shard", "folder", str(root), str(tmp_path / "s"),
                        "--quiet", "--workers", "1"], capture_output=True, text=True,
                       env={**os.environ, "KDKIT_MAX_PIXELS": value})
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"KDKIT_MAX_PIXELS={value}" in r.stderr and why in r.stderr
    assert not (tmp_path / "s").exists()


@pytest.mark.timeout(120)
def test_a_named_pipe_called_x_jpg_is_skipped_and_reported_not_waited_on(tmp_path):
    """The repro: a FIFO named like an image blocked `kdkit shard` forever (opening it waits for a writer)."""
    root = tmp_path / "raw"
    make_class_tree(root, per_class=3)
    os.mkfifo(root / "train" / "cat" / "pipe.jpg")
    out = tmp_path / "out"
    write_dataset(list_folder(root), out, cfg())
    report = (out / "train" / contract.SKIP_REPORT).read_text()
    assert f"{root / 'train' / 'cat' / 'pipe.jpg'}\tnot a regular file but a named pipe (FIFO)" in report
    assert len(read_with_webdataset(out / "train")) == 3 * len(CLASSES)


@pytest.mark.timeout(180)
def test_a_worker_that_dies_ends_the_writer_with_one_line_and_keeps_finished_shards(tmp_path, monkeypatch, capsys):
    """multiprocessing.Pool replaced a dead worker and waited forever for its lost result (the repro's writer
    hung 13 minutes); the writer's pool notices, says so in one line, and its rerun continues."""
    import multiprocessing

    root = tmp_path / "raw"
    make_class_tree(root, per_class=40, size=(24, 24))
    out = tmp_path / "out"
    argv = ["shard", "folder", str(root), str(out), "--quiet", "--workers", "2", "--samples-per-shard", "10"]
    real, calls = tario.write_shard, []

    def kill_a_worker_after_the_first_shard(path, samples):
        calls.append(path)
        if len(calls) == 2:  # the first shard is written; a worker is killed (the OOM killer, a kill -9)
            os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)
        return real(path, samples)

    monkeypatch.setattr(tario, "write_shard", kill_a_worker_after_the_first_shard)
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("kdkit: error:") and "a worker process died while preparing images" \
        in err[0] and "run the same command again to continue" in err[0], err
    assert (out / "train" / "train-000000.tar").exists()  # finished before: kept
    monkeypatch.undo()
    assert main(argv) == 0
    assert len(read_with_webdataset(out / "train")) == 40 * len(CLASSES)


def test_a_worker_that_raises_names_the_image_in_one_line(tmp_path):
    from kdkit.workers import WorkerPool

    with WorkerPool(2, "preparing images") as pool, pytest.raises(KdkitError) as e:
        pool.map(int, ["1", "2", "x", "4"], chunksize=2, describe=lambda s: f"image {s}")
    assert str(e.value).startswith("image x: a worker process failed while preparing images (ValueError: invalid "
                                   "literal for int() with base 10: 'x'); what was finished is kept")
