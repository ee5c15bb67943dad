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


def torchrun_env(monkeypatch, rank: int, world: int, port: int) -> None:
    for k, v in dict(RANK=rank, WORLD_SIZE=world, LOCAL_RANK=rank, LOCAL_WORLD_SIZE=world, MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=port).items():
        monkeypatch.setenv(k, str(v))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_of_one_process_joins_the_group(monkeypatch, capsys):
    """`torchrun --nproc_per_node 1` (the GPU check's DDP step) must run the process group and DDP, not
    the one-process no-ops: otherwise NCCL and DDP go unproven until a job of 8."""
    import torch.distributed as dist

    torchrun_env(monkeypatch, 0, 1, free_port())
    with runtime.start("cpu", announce="kdkit train") as rt:
        assert dist.is_initialized() and rt.distributed and (rt.rank, rt.world) == (0, 1)
        assert rt.reduce_sum([1.5, 2]) == [1.5, 2.0] and rt.gather("x") == ["x"] and not rt.any(False)
        rt.barrier()
    assert not dist.is_initialized()  # left at the end
    assert "rank 0 of 1, gloo process group" in capsys.readouterr().err
    with runtime.start("cpu", distributed=False) as rt:  # a command that works alone stays alone
        assert not dist.is_initialized() and not rt.distributed


def _barrier_worker(rank: int, port: int, timeout: float, out: str) -> None:
    import os
    import time
    from pathlib import Path

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    try:
        with runtime.start("cpu", timeout=timeout) as rt:
            if rank == 1:
                time.sleep(6)  # a rank still busy (the teacher pass: its shards are not done yet)
            rt.barrier()
        result = "passed"
    except Exception as e:  # noqa: BLE001 - the outcome is what the test reads
        result = f"failed: {type(e).__name__}"
    Path(out, f"rank{rank}").write_text(result)


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("timeout, rank0", [(2, "failed"), (60, "passed")])
def test_the_group_timeout_bounds_a_barrier(tmp_path, timeout, rank0):
    """start(timeout=) reaches the process group: a barrier gives up after it (2 s), and waits out a rank
    that needs longer than torch's default would allow when given more (here 60 s for a 6 s wait)."""
    torch.multiprocessing.spawn(_barrier_worker, args=(free_port(), timeout, str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "rank0").read_text().startswith(rank0)
