"""Files written whole or not at all (kdkit.atomic), and a full disk as one line: a shard, a checkpoint, a
JSON record or a metrics row that does not fit leaves the earlier file as it was and no partial file."""
from __future__ import annotations

import contextlib
import errno
import resource

import pytest
import torch

from kdkit import atomic
from kdkit.cli import main
from kdkit.models.checkpoint import save_checkpoint

from conftest import make_class_tree


@contextlib.contextmanager
def file_size_limit(limit: int):
    """`ulimit -f`: writing past `limit` bytes fails with EFBIG, as a full disk fails with ENOSPC."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def leftovers(folder):
    return [p.name for p in folder.rglob("*") if p.name.endswith((atomic.TMP_TAG, ".tmp"))]


def test_a_checkpoint_that_does_not_fit_names_the_file_and_keeps_the_previous_one(tmp_path):
    """torch.save reports a failed write as "enforce fail at inline_container.cc ... unexpected pos": the error
    that reaches the user is the OSError naming last.pth, the earlier last.pth is intact, no temp file stays."""
    path = tmp_path / "last.pth"
    save_checkpoint(path, {"state_dict": {"w": torch.zeros(10)}})
    before = path.read_bytes()
    with file_size_limit(200_000), pytest.raises(OSError) as e:
        save_checkpoint(path, {"state_dict": {"w": torch.zeros(1_000_000)}})
    assert e.value.errno == errno.EFBIG and e.value.filename == str(path)
    assert path.read_bytes() == before and leftovers(tmp_path) == []


def test_a_full_disk_while_sharding_is_one_line_and_leaves_no_partial_shard(tmp_path, capsys):
    root = tmp_path / "raw"
    make_class_tree(root, per_class=20, size=(64, 64))
    out = tmp_path / "out"
    argv = ["shard", "folder", str(root), str(out), "--quiet", "--workers", "1", "--samples-per-shard", "15"]
    with file_size_limit(20_000):
        assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"kdkit: error: {out / 'train' / 'train-000000.tar'}: file too large")
    assert "ulimit -f" in err[0] and "no partial file was left" in err[0], err
    assert leftovers(out) == [] and not list(out.rglob("*.tar"))
    assert main(argv) == 0  # room again: the same command finishes the set


def test_a_row_that_does_not_fit_is_not_appended_by_half(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1}\n' * 10)
    before = path.read_bytes()
    with file_size_limit(len(before) + 5), pytest.raises(OSError) as e:
        atomic.append(path, '{"epoch": 2, "train_loss": 0.5}\n')
    assert e.value.errno == errno.EFBIG and e.value.filename == str(path)
    assert path.read_bytes() == before


def test_the_disk_full_line_says_what_to_free_where(tmp_path):
    said = atomic.disk_full_message(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "a" / "b.tar")))
    assert said.startswith(f"{tmp_path / 'a' / 'b.tar'}: no space left on the device holding {tmp_path}")
    assert "free there now" in said and "run the same command again" in said
