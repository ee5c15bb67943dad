"""kdkit.runtime: where every command runs. Device choice (with the loud warning a user needs when an
NVIDIA driver is there but torch sees no GPU), rank and world, and the line every long job opens with."""
from __future__ import annotations

import pytest
import torch

from kdkit import runtime
from kdkit.errors import KdkitError


@pytest.fixture
def driver_but_no_gpu(monkeypatch, tmp_path):
    """A machine with an NVIDIA driver whose GPU this torch cannot use (e.g. a CUDA-12 driver under a
    CUDA-13 torch)."""
    version = tmp_path / "version"
    version.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05\n")
    real = runtime.os.path.exists
    monkeypatch.setattr(runtime.os.path, "exists",
                        lambda p: True if p == "/proc/driver/nvidia/version" else real(p))
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: real_open(version if p == "/proc/driver/nvidia/version"
                                                                      else p, *a, **k))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(runtime, "_warned", set())


def test_a_driver_without_a_usable_gpu_is_said_loudly_once(driver_but_no_gpu, capsys):
    assert runtime.pick_device("auto").type == "cpu"
    assert runtime.pick_device("auto").type == "cpu"
    err = capsys.readouterr().err
    assert err.count("WARNING") == 1 and "535.104.05" in err and "sees no GPU" in err and "running on the CPU" in err
    with pytest.raises(KdkitError, match=r"--device gpu: no CUDA device is visible to torch \(an NVIDIA driver"):
        runtime.pick_device("gpu")


def test_no_driver_no_warning(monkeypatch, capsys):
    monkeypatch.setattr(runtime, "driver_without_gpu", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.pick_device("auto").type == "cpu" and capsys.readouterr().err == ""
    with pytest.raises(KdkitError, match="no CUDA device is visible to torch; use --device cpu"):
        runtime.pick_device("cuda")
    with pytest.raises(KdkitError, match="--device tpu: expected one of auto, cpu, gpu, cuda"):
        runtime.pick_device("tpu")


def test_every_long_job_says_where_it_runs(capsys):
    with runtime.start("cpu", announce="kdkit train") as rt:
        assert (rt.rank, rt.world, rt.dali_device, rt.device_id) == (0, 1, "cpu", None)
        assert rt.reduce_sum([1.5, 2]) == [1.5, 2.0] and rt.gather("x") == ["x"] and not rt.any(False)
    assert capsys.readouterr().err.startswith("kdkit train: running on the CPU")
