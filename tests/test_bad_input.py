"""Bad input as a new user meets it: every refusal is one line on stderr naming the option or file and
what to do, exit status 2, and nothing written."""
from __future__ import annotations

import pytest

from kdkit.cli import main
from kdkit.errors import KdkitError


def refused(capsys, argv: list[str], *expected: str) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    for text in expected:
        assert text in err, err
    return err


@pytest.mark.parametrize("flag,value,expected", [
    ("--max-size", "-5", "expected an integer >= 8"), ("--max-size", "0", "expected an integer >= 8"),
    ("--samples-per-shard", "-3", "expected an integer >= 1"), ("--samples-per-shard", "0", ">= 1"),
    ("--shard-size-mb", "0", "expected a number > 0"), ("--workers", "0", ">= 1"), ("--quality", "101", "1 <= x <= 100"),
    ("--seed", "-1", ">= 0")])
def test_nonsense_shard_options_are_refused_before_anything_is_written(class_tree, tmp_path, capsys, flag, value,
                                                                       expected):
    root, _ = class_tree
    refused(capsys, ["shard", "folder", str(root), str(tmp_path / "out"), flag, value], f"argument {flag}", expected)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv,expected", [
    (["eval", "c.pth", "--data", "d", "--batch-size", "0"], "argument --batch-size: expected an integer >= 1"),
    (["eval", "c.pth", "--data", "d", "--crop-ratio", "0"], "argument --crop-ratio: expected a number 0 < x <= 1"),
    (["predict", "c.pth", "x.jpg", "--topk", "0"], "argument --topk: expected an integer >= 1"),
    (["add-teacher-logits", "d", "--checkpoint", "c", "--out", "o", "--views", "0"], "argument --views"),
    (["bench-loader", "d", "--threads", "0"], "argument --threads"),
    (["lr-find", "d", "--num-steps", "1"], "argument --num-steps: expected an integer >= 5"),
    (["shard", "folder", "a"], "required: out")])
def test_nonsense_values_of_other_commands_are_one_line(capsys, argv, expected):
    refused(capsys, argv, expected, f"see `kdkit {argv[0]}")


@pytest.mark.parametrize("flags,expected", [
    (["--label-smoothing", "2"], "argument --label-smoothing: expected a number 0 <= label_smoothing <= 0.999, got '2'"),
    (["--image-size", "0"], "argument --image-size: expected an integer >= 8, got '0'"),
    (["--kd-alpha", "1.5"], "argument --kd-alpha"),
    (["--random-area", "0.9", "0.2"], "random_area=(0.9, 0.2): expected (min, max) with min <= max"),
    (["--rotate", "-5"], "argument --rotate: expected a number 0 <= rotate <= 180, got '-5'"),
    (["--rotate-fill", "256"], "argument --rotate-fill: expected a number 0 <= rotate_fill <= 255, got '256'"),
    (["--hue", "0.6"], "argument --hue: expected a number 0 <= hue <= 0.5, got '0.6'"),
    (["--augmix-severity", "11"], "argument --augmix-severity"), (["--augmix-depth", "0"], "augmix_depth=0"),
    (["--augmix-alpha", "0"], "argument --augmix-alpha: expected a number > 0, got '0'"),
    (["--augmix-jsd"], "augmix_jsd=True: expected augmix=True with it"),
    (["--augmix", "--auto-augment", "randaugment"], "augmix=True: one augmentation policy at a time"),
    (["--augmix", "--augmix-jsd", "--mixup", "0.2"], "set --mixup 0 --cutmix 0"),
    (["--augmix", "--augmix-jsd", "--kd", "stored"], "the JSD loss trains on the labels"),
    (["--kd", "replay", "--rotate", "10"], "stored teacher views record crop box and flip but no rotation"),
    (["--views-per-load", "0"], "argument --views-per-load: expected an integer >= 1, got '0'"),
    (["--views-per-load", "2"], "views_per_load=2: several stored views per load need kd=replay"),
    (["--lr", "nan"], "argument --lr: expected a finite number, got 'nan'")])
def test_nonsense_training_options_are_refused_naming_the_option(tiny_shards, tmp_path, capsys, flags, expected):
    mode = "student" if any(f.startswith(("--kd", "--views")) for f in flags) else "teacher"  # a teacher takes no KD flag
    try:  # a value out of its range is refused while parsing (argparse exits), a contradiction after it
        code = main(["train", mode, str(tiny_shards), "--output", str(tmp_path), *flags])
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1, err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("line,expected", [
    ("lr: fast", "lr='fast': expected a number"), ("epochs: '2'", "epochs='2': expected an integer"),
    ("random_area: 0.5", "random_area=0.5: expected a list of 2 numbers"), ("flip: 1", "flip=1: expected true or false"),
    ("sched: sometimes", "sched='sometimes': expected one of cosine")])
def test_recipe_values_are_type_checked_with_the_key_and_file_named(tmp_path, line, expected):
    from kdkit.train.config import make_config

    recipe = tmp_path / "mine.yaml"
    recipe.write_text(line + "\n")
    with pytest.raises(KdkitError, match=rf"recipe .*mine\.yaml: {expected}".replace("(", r"\(").replace(")", r"\)")):
        make_config({"data": "x"}, recipe=str(recipe))


def test_verify_fails_when_a_splits_manifest_is_missing(tiny_shards, tmp_path, capsys):
    import shutil

    root = tmp_path / "set"
    shutil.copytree(tiny_shards, root)
    (root / "val" / "manifest.json").unlink()
    assert main(["verify", str(root), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM" in out and "val: holds shards but no manifest.json" in out


@pytest.mark.parametrize("name", ["../../outside.tar", "/tmp/abs.tar", "sub/dir.tar", "..tar", "train-0.txt"])
def test_a_manifest_cannot_point_outside_its_set(tiny_shards, tmp_path, capsys, name):
    """A crafted manifest naming a path outside the set: every reader stops with one line before
    touching anything (it used to let `verify --fix-index` overwrite that file with an index)."""
    import json
    import shutil

    root = tmp_path / "set"
    shutil.copytree(tiny_shards, root)
    victim = tmp_path / "outside.idx"
    victim.write_text("precious")
    man = json.loads((root / "train" / "manifest.json").read_text())
    man["shards"][0]["tar"], man["shards"][0]["idx"] = name, name.replace(".tar", ".idx")
    (root / "train" / "manifest.json").write_text(json.dumps(man))
    for argv in (["verify", str(root / "train"), "--fix-index", "--quiet"],
                 ["add-teacher-logits", str(root / "train"), "--import-h5", str(tmp_path / "x.h5"), "--out",
                  str(tmp_path / "o")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "unreadable manifest" in err and "not a .tar file name inside the set's folder" in err, err
    assert victim.read_text() == "precious"


def test_an_output_inside_the_input_is_refused(class_tree, capsys):
    root, _ = class_tree
    assert main(["shard", "folder", str(root), str(root / "out"), "--quiet", "--workers", "1"]) == 2
    assert "inside the input" in capsys.readouterr().err and not (root / "out").exists()


def test_an_unwritable_output_folder_is_one_line(class_tree, tmp_path, capsys):
    root, _ = class_tree
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file where a folder should be")
    assert main(["shard", "folder", str(root), str(blocker / "out"), "--quiet", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "file.txt/out" in err and "writable" in err


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height (a decompression bomb's shape)."""
    import io
    import struct
    import zlib

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    return bytes(data)


def test_a_decompression_bomb_is_skipped_and_reported_not_decoded(class_tree, tmp_path):
    import json

    from conftest import shard_cfg
    from kdkit.shards.sources.folder import list_folder
    from kdkit.shards.writer import write_dataset

    root, made = class_tree
    (root / "train" / "cat" / "bomb.png").write_bytes(_png_claiming(30_000, 30_000))
    write_dataset(list_folder(root, splits=["train"]), tmp_path / "out", shard_cfg())
    report = (tmp_path / "out" / "train" / "skipped.tsv").read_text()
    assert "bomb.png" in report and "100-megapixel limit" in report and "KDKIT_MAX_PIXELS" in report
    man = json.loads((tmp_path / "out" / "train" / "manifest.json").read_text())
    assert man["num_samples"] == len(made["train"]) and man["skipped"] == 1


def test_grayscale_images_are_stored_as_rgb(tmp_path):
    """Readers always get 3 channels: a stock webdataset + torchvision Normalize pipeline must not meet a
    1-channel image mid-epoch."""
    import io

    import numpy as np
    from PIL import Image

    from conftest import read_with_webdataset, shard_cfg
    from kdkit.shards.sources.folder import list_folder
    from kdkit.shards.writer import write_dataset

    for c in ("a", "b"):
        (tmp_path / "raw" / c).mkdir(parents=True)
        gray = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32), dtype=np.uint8), mode="L")
        gray.save(tmp_path / "raw" / c / "g.jpg", quality=90)
    write_dataset(list_folder(tmp_path / "raw"), tmp_path / "out", shard_cfg())
    for jpg, _ in read_with_webdataset(tmp_path / "out" / "train").values():
        assert Image.open(io.BytesIO(jpg)).mode == "RGB"


def test_train_and_val_sets_of_other_classes_are_refused(tiny_shards, tmp_path, capsys):
    import json
    import shutil

    root = tmp_path / "set"
    shutil.copytree(tiny_shards, root)
    man = json.loads((root / "val" / "manifest.json").read_text())
    man["classes"][0]["id"], man["classes"][1]["id"] = man["classes"][1]["id"], man["classes"][0]["id"]
    (root / "val" / "manifest.json").write_text(json.dumps(man))
    assert main(["train", "teacher", str(root), "--output", str(tmp_path / "runs"), "--model", "test_efficientnet",
                 "--image-size", "32", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "its classes are not" in err and "first difference at index 0: 'dog' vs 'cat'" in err, err


@pytest.mark.slow
def test_an_interrupted_run_says_how_to_continue_and_that_command_resumes_it(tmp_path, capsys, monkeypatch):
    """Ctrl-C: the message gives the exact command; it reloads the run's saved config (so --resume alone
    continues a 32 px test_efficientnet run as such), and flags that would make it another run are refused."""
    import sys

    from test_train_loop import write_colour_shards
    from kdkit.train import loop

    data = write_colour_shards(tmp_path / "c")
    out = tmp_path / "runs"
    argv = ["train", "teacher", str(data), "--name", "r", "--output", str(out), "--model", "test_efficientnet",
            "--image-size", "32", "--batch-size", "8", "--epochs", "2", "--loader-threads", "1", "--no-progress",
            "--opt", "adamw", "--lr", "0.003", "--device", "cpu"]
    real, calls = loop.train_step, []

    def ctrl_c(*a, **k):
        calls.append(1)
        if len(calls) == 5:  # epoch 2
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(loop, "train_step", ctrl_c)
    monkeypatch.setattr(sys, "argv", ["kdkit", *argv])
    assert main(argv) == 130
    err = capsys.readouterr().err
    command = err.strip().splitlines()[-1].split("Continue with: ")[1]
    assert command == f"kdkit train teacher {data} --name r --output {out} --resume"
    monkeypatch.undo()
    assert main(["train", "teacher", str(data), "--name", "r", "--output", str(out), "--resume", "--model",
                 "resnet50"]) == 2
    assert "--model resnet50 (the run has 'test_efficientnet')" in capsys.readouterr().err
    assert main(command.split()[1:]) == 0
    said = capsys.readouterr().out
    assert f"kdkit train: test_efficientnet on {data}/train: 24 train samples of 3 classes, 12 val samples;" in said
    assert "resuming at epoch 2" in said and "kdkit train: done, best val top-1" in said and "best.pth" in said
    import json
    rows = [json.loads(line) for line in (out / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert "image_size: 32" in (out / "r" / "config.yaml").read_text()


def test_an_empty_class_folder_is_not_a_class_and_is_reported(class_tree, tmp_path):
    """The indices are timm's folder reader's (it ignores empty folders): an empty `aardvark/` sorted
    first must not shift every label by one."""
    import json

    from conftest import read_with_webdataset, shard_cfg
    from kdkit.shards.sources.folder import list_folder
    from kdkit.shards.writer import write_dataset

    root, made = class_tree
    (root / "train" / "aardvark").mkdir()
    (root / "train" / "aardvark" / "notes.txt").write_text("no images here")
    write_dataset(list_folder(root), tmp_path / "out", shard_cfg())
    man = json.loads((tmp_path / "out" / "train" / "manifest.json").read_text())
    assert [c["id"] for c in man["classes"]] == ["cat", "dog", "eel"]
    got = read_with_webdataset(tmp_path / "out" / "train")
    assert sorted(label for _, label in got.values()) == sorted(label for _, label in made["train"].values())
    assert "aardvark/\tignored: empty class folder" in (tmp_path / "out" / "train" / "skipped.tsv").read_text()


def test_teacher_pass_refusals_say_what_is_wrong(tiny_shards, tmp_path, capsys):
    from kdkit.teach import TeacherPassConfig, TeacherSpec, add_teacher_logits

    with pytest.raises(KdkitError, match=r"say where the result goes: --out NEW_FOLDER .* or --in-place .*\)$"):
        TeacherPassConfig(tiny_shards, [TeacherSpec(tmp_path / "t.pth")]).check()  # neither given: not "not both"
    with pytest.raises(KdkitError, match="not both"):
        TeacherPassConfig(tiny_shards, [TeacherSpec(tmp_path / "t.pth")], out=tmp_path / "o", in_place=True).check()
    with pytest.raises(KdkitError, match=r"--topk 5: the set has 3 classes"):
        add_teacher_logits(TeacherPassConfig(tiny_shards, [TeacherSpec(tmp_path / "t.pth")], out=tmp_path / "o",
                                             topk=5, device="cpu", progress=False))
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_small_things_a_user_feels(tiny_shards, tmp_path, capsys, monkeypatch):
    """Evaluations of other views do not overwrite each other; an export leaves one file and, after a
    failure, nothing under the final name."""
    import shutil
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_eval import make_checkpoint

    (tmp_path / "m").mkdir()
    ckpt = make_checkpoint(tmp_path / "m" / "best.pth", tiny_shards)
    for views in ("center", "flip"):
        assert main(["eval", str(ckpt), "--data", str(tiny_shards), "--views", views, "--no-plots",
                     "--device", "cpu"]) == 0
    assert sorted(p.name for p in (tmp_path / "m" / "eval").iterdir()) == ["best-val-center", "best-val-flip"]
    capsys.readouterr()
    assert main(["export", str(ckpt), "-o", str(tmp_path / "x" / "m.onnx"), "--no-benchmark"]) == 0
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["m.export.json", "m.onnx"]
    shutil.rmtree(tmp_path / "x")
    from kdkit.evaluate import export

    def broken(*a, **k):
        raise KdkitError("the ONNX checker refused the graph")
    monkeypatch.setattr(export, "add_metadata", broken)  # fails after the exporter wrote its files
    assert main(["export", str(ckpt), "-o", str(tmp_path / "x" / "m.onnx")]) == 2
    assert not any((tmp_path / "x").iterdir())


def _damaged_set(tiny_shards, tmp_path, update_manifest: bool):
    """A copy of the tiny set with one JPEG per split zeroed after its headers (the tar stays valid);
    with update_manifest the manifest records the damaged shard's checksum (a set written that way),
    else it still holds the original's (damage after writing). Returns (root, bad keys, the runs)."""
    import dataclasses
    import shutil

    from kdkit.shards import contract, tario
    from kdkit.shards.verify import load_manifest
    from test_eval import make_checkpoint

    root = tmp_path / "set"
    shutil.copytree(tiny_shards, root)
    bad = []
    for split in ("train", "val"):
        tar = sorted((root / split).glob("*.tar"))[0]
        samples = [{"__key__": k, **m} for k, m in tario.iter_tar_samples(tar)]
        jpg = samples[2]["jpg"]
        sos = jpg.index(b"\xff\xda")
        samples[2]["jpg"] = jpg[:sos + 4] + bytes(len(jpg) - sos - 4)  # headers kept, the body zeroed, no EOI
        info = tario.write_shard(tar, samples)
        bad.append((tar, samples[2]["__key__"]))
        if update_manifest:
            man = load_manifest(root / split)
            shards = [dataclasses.replace(r, bytes=info["bytes"], sha256=info["sha256"]) if r.tar == tar.name else r
                      for r in man.shards]
            tario.atomic_write_json(root / split / contract.MANIFEST, dataclasses.replace(man, shards=shards).to_json())
    ckpt = make_checkpoint(tmp_path / "c.pth", tiny_shards)
    runs = {"train": ["train", "teacher", str(root), "--model", "test_efficientnet", "--image-size", "32",
                      "--batch-size", "4", "--epochs", "1", "--output", str(tmp_path / "runs"), "--device", "cpu"],
            "eval": ["eval", str(ckpt), "--data", str(root), "--out", str(tmp_path / "ev"), "--device", "cpu"],
            "teach": ["add-teacher-logits", str(root), "--checkpoint", str(ckpt), "--out", str(tmp_path / "kd"),
                      "--device", "cpu", "--quiet"]}
    return root, bad, runs


def _one_line(argv, tmp_path, env=None):
    import os
    import shutil
    import subprocess
    import sys

    shutil.rmtree(tmp_path / "runs", ignore_errors=True)
    shutil.rmtree(tmp_path / "kd", ignore_errors=True)
    r = subprocess.run([sys.executable, "-m", "kdkit", *argv], capture_output=True, text=True, timeout=120,
                       env={**os.environ, **(env or {})})
    assert r.returncode == 2, (argv[0], r.returncode, r.stderr[-600:])
    # (libjpeg's own warnings may print from DALI's threads around kdkit's line)
    said = [line for line in r.stderr.splitlines() if line.startswith("kdkit: error:")]
    assert len(said) == 1 and ".tar" in said[0], r.stderr[-600:]
    return said[0]


@pytest.mark.timeout(240)
@pytest.mark.slow
def test_a_shard_damaged_after_writing_is_refused_by_its_checksum_before_dali_decodes(tiny_shards, tmp_path):
    """Every reader (train, eval, the teacher pass) hashes the shards it reads against the manifest before
    DALI decodes anything (the reported segfault in DALI's share_outputs on a damaged JPEG cannot happen),
    and names the shard; KDKIT_CHECKSUMS=0 skips the check (then DALI's decode error names the sample)."""
    root, bad, runs = _damaged_set(tiny_shards, tmp_path, update_manifest=False)
    for name, argv in runs.items():
        said = _one_line(argv, tmp_path, env={"KDKIT_CACHE": str(tmp_path / "cache")})
        assert "differ from the checksum in its manifest" in said and any(str(t) in said for t, _ in bad), said
    said = _one_line(runs["eval"], tmp_path, env={"KDKIT_CHECKSUMS": "0"})
    assert "image does not decode" in said, said


def test_checksums_are_hashed_once_and_a_later_change_is_still_caught(tiny_shards, tmp_path, monkeypatch):
    import os
    import shutil

    from kdkit.pipelines import DaliLoader, ShardError, loader_config
    from kdkit.shards import checksums as shardset

    monkeypatch.setenv("KDKIT_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "set"
    shutil.copytree(tiny_shards, root)
    hashed = []
    real = shardset.sha256_file
    monkeypatch.setattr(shardset, "sha256_file", lambda p: hashed.append(p) or real(p))
    cfg = loader_config("eval", image_size=32, batch_size=4, device="cpu")
    DaliLoader(root, cfg, split="val")
    first = len(hashed)
    assert first == len(list((root / "val").glob("*.tar")))
    DaliLoader(root, cfg, split="val")
    assert len(hashed) == first + 1  # verified once: the second open stats them, and re-hashes one (the rotation)
    tar = sorted((root / "val").glob("*.tar"))[0]
    data = bytearray(tar.read_bytes())
    data[-2000] ^= 0xFF  # same size, other bytes, a later mtime
    tar.write_bytes(bytes(data))
    os.utime(tar, ns=(tar.stat().st_atime_ns, tar.stat().st_mtime_ns + 10**9))
    with pytest.raises(ShardError, match=f"{tar.name}: its bytes differ"):
        DaliLoader(root, cfg, split="val")
    # a fresh cache and a damaged first shard: the others are recorded all the same, a rerun hashes it again
    # (and the one shard of the rotation)
    monkeypatch.setenv("KDKIT_CACHE", str(tmp_path / "cache2"))
    hashed.clear()
    for _ in range(2):
        with pytest.raises(ShardError, match=f"{tar.name}: its bytes differ"):
            DaliLoader(root, cfg, split="val")
    assert len(hashed) == first + 2 and tar in hashed[first:]


@pytest.mark.timeout(240)
@pytest.mark.slow
def test_a_corrupt_jpeg_inside_a_shard_is_one_line_from_every_reader(tiny_shards, tmp_path):
    """A set written with a damaged JPEG (its manifest agrees): every reader (train, eval, the teacher pass)
    stops with one line naming the shard and the sample, exit status 2, run after run; a crash fails this."""
    root, bad, runs = _damaged_set(tiny_shards, tmp_path, update_manifest=True)
    for name, argv in runs.items():
        for attempt in range(2):
            said = _one_line(argv, tmp_path)
            assert any(f"sample {k}: image does not decode" in said for _, k in bad), said


def test_ranks_checking_their_shards_at_once_keep_each_others_records(tmp_path, monkeypatch):
    # each rank reads the cache, hashes its own shards and writes: a write merges into what is on disk
    # then, through a temp file of its own, so no rank's records are lost and the file stays valid JSON
    import json

    from kdkit.shards import checksums

    monkeypatch.setenv("KDKIT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "set"
    checksums._update(folder, {"train-000000.tar": [1, 2, "a", 1]}, set())  # rank 0
    checksums._update(folder, {"train-000001.tar": [3, 4, "b", 1]}, set())  # rank 1, read the cache before rank 0 wrote
    cache = checksums._cache_file(folder)
    assert json.loads(cache.read_text())["shards"] == {"train-000000.tar": [1, 2, "a", 1],
                                                       "train-000001.tar": [3, 4, "b", 1]}
    assert [p.name for p in cache.parent.iterdir()] == [cache.name]


def _flip_keeping_size_and_mtime(tar):
    """Silent damage: one byte inside an image changes, the size and mtime do not (bit rot)."""
    import os

    st = tar.stat()
    data = bytearray(tar.read_bytes())
    data[len(data) // 3] ^= 0xFF
    tar.write_bytes(bytes(data))
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_damage_that_keeps_size_and_mtime_is_caught_by_the_rotating_recheck(tiny_shards, tmp_path, monkeypatch):
    """The cache trusts (size, mtime); bit rot keeps both. Each open re-hashes the shards verified longest ago
    (2% of the bytes, at least one shard), so the damage is caught within as many opens as the set has shards;
    KDKIT_CHECKSUMS=full catches it at once; `kdkit verify` always hashes, and tells the cache."""
    import shutil

    from kdkit.pipelines import DaliLoader, ShardError, loader_config
    from kdkit.shards.verify import verify_set

    monkeypatch.setenv("KDKIT_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "set"
    shutil.copytree(tiny_shards, root)
    cfg = loader_config("eval", image_size=32, batch_size=4, device="cpu")
    DaliLoader(root, cfg, split="train")  # every shard verified and cached
    tars = sorted((root / "train").glob("*.tar"))
    _flip_keeping_size_and_mtime(tars[-1])  # the last one the rotation reaches
    monkeypatch.setenv("KDKIT_CHECKSUMS", "full")
    with pytest.raises(ShardError, match=f"{tars[-1].name}: its bytes differ"):
        DaliLoader(root, cfg, split="train")
    monkeypatch.delenv("KDKIT_CHECKSUMS")
    with pytest.raises(ShardError, match=f"{tars[-1].name}: its bytes differ"):  # the refusal dropped it from the cache
        DaliLoader(root, cfg, split="train")
    # a fresh cache: caught by the rotation within len(tars) opens
    monkeypatch.setenv("KDKIT_CACHE", str(tmp_path / "cache2"))
    shutil.copy2(tiny_shards / "train" / tars[-1].name, tars[-1])
    DaliLoader(root, cfg, split="train")
    _flip_keeping_size_and_mtime(tars[-1])
    caught = []
    for attempt in range(1, len(tars) + 1):
        try:
            DaliLoader(root, cfg, split="train")
        except ShardError as e:
            caught.append((attempt, str(e)))
            break
    assert caught and tars[-1].name in caught[0][1], caught
    # `kdkit verify` hashes whatever the cache says, and a shard it finds damaged is hashed by every reader next
    monkeypatch.setenv("KDKIT_CACHE", str(tmp_path / "cache3"))
    shutil.copy2(tiny_shards / "train" / tars[-1].name, tars[-1])
    DaliLoader(root, cfg, split="train")
    _flip_keeping_size_and_mtime(tars[-1])
    assert not verify_set(root / "train", progress=False).ok
    with pytest.raises(ShardError, match=f"{tars[-1].name}: its bytes differ"):
        DaliLoader(root, cfg, split="train")


def _big_batch_set(tmp_path, n: int = 70):
    """A one-shard set of n JPEGs (one batch of 64 and more), and a checkpoint for its classes."""
    import numpy as np

    from kdkit.shards.sources.folder import list_folder
    from kdkit.shards.writer import ShardConfig, write_dataset
    from conftest import jpeg_bytes
    from test_eval import make_checkpoint

    rng = np.random.default_rng(3)
    for split in ("train", "val"):
        for i in range(n if split == "train" else 6):
            d = tmp_path / "raw" / split / ["cat", "dog", "eel"][i % 3]
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{i:03d}.jpg").write_bytes(jpeg_bytes(rng, 120, 150))
    root = tmp_path / "set"
    write_dataset(list_folder(tmp_path / "raw"), root, ShardConfig(samples_per_shard=n, workers=1, progress=False))
    return root, make_checkpoint(tmp_path / "c.pth", root)


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_a_jpeg_whose_header_is_damaged_never_crashes_a_reader_even_unchecked(tmp_path):
    """The repro: a JPEG's bytes between FF D8 and its last two zeroed, with the checksum check off; DALI 2.4's
    CPU decoder then segfaulted `kdkit eval` and the teacher pass in most runs (a plain DALI pipeline does too,
    at a batch of 32 or more). Shards no checksum vouched for get their image headers checked first: one line
    naming the sample, exit 2, run after run."""
    import os
    import subprocess
    import sys

    from kdkit.shards import tario

    root, ckpt = _big_batch_set(tmp_path)
    tar = sorted((root / "train").glob("*.tar"))[0]
    samples = [{"__key__": k, **m} for k, m in tario.iter_tar_samples(tar)]
    jpg = bytearray(samples[3]["jpg"])
    jpg[2:-2] = bytes(len(jpg) - 4)
    samples[3]["jpg"] = bytes(jpg)
    tario.write_shard(tar, samples)  # the manifest still holds the original checksum
    env = {**os.environ, "KDKIT_CHECKSUMS": "0", "KDKIT_CACHE": str(tmp_path / "cache")}
    runs = [["eval", str(ckpt), "--data", str(root), "--split", "train", "--out", str(tmp_path / "ev"),
             "--device", "cpu"]] * 3 + \
        [["add-teacher-logits", str(root), "--checkpoint", str(ckpt), "--out", str(tmp_path / "kd"), "--device",
          "cpu", "--quiet"]]
    for argv in runs:
        r = subprocess.run([sys.executable, "-m", "kdkit", *argv], capture_output=True, text=True, timeout=120, env=env)
        said = [line for line in r.stderr.splitlines() if line.startswith("kdkit: error:")]
        assert r.returncode == 2 and len(said) == 1, (argv[0], r.returncode, r.stderr[-800:])
        assert f"{tar}: sample {samples[3]['__key__']}: image does not decode (no JPEG marker at byte 2" in said[0]


def test_the_header_check_passes_every_image_format_dali_reads():
    import io

    import numpy as np
    from PIL import Image

    from kdkit.shards.headers import problem

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    for fmt, kw in (("JPEG", {}), ("JPEG", dict(progressive=True, optimize=True)), ("JPEG", dict(exif=exif.tobytes())),
                    ("JPEG", dict(icc_profile=b"x" * 70_000)), ("PNG", {}), ("WEBP", {}), ("BMP", {}), ("TIFF", {})):
        one = io.BytesIO()
        (img.convert("CMYK") if kw.get("optimize") else img).save(one, format=fmt, **kw)
        data = one.getvalue()
        assert problem(io.BytesIO(bytes(512) + data), 512, len(data)) is None, (fmt, kw)  # as a tar member
    cut = io.BytesIO()
    img.save(cut, format="JPEG")
    assert "runs past the image" in problem(cut, 0, 200)
    assert "no image format" in problem(io.BytesIO(bytes(100)), 0, 100)


def test_a_split_folder_without_its_manifest_is_named(tiny_shards, tmp_path, capsys):
    """The train folder is there but its manifest is not (writing did not finish, or it was lost): say
    that, not "looked for ROOT/train"."""
    import shutil

    from kdkit.cli import main
    from kdkit.shards import contract

    root = tmp_path / "set"
    shutil.copytree(tiny_shards, root)
    (root / "train" / contract.MANIFEST).unlink()
    assert main(["train", "teacher", str(root), "--model", "test_efficientnet", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{root / 'train'}: holds shards but no manifest.json (its writing did not finish" in err
    assert "looked for" not in err and len([line for line in err.splitlines() if "error" in line]) == 1
