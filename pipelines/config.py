"""What a DALI loader is configured by: typed values, each checked where it is made.

    LoaderConfig(role, output, reading, backend)
      role     what the loader does (pipelines.train.Train, .eval.Eval, .replay.Replay,
               .teacher_views.TeacherViews): its own augmentation / view options, the members it
               reads, the graph it builds, the batches it yields
      output   the tensors handed over: image size, mean/std, layout, dtype, resize filter
      reading  the shard reader: batch size, shuffling, seed, sharding, last batch, teacher members
      backend  where the graph runs: CPU or GPU (device_id), DALI threads, decoder options

`loader_config(role, **options)` is the one way kdkit's stages (training, the teacher pass, eval,
export, corrupted sets, the benchmark) and Python users build one from flat options: each option
goes to the part that owns it; an option no part knows, or a value outside its range, is an
OptionError naming it, before any graph exists.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from kdkit.errors import OptionError
from kdkit.pipelines import common

LAYOUTS = ("CHW", "HWC", "channels_last")  # channels_last: HWC in DALI, an NCHW view in torch
DTYPES = ("float32", "float16")
LAST_BATCH = ("partial", "drop", "fill")
MISSING = ("error", "skip")


def check(ok: bool, name: str, value, expected: str) -> None:
    if not ok:
        raise OptionError(f"{name}={value!r}: expected {expected}")


def positive_int(name: str, value) -> None:
    check(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name, value, "an integer >= 1")


def range_pair(name: str, value, low: float, high: float | None) -> None:
    """A (min, max) pair with low < min <= max (<= high)."""
    ok = (isinstance(value, (tuple, list)) and len(value) == 2
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
          and low < value[0] <= value[1] and (high is None or value[1] <= high))
    check(ok, name, value, f"(min, max) with {low} < min <= max" + (f" <= {high}" if high is not None else ""))


@dataclass(frozen=True)
class Output:
    """The image tensors a loader hands over (and the resize filter that makes them)."""

    image_size: int = 224  # square
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN  # of 0..1 pixel values, per channel
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD
    layout: str = "CHW"  # "CHW", "HWC", or "channels_last" (NCHW tensors in channels-last memory)
    dtype: str = "float32"  # or "float16"
    antialias: bool = True  # resize like Pillow/torchvision; teacher views and replay must agree on it

    def __post_init__(self):
        positive_int("image_size", self.image_size)
        for name in ("mean", "std"):
            v = getattr(self, name)
            check(isinstance(v, (tuple, list)) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v),
                  name, v, "three numbers (R, G, B)")
            object.__setattr__(self, name, tuple(float(x) for x in v))
        check(all(s > 0 for s in self.std), "std", self.std, "positive numbers")
        check(self.layout in LAYOUTS, "layout", self.layout, " or ".join(LAYOUTS))
        check(self.dtype in DTYPES, "dtype", self.dtype, " or ".join(DTYPES))

    @property
    def planar(self) -> bool:
        """DALI's layout: CHW, or HWC (which torch sees as channels-last with `layout="channels_last"`)."""
        return self.layout == "CHW"

    @property
    def mean255(self) -> list[float]:
        return [m * 255 for m in self.mean]

    @property
    def std255(self) -> list[float]:
        return [s * 255 for s in self.std]


@dataclass(frozen=True)
class Reading:
    """How fn.readers.webdataset reads the shards, and which members it hands on."""

    batch_size: int = 64  # per rank
    shuffle: bool = True  # roles that shuffle (training) only; eval and teacher views read in stored order
    shuffle_buffer: int = 4096  # samples in the shuffle buffer (DALI initial_fill)
    seed: int = 0  # augmentation seed is seed + shard_id; the tar order seed is shared by all ranks
    shard_id: int | None = None  # default: torch.distributed rank (0 when not initialized)
    num_shards: int | None = None  # default: torch.distributed world size (1)
    last_batch: str | None = None  # "partial" | "drop" | "fill"; default per role (pipelines.loader)
    teacher_logits: bool | None = None  # None: yield them when every sample has them
    missing: str = "error"  # a sample lacking a requested member: "error", or "skip" and count it
    reader_queue_depth: int = 1  # batches the reader loads ahead of decoding (DALI's default)

    def __post_init__(self):
        positive_int("batch_size", self.batch_size)
        positive_int("shuffle_buffer", self.shuffle_buffer)
        positive_int("reader_queue_depth", self.reader_queue_depth)
        check(isinstance(self.seed, int) and self.seed >= 0, "seed", self.seed, "an integer >= 0")
        check(self.last_batch is None or self.last_batch in LAST_BATCH, "last_batch", self.last_batch,
              " or ".join(LAST_BATCH))
        check(self.missing in MISSING, "missing", self.missing, " or ".join(MISSING))
        if self.num_shards is not None:
            positive_int("num_shards", self.num_shards)
        if self.shard_id is not None:
            n = self.num_shards or 1
            check(isinstance(self.shard_id, int) and 0 <= self.shard_id < n, "shard_id", self.shard_id,
                  f"0..{n - 1} (num_shards={n})")


@dataclass(frozen=True)
class Backend:
    """Where the graph runs and how it decodes."""

    device: str = "cpu"  # "gpu": "mixed" decode and GPU operators, CUDA tensors out; "cpu": device_id=None
    device_id: int | None = None  # GPU: default LOCAL_RANK
    num_threads: int = 4  # DALI CPU worker threads
    prefetch_queue_depth: int = 2  # batches DALI prepares ahead
    fast_idct: bool = False  # libjpeg-turbo's fast IDCT (JDCT_IFAST): cheaper CPU decode, not Pillow's exact one
    hw_decoder_load: float | None = None  # GPU: share of JPEGs for the hardware decoder (DALI default)
    native_resize: bool = True  # CPU: kdkit's resize + normalize operator (pipelines.resize); False: fn.resize

    def __post_init__(self):
        check(self.device in ("cpu", "gpu"), "device", self.device, "'cpu' or 'gpu'")
        positive_int("num_threads", self.num_threads)
        positive_int("prefetch_queue_depth", self.prefetch_queue_depth)
        check(self.device_id is None or (isinstance(self.device_id, int) and self.device_id >= 0),
              "device_id", self.device_id, "None or a GPU index >= 0")
        check(self.hw_decoder_load is None or 0 <= self.hw_decoder_load <= 1, "hw_decoder_load",
              self.hw_decoder_load, "None or 0..1")

    @property
    def gpu(self) -> bool:
        return self.device == "gpu"

    @property
    def decoder(self) -> str:
        """Decoders take encoded bytes on the CPU; "mixed" means their output lands on the GPU."""
        return "mixed" if self.gpu else "cpu"

    def decoder_args(self) -> dict:
        """Decoder options beyond DALI's defaults: libjpeg-turbo's fast integer IDCT (the CPU decoder, and
        the mixed one's CPU fallback) and the GPU decoder's hardware share. On the GPU, chroma is
        upsampled as libjpeg-turbo does it (jpeg_fancy_upsampling): nvJPEG's default differs, so a teacher
        pass on the CPU and a replay on the GPU (or GPU eval and `kdkit predict`) would see other pixels."""
        args = {"use_fast_idct": True} if self.fast_idct else {}
        if self.gpu:
            args["jpeg_fancy_upsampling"] = True
            if self.hw_decoder_load is not None:
                args["hw_decoder_load"] = self.hw_decoder_load
        return args

    def to_output(self, node):
        """Small CPU-side outputs (labels, logits, boxes) follow the images onto the GPU."""
        return node.gpu() if self.gpu else node


class Batch(NamedTuple):
    images: torch.Tensor
    labels: torch.Tensor
    teacher_logits: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None  # (values, indices) for top-k


class ViewsBatch(NamedTuple):
    center: torch.Tensor  # (B, C, H, W)
    views: torch.Tensor  # (B, K, C, H, W)
    boxes: torch.Tensor  # (B, K, 5) float32: x, y, w, h, flip
    labels: torch.Tensor


def as_nchw(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """DALI's HWC output seen as (..., C, H, W) with channels-last strides (layout "channels_last")."""
    return t.movedim(-1, -3) if channels_last else t


class Role:
    """One kind of loader: what it reads, the graph it builds, what it outputs and how its batches
    look. Subclasses are frozen dataclasses holding the role's own options (pipelines.train.Train,
    pipelines.eval.Eval, pipelines.replay.Replay, pipelines.teacher_views.TeacherViews); the
    defaults here are the common case: images and labels in, Batch(images, labels, teacher) out."""

    name: ClassVar[str]
    shuffles: ClassVar[bool] = False  # reads in random order when Reading.shuffle (training roles)
    last_batch: ClassVar[str] = "partial"  # default last-batch policy
    logits: ClassVar[bool | None] = None  # teacher outputs: None = when every sample holds them, True =
    #                                       required, False = never read

    def members(self) -> list[str]:
        """Sample members read besides the teacher outputs, in the order graph() receives them."""
        return [common.IMAGE_EXT, common.LABEL_EXT]

    def check_shards(self, shards) -> None:
        """Refuse a shard set this role's options cannot read (an OptionError naming the option)."""

    def graph(self, members: list, teacher: list, output: Output, backend: Backend) -> tuple:
        """The role's DALI outputs from the reader's members (inside a pipeline definition)."""
        raise NotImplementedError

    def output_names(self, teacher_kind) -> list[str]:
        """Names of graph()'s outputs, as the PyTorch iterator hands them over."""
        return ["images", "labels", *common.teacher_names(teacher_kind)]

    def batch(self, outputs: dict, teacher_kind, channels_last: bool):
        """One torch batch from the iterator's dict."""
        return Batch(as_nchw(outputs["images"], channels_last), outputs["labels"],
                     common.teacher_batch(outputs, teacher_kind))

    def resizer(self, backend: Backend) -> str:
        """Which operator resizes this role's images: "kdkit_resize_normalize" or "fn.resize"."""
        from kdkit.pipelines.resize import native_available

        return "kdkit_resize_normalize" if native_available(backend) else "fn.resize"

    def conditionals(self) -> bool:
        """Whether the graph needs DALI conditionals (auto-augment policies)."""
        return False

    def seed(self, reading: Reading, shard_id: int) -> int:
        """The pipeline's seed: per rank, so ranks augment differently."""
        return reading.seed + shard_id


@dataclass(frozen=True)
class LoaderConfig:
    role: Role
    output: Output = field(default_factory=Output)
    reading: Reading = field(default_factory=Reading)
    backend: Backend = field(default_factory=Backend)


def roles() -> dict[str, type]:
    from kdkit.pipelines.eval import Eval
    from kdkit.pipelines.replay import Replay
    from kdkit.pipelines.teacher_views import TeacherViews
    from kdkit.pipelines.train import Train

    return {r.name: r for r in (Train, Eval, Replay, TeacherViews)}


def _route(role_type: type, options: dict) -> list[dict]:
    """Flat options -> [role's, Output's, Reading's, Backend's]; an option no part knows is an error."""
    parts = [role_type, Output, Reading, Backend]
    fields = [{f.name for f in dataclasses.fields(p)} for p in parts]
    out: list[dict] = [{}, {}, {}, {}]
    for key, value in options.items():
        where = next((i for i, names in enumerate(fields) if key in names), None)
        if where is None:
            known = sorted(set().union(*fields))
            raise OptionError(f"{key}: not a loader option of role {role_type.name!r} (options: {', '.join(known)})")
        out[where][key] = value
    return out


def loader_config(role: str | Role = "train", **options) -> LoaderConfig:
    """A LoaderConfig from a role (its name, or a role object) and flat options, each given to the part
    that owns it (the role's own options only with a role name):

        loader_config("eval", image_size=224, crop_ratio=0.875, batch_size=128, device="gpu")
        loader_config(Train(random_area=(0.35, 1.0)), batch_size=256, num_threads=8)
    """
    table = roles()
    if isinstance(role, str):
        if role not in table:
            raise OptionError(f"role={role!r}: expected one of {', '.join(table)}")
        own, output, reading, backend = _route(table[role], options)
        role = table[role](**own)
    else:
        own, output, reading, backend = _route(type(role), options)
        if own:
            role = dataclasses.replace(role, **own)
    return LoaderConfig(role, Output(**output), Reading(**reading), Backend(**backend))
