"""One writer per folder (kdkit.locks): a second writer of a run folder, a shard set or a teacher pass's
output is refused at once, naming the first; parts of one set run side by side; a killed writer's lock
never blocks its resume."""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from kdkit import locks
from kdkit.cli import main
from kdkit.shards import contract, tario
from kdkit.shards.resume import LOCK
from kdkit.shards.sources.folder import list_folder
from kdkit.shards.writer import write_dataset

from conftest import make_class_tree
from conftest import shard_cfg as cfg


def test_a_second_holder_is_refused_naming_the_first_and_parts_run_side_by_side(tmp_path):
    path = tmp_path / "f" / "lock"
    with locks.hold(path, "f", "wait"):
        with pytest.raises(locks.Busy, match=rf"f is being written by another process \(pid {os.getpid()} on .*, "
                                             r"`.*`, since .*\); nothing was changed: wait"):
            locks.hold(path, "f", "wait")
        with pytest.raises(locks.Busy):
            locks.hold(path, "f", "wait", part=(0, 2))  # a part while the whole is written
    a = locks.hold(path, "f", "wait", part=(0, 2))
    b = locks.hold(path, "f", "wait", part=(1, 2))  # the other part: side by side
    with pytest.raises(locks.Busy, match=r"f, part 1/2, is being written by another process \(pid"):
        locks.hold(path, "f", "wait", part=(1, 2))
    with pytest.raises(locks.Busy, match=f"pid {os.getpid()}"):  # the whole while parts run: the parts are named
        locks.hold(path, "f", "wait")
    a.release()
    b.release()
    locks.hold(path, "f", "wait").release()


def test_a_lock_left_by_a_killed_process_does_not_block_its_resume(tmp_path):
    path = tmp_path / "lock"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from kdkit import locks
        lock = locks.hold({str(path)!r}, "f", "wait")
        print("held", flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(locks.Busy, match=f"pid {holder.pid}"):
            locks.hold(path, "f", "wait")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    locks.hold(path, "f", "wait").release()  # the kernel released it with the process


@pytest.mark.parametrize("where", ["folder", "bucket"])
def test_a_second_shard_writer_into_the_same_folder_is_refused_and_the_first_finishes(tmp_path, monkeypatch, capsys,
                                                                                       request, where):
    """Two `kdkit shard` runs into one folder (the repro: misleading `.tar.tmp` errors, a hang): the second
    is refused with one line naming the first, the first writes the set as if alone. The lock of a bucket
    prefix is a file in this machine's scratch for it: the same holds there, and no temp file is left."""
    from kdkit.shards.location import local_side, location
    from kdkit.shards.verify import verify_set

    monkeypatch.setenv("KDKIT_SCRATCH", str(tmp_path / "scratch"))
    root = tmp_path / "raw"
    make_class_tree(root, per_class=4)
    out = location(f"{request.getfixturevalue('bucket')}/set" if where == "bucket" else tmp_path / "out")
    argv = ["shard", "folder", str(root), str(out), "--quiet", "--workers", "1", "--samples-per-shard", "4"]
    real, said = tario.write_shard, []

    def second_writer_meanwhile(path, samples):
        if not said:  # while the first writes its first shard (once: without a lock the second would recurse)
            said.append(None)
            said[0] = main(argv)
        return real(path, samples)

    monkeypatch.setattr(tario, "write_shard", second_writer_meanwhile)
    assert main(argv) == 0
    assert said == [2]
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kdkit: error:")]
    assert len(err) == 1 and f"{out / 'train'} (shard set) is being written by another process (pid {os.getpid()}" \
        in err[0] and "nothing was changed" in err[0], err
    assert verify_set(out / "train", progress=False).ok
    assert not [p for p in local_side(out / "train").rglob("*") if p.name.endswith(".kdkit-tmp")]


def test_a_writer_refused_by_the_lock_leaves_a_folder_that_is_not_kdkits_untouched(tmp_path):
    root = tmp_path / "raw"
    make_class_tree(root, per_class=2)
    other = tmp_path / "other" / "train"
    other.mkdir(parents=True)
    (other / "mine.txt").write_text("keep")
    assert main(["shard", "folder", str(root), str(tmp_path / "other"), "--quiet", "--workers", "1"]) == 2
    assert sorted(p.name for p in other.iterdir()) == ["mine.txt"]  # no lock file, no state folder made there


def test_parts_of_one_set_write_side_by_side_and_the_same_part_twice_is_refused(tmp_path):
    root = tmp_path / "raw"
    make_class_tree(root, per_class=4)
    out = tmp_path / "out"
    held = locks.hold(out / "train" / contract.STATE_DIR / LOCK, "x", "wait", part=(1, 2))  # part 1 running
    try:
        write_dataset(list_folder(root), out, cfg(samples_per_shard=3, part=(0, 2)))  # part 0 beside it
        with pytest.raises(locks.Busy, match=r"part 1/2, is being written"):
            write_dataset(list_folder(root), out, cfg(samples_per_shard=3, part=(1, 2)))
        with pytest.raises(locks.Busy, match="being written"):  # the whole set while a part runs
            write_dataset(list_folder(root), out, cfg(samples_per_shard=3))
    finally:
        held.release()
    write_dataset(list_folder(root), out, cfg(samples_per_shard=3, part=(1, 2)))
    assert (out / "train" / contract.MANIFEST).exists()


def test_a_second_training_run_in_one_run_folder_is_refused_before_any_work(tiny_shards, tmp_path, monkeypatch):
    """The repro: two runs with one --name both exit 0, mixing config.yaml, checkpoints and metrics. Rank 0
    locks the run folder first: a second run started while the first trains is refused at once and
    changes nothing there; the first finishes as if alone, and its lock is gone when it ends."""
    from kdkit.errors import KdkitError
    from kdkit.train import loop
    from kdkit.train.config import make_config

    cfg = make_config({"data": str(tiny_shards), "output": str(tmp_path), "name": "r", "model": "test_efficientnet",
                       "image_size": 32, "batch_size": 8, "loader_threads": 1, "progress": False, "epochs": 1})
    real, second = loop.train_step, []

    def second_run_meanwhile(*a, **k):
        if not second:  # while the first run trains its first step (once: a second that ran would recurse)
            second.append(None)
            before = {p.name: p.read_bytes() for p in cfg.run_dir.iterdir()}
            with pytest.raises(KdkitError) as e:
                loop.fit(dataclasses.replace(cfg, lr=0.5, seed=7))
            second[0] = str(e.value)
            assert {p.name: p.read_bytes() for p in cfg.run_dir.iterdir()} == before
        return real(*a, **k)

    monkeypatch.setattr(loop, "train_step", second_run_meanwhile)
    loop.fit(cfg)
    assert second and f"the run folder {cfg.run_dir} is being written by another process (pid {os.getpid()}" \
        in second[0] and "give this one another --name" in second[0], second
    monkeypatch.undo()
    assert loop.fit(dataclasses.replace(cfg, resume="last"))  # the first run released the lock when it ended


def test_a_second_teacher_pass_into_the_same_output_is_refused(tiny_shards, tmp_path, monkeypatch):
    from kdkit.errors import KdkitError
    from kdkit.shards.verify import verify_set
    from kdkit.teach import add_logits
    from kdkit.teach.config import TeacherPassConfig, TeacherSpec

    from test_eval import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "t.pth", tiny_shards)
    out = tmp_path / "kd"
    cfg = TeacherPassConfig(shards=tiny_shards / "train", teachers=[TeacherSpec(ckpt)], out=out, device="cpu",
                            threads=1, batch_size=4, progress=False)
    real, second = add_logits._process_shard, []

    def second_pass_meanwhile(*a, **k):
        if not second:  # while the first pass writes its first shard (once: a second that ran would recurse)
            second.append(None)
            with pytest.raises(KdkitError) as e:
                add_logits.add_teacher_logits(cfg)
            second[0] = str(e.value)
        return real(*a, **k)

    monkeypatch.setattr(add_logits, "_process_shard", second_pass_meanwhile)
    add_logits.add_teacher_logits(cfg)
    assert second and f"{out} (teacher pass) is being written by another process (pid {os.getpid()}" in second[0]
    assert verify_set(out, progress=False).ok
