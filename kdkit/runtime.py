"""Where a command runs: the torch device, DALI's backend, this process's place in a torchrun job,
and the process group, decided here once for every command that runs models or DALI pipelines
(train, lr-find, the teacher pass, eval, predict, export, bench-loader, demo). No other module
chooses a device.

    with runtime.start("auto", announce="kdkit train") as rt:   # under torchrun: joins the group
        model.to(rt.device); DALI on rt.dali_backend("auto"); rank rt.rank of rt.world
        total = rt.reduce_sum([loss_sum, count])

Under torchrun (RANK, WORLD_SIZE and LOCAL_RANK in the environment) `start` joins the process
group (NCCL on CUDA, gloo on the CPU), whatever the world size, and leaves it at the end; each rank
uses GPU LOCAL_RANK. So `torchrun --nproc_per_node 1` runs NCCL and DDP as a job of 8 does (the GPU
check relies on it). Without torchrun everything here is a one-process no-op. DALI loaders read their
part of the shards from the group (rank_and_world).

The group's timeout bounds every collective, barriers included: NCCL's default is 10 minutes, and
its watchdog then kills the job. A command whose ranks can wait on each other longer (the teacher
pass: a rank whose shards are done waits at the barrier for the others) asks for more (`timeout`).
"""
from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from kdkit.errors import KdkitError
from kdkit.options import DEVICES, env_integer

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")  # what torchrun (and torch.multiprocessing tests) set
CPU_DALI_THREADS = 4  # DALI threads of a CPU-backend loader by default: torch shares those cores


@dataclass(frozen=True)
class Runtime:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    grouped: bool = False  # in a torch.distributed process group (under torchrun, even of one rank)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Collectives and DDP run: in a process group (one rank included), or more than one rank."""
        return self.grouped or self.world > 1

    @property
    def dali_device(self) -> str:
        """DALI's backend that goes with the torch device: "gpu" decodes and augments on this GPU."""
        return "gpu" if self.device.type == "cuda" else "cpu"

    @property
    def device_id(self) -> int | None:
        """DALI's device_id: this process's GPU, or None for DALI's CPU-only mode."""
        return self.device.index if self.device.type == "cuda" else None

    def training_defaults(self) -> dict:
        """What training uses on this device unless told otherwise: on CUDA, bf16 autocast (where the GPU
        has bf16: Ampere and newer) and channels-last tensors, about twice the images/s of fp32 NCHW on
        an H100; on the CPU neither (bf16 autocast is slower than fp32 on most CPUs)."""
        cuda = self.device.type == "cuda"
        return {"amp": "bf16" if cuda and torch.cuda.is_bf16_supported() else "none", "channels_last": cuda}

    def dali_backend(self, requested: str = "auto") -> tuple[str, int | None]:
        """(DALI device, device_id) for a loader: "auto" follows the torch device; "gpu" decodes on this
        process's GPU even where the model runs on the CPU; "cpu" is DALI's CPU backend."""
        device = self.dali_device if requested == "auto" else requested
        if device != "gpu":
            return "cpu", None
        return "gpu", self.device.index if self.device.type == "cuda" else gpu_index(self.local_rank)

    def describe(self) -> str:
        if self.device.type == "cuda":
            where = f"{self.device} ({torch.cuda.get_device_name(self.device)})"
        else:
            where = f"the CPU ({torch.get_num_threads()} torch threads)"
        part = ""
        if self.distributed:
            group = f", {dist.get_backend()} process group" if dist.is_initialized() else ""
            part = f"; rank {self.rank} of {self.world}{group}"
        return f"running on {where}{part}"

    # -- collectives: through the process group where there is one, else no-ops -------------------
    def reduce_sum(self, values) -> list[float]:
        """Element-wise sum over ranks, in float64 so sample counts and sums stay exact."""
        t = torch.as_tensor(values, dtype=torch.float64)  # a tensor on the device stays there
        if self.distributed:
            t = t.to(self.device) if self.device.type == "cuda" else t
            dist.all_reduce(t)
        return t.cpu().tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any (so all ranks stop together)."""
        return self.reduce_sum([float(flag)])[0] > 0

    def gather(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast_buffers(self, model: torch.nn.Module) -> None:
        """Rank 0's buffers (BatchNorm statistics) to every rank."""
        if self.distributed:
            for b in model.buffers():
                dist.broadcast(b.data, src=0)


def driver_without_gpu() -> str | None:
    """Why torch sees no GPU on a machine that has an NVIDIA driver, or None where that is not the case
    (no driver, or a visible GPU). The usual cause: a driver older than the CUDA this torch was built for."""
    version = "/proc/driver/nvidia/version"
    if not (os.path.exists(version) or shutil.which("nvidia-smi")) or torch.cuda.is_available():
        return None
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return None  # hidden on purpose
    try:
        with open(version) as f:
            driver = f.readline().strip()
    except OSError:
        driver = "an NVIDIA driver (nvidia-smi)"
    return (f"an NVIDIA driver is installed ({driver}) but torch {torch.__version__} (CUDA {torch.version.cuda}) "
            "sees no GPU: the driver is probably older than this CUDA; install the kdkit build for your CUDA "
            "(README: 'Which CUDA')")


_warned: set[str] = set()


def gpu_index(local_rank: int | None = None) -> int:
    """This process's GPU: CUDA device LOCAL_RANK (torchrun's), checked against the visible devices."""
    local_rank = env_integer("LOCAL_RANK", 0, low=0) if local_rank is None else local_rank
    if not torch.cuda.is_available():
        why = driver_without_gpu()
        raise KdkitError("a GPU was asked for but no CUDA device is visible to torch" + (f" ({why})" if why else
                                                                                       "; use --device cpu"))
    if local_rank >= torch.cuda.device_count():
        raise KdkitError(f"LOCAL_RANK {local_rank}, but only {torch.cuda.device_count()} CUDA devices are visible")
    return local_rank


def pick_device(requested: str = "auto", local_rank: int | None = None) -> torch.device:
    """The torch device for `requested` ("auto", "cpu", "gpu"/"cuda"); CUDA device LOCAL_RANK.
    "auto" falls back to the CPU, loudly where a driver exists but torch sees no GPU."""
    if requested not in DEVICES:
        raise KdkitError(f"--device {requested}: expected one of {', '.join(DEVICES)}")
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", gpu_index(local_rank))
    why = driver_without_gpu()
    if requested != "auto":
        raise KdkitError(f"--device {requested}: no CUDA device is visible to torch"
                         + (f" ({why})" if why else "; use --device cpu"))
    if why and why not in _warned:  # loud, once per process: training on the CPU by surprise costs days
        _warned.add(why)
        print(f"kdkit: WARNING: {why}; running on the CPU", file=sys.stderr, flush=True)
    return torch.device("cpu")


def under_torchrun() -> bool:
    return all(k in os.environ for k in TORCHRUN_ENV)


def cores() -> int:
    """The CPU cores this process may run on (its affinity: a container's or taskset's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def local_world() -> int:
    """Processes of this job on this machine (torchrun's LOCAL_WORLD_SIZE; 1 alone)."""
    return env_integer("LOCAL_WORLD_SIZE", 1, low=1)


def dali_threads(requested: int | None, gpu: bool, cpu: int = CPU_DALI_THREADS) -> int:
    """DALI worker threads of one loader: `requested`, or by default this machine's cores shared among
    its local ranks on the GPU backend (each rank's decoder feeds its own GPU from the host's cores:
    JPEG parsing, Huffman decoding of what the hardware decoder does not take, the readers), and the
    command's own CPU default (`cpu`) on the CPU backend, where torch needs the cores too."""
    if requested is not None:
        return requested
    if not gpu:
        return cpu
    return max(1, cores() // local_world())


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size of the initialized process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def start(requested: str = "auto", announce: str | None = None, distributed: bool = True,
          deterministic: bool = False, timeout: float | None = None):
    """The Runtime of this process (see the module doc); joins torchrun's process group for the block.
    `announce`: print "<announce>: running on ..." once (rank 0), so every long job says where it runs.
    distributed=False: a command that works alone (eval, predict, the benchmark) stays one process
    of its own even under torchrun, on GPU LOCAL_RANK. deterministic: torch's deterministic algorithms
    and no cuDNN autotuning (exact reproduction on the GPU, slower). timeout: seconds any collective
    (a barrier) may wait for the other ranks before the job fails (default: torch's, 10 minutes for NCCL)."""
    world = env_integer("WORLD_SIZE", 1, low=1) if distributed else 1  # torchrun's; checked, not a traceback
    local_rank = env_integer("LOCAL_RANK", 0, low=0)
    device = pick_device(requested, local_rank)
    joined = False
    if distributed and (world > 1 or under_torchrun()):
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            extra = {"timeout": datetime.timedelta(seconds=timeout)} if timeout else {}
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **extra)
            joined = True
    grouped = distributed and dist.is_available() and dist.is_initialized()
    rank, world = rank_and_world() if grouped else (0, 1)
    rt = Runtime(device, rank, world, local_rank, grouped)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    # fixed-size batches everywhere: let cuDNN pick its fastest kernels once (not where runs must repeat exactly)
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic
    if announce and rt.is_main:
        print(f"{announce}: {rt.describe()}", file=sys.stderr, flush=True)
    try:
        yield rt
    finally:
        if joined and dist.is_initialized():
            dist.destroy_process_group()
