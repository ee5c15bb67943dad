"""The DALI loader's options, declared once: the training roles' crop, flip, colour, rotation,
policies and stored views, and the Output / Reading / Backend parts every loader has.

Each option is one field here (kdkit.options.option: type, default, range, help, checked by
kdkit.options.check_options). The DALI roles (pipelines.train.Train, pipelines.replay.Replay,
pipelines.teacher_views.TeacherViews) inherit these classes, and so do the configs that expose them
(kdkit train's TrainConfig, bench-loader's BenchConfig), so an option's range and refusals live
here alone: a new augmentation is one field of Augment and the graph code that uses it
(pipelines.train.augment_resized or train_views). No DALI and no torch here, so a command line
is built from these without loading either. The options are keyword-only, so a config holding
them (by inheritance) keeps its own positional fields first.
"""
from __future__ import annotations

from dataclasses import dataclass

from kdkit.options import AUGMENT, DATA, DEVICE, KD, check_options, check_value, option

AUTO_AUGMENTS = ("autoaugment", "randaugment", "trivialaugment")
LAYOUTS = ("CHW", "HWC", "channels_last")  # channels_last: HWC in DALI, an NCHW view in torch
DTYPES = ("float32", "float16")
LAST_BATCH = ("partial", "drop", "fill")
MISSING = ("error", "skip")
# timm.data's IMAGENET_DEFAULT_MEAN / _STD (tested equal), written out so that no command line loads timm
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True, kw_only=True)
class RandomCrop:
    """Random-resized-crop windows and flips (training crops, the teacher's random views)."""

    random_area: tuple[float, float] = option((0.08, 1.0), "random-resized-crop area range: MIN MAX shares of "
                                              "the image area", AUGMENT, low=0, high=1, above=True, ordered=True)
    random_aspect_ratio: tuple[float, float] = option((3 / 4, 4 / 3), "random-resized-crop aspect ratio range "
                                                      "(width / height): MIN MAX", AUGMENT, low=0, above=True,
                                                      ordered=True)
    flip: bool = option(True, "random horizontal flip", AUGMENT)


@dataclass(frozen=True, kw_only=True)
class CenterCrop:
    """The evaluation view: the shorter side resized to image_size / crop_ratio, the centre cut out."""

    crop_ratio: float = option(0.875, "centre crop: image size / resized shorter side (224/256 = 0.875, timm's "
                                      "crop_pct)", AUGMENT, low=0, high=1, above=True)


@dataclass(frozen=True, kw_only=True)
class Augment:
    """Photometric, geometric and policy augmentation of training crops."""

    color_jitter: float = option(0.0, "brightness/contrast/saturation jitter strength s: factors uniform in "
                                      "[1 - s, 1 + s] (0 = off)", AUGMENT, low=0)
    hue: float = option(0.0, "hue jitter: uniform in [-H, H] of the hue circle (0 = off; DALI's YIQ hue)", AUGMENT,
                        low=0, high=0.5)
    rotate: float = option(0.0, "random rotation in [-DEG, DEG] degrees of the resized crop (0 = off)", AUGMENT,
                           low=0, high=180)
    rotate_fill: float | None = option(None, "grey level 0..255 of the corners a rotation uncovers (default: the "
                                             "mean colour)", AUGMENT, low=0, high=255)
    auto_augment: str | None = option(None, "auto-augment policy (DALI auto_aug; default: none)", AUGMENT,
                                      choices=AUTO_AUGMENTS)
    randaugment_n: int = option(2, "RandAugment: operations per image", AUGMENT, low=0)
    randaugment_m: int = option(9, "RandAugment: magnitude (DALI's bins)", AUGMENT, low=0, high=30)
    augmix: bool = option(False, "AugMix (timm's augment_and_mix, built from DALI's auto_aug operations)", AUGMENT)
    augmix_severity: int = option(3, "AugMix: magnitude of its operations", AUGMENT, low=1, high=10)
    augmix_width: int = option(3, "AugMix: augmentation chains mixed", AUGMENT, low=1)
    augmix_depth: int = option(-1, "AugMix: operations per chain, 1..3, or -1 to draw 1..3 per chain", AUGMENT,
                               low=-1, high=3)
    augmix_alpha: float = option(1.0, "AugMix: Dirichlet / Beta parameter of the mixing weights", AUGMENT, low=0,
                                 above=True)
    augmix_jsd: bool = option(False, "AugMix's Jensen-Shannon consistency loss (timm's JsdCrossEntropy) over the "
                                     "clean and two AugMix views of each sample; needs --augmix", AUGMENT)

    def refusals(self) -> list[tuple[bool, str]]:
        return [
            (self.augmix_depth == 0, "augmix_depth=0: expected 1, 2, 3, or -1 (drawn from 1..3 per chain)"),
            (self.augmix and bool(self.auto_augment),
             f"augmix=True: one augmentation policy at a time: AugMix and auto_augment={self.auto_augment!r} "
             "exclude each other; drop one of them"),
            (self.augmix_jsd and not self.augmix,
             "augmix_jsd=True: expected augmix=True with it (the Jensen-Shannon loss compares AugMix views)"),
        ]

    def resizer(self, backend) -> str:
        """Training crops (train, replay) go through kdkit's CPU operator where it is available, except
        with an auto-augment policy or AugMix: those need the resized uint8 pixels, so they keep fn.resize."""
        from kdkit.pipelines.resize import native_available

        native = native_available(backend) and not self.auto_augment and not self.augmix
        return "kdkit_resize_normalize" if native else "fn.resize"

    def conditionals(self) -> bool:
        """DALI's auto_aug policies (and AugMix, built from their operations) need conditionals in the graph."""
        return bool(self.auto_augment) or self.augmix


@dataclass(frozen=True, kw_only=True)
class StoredViews:
    """Training on the teacher's stored views (the replay role, `kdkit train student --kd replay`)."""

    views_per_load: int = option(
        1, "--kd replay: stored views cut from each decoded image (FKD's reuse of one decode); a step trains on "
           "batch-size x N images, each with its own view's logits. Views per load: a random offset o, then "
           "o..o+N-1 mod K, so distinct while N <= K (N > K is refused) and the same after --resume. --lr is the "
           "rate of that B x N step (scale it as for batch B x N); mixup/cutmix mix within the B x N images",
        KD, low=1)

    def replay_refusals(self) -> list[tuple[bool, str]]:
        """What replaying stored views cannot do (self: an Augment too): the replay role and --kd replay
        both refuse these."""
        return [
            (bool(self.rotate), f"rotate={self.rotate!r}: expected 0 with replay: the stored teacher views record "
                                "crop box and flip but no rotation angle, so a rotated view is not what the teacher "
                                "saw; use --kd stored, or --rotate 0"),
            (self.augmix_jsd, "augmix_jsd=True: expected False with replay (one stored view per image, not the "
                              "three views the Jensen-Shannon loss compares)"),
        ]


@dataclass(frozen=True, kw_only=True)
class Output:
    """The image tensors a loader hands over (and the resize filter that makes them)."""

    image_size: int = option(224, "training and evaluation resolution (square)", DATA, low=8)
    mean: tuple[float, float, float] = option(IMAGENET_MEAN, "per-channel mean of 0..1 pixel values (R G B)")
    std: tuple[float, float, float] = option(IMAGENET_STD, "per-channel std of 0..1 pixel values (R G B)",
                                             low=0, above=True)
    layout: str = option("CHW", "CHW, HWC, or channels_last (NCHW tensors in channels-last memory)", choices=LAYOUTS)
    dtype: str = option("float32", "float32 or float16", choices=DTYPES)
    antialias: bool = option(True, "antialiased resize of the crops, as Pillow and torchvision do; --no-antialias "
                                   "lets shrunk crops alias (teacher views and replay must agree on it)", AUGMENT)

    def __post_init__(self):
        check_options(self)

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


@dataclass(frozen=True, kw_only=True)
class Reading:
    """How fn.readers.webdataset reads the shards, and which members it hands on."""

    batch_size: int = option(64, "batch size per process (rank)", DATA, low=1)
    shuffle: bool = option(True, "shuffle (roles that shuffle: training); eval and teacher views read in stored order")
    shuffle_buffer: int = option(4096, "DALI shuffle buffer (samples); more = better mixed batches, more memory",
                                 DATA, low=1)
    seed: int = option(0, "augmentation seed is seed + shard_id; the tar order seed is shared by all ranks", low=0)
    shard_id: int | None = option(None, "this rank's part (default: torch.distributed's rank, 0 alone)", low=0)
    num_shards: int | None = option(None, "parts (default: torch.distributed's world size, 1 alone)", low=1)
    last_batch: str | None = option(None, "partial, drop or fill (default: the role's; pipelines.loader)",
                                    choices=LAST_BATCH)
    teacher_logits: bool | None = option(None, "read the teacher outputs (default: when every sample has them)")
    missing: str = option("error", "a sample lacking a requested member: error, or skip and count it",
                          choices=MISSING)
    reader_queue_depth: int = option(1, "batches the reader loads ahead of decoding (DALI's default)", low=1)

    def __post_init__(self):
        check_options(self)

    def refusals(self):
        n = self.num_shards or 1
        return [(self.shard_id is not None and self.shard_id >= n,
                 f"shard_id={self.shard_id!r}: expected 0..{n - 1} (num_shards={n})")]


@dataclass(frozen=True, kw_only=True)
class Backend:
    """Where the graph runs and how it decodes."""

    device: str = option("cpu", "gpu: 'mixed' decode and GPU operators, CUDA tensors out; cpu: device_id=None",
                         choices=("cpu", "gpu"))
    device_id: int | None = option(None, "GPU index (default: LOCAL_RANK)", low=0)
    num_threads: int | None = option(None, "DALI worker threads per process (default: the machine's cores / its "
                                           "local ranks on the GPU backend, 4 on the CPU backend)", DATA, low=1)
    prefetch_queue_depth: int = option(2, "batches DALI prepares ahead", low=1)
    fast_idct: bool = option(False, "decode JPEGs with libjpeg-turbo's fast IDCT (CPU decoder; ~1 grey level off)",
                             DEVICE)
    # the GPU decoder's options (DECODING): the commands that read images on the GPU re-declare them (same_as)
    hw_decoder_load: float | None = option(None, "GPU: share of each batch's JPEGs for the hardware JPEG decoder "
                                                 "(A100, H100), the rest on CUDA (default: DALI's, 0.65; about 0.9 "
                                                 "suits an H100)", DEVICE, low=0, high=1)
    preallocate_width_hint: int | None = option(None, "GPU: image width the hardware JPEG decoder preallocates for, "
                                                      "so a larger image does not reallocate mid-run (default: "
                                                      "DALI's)", DEVICE, low=1)
    preallocate_height_hint: int | None = option(None, "GPU: image height the hardware JPEG decoder preallocates "
                                                       "for (default: DALI's)", DEVICE, low=1)
    native_resize: bool = option(True, "CPU: kdkit's resize + normalize operator (pipelines.resize); "
                                       "--no-native-resize: DALI's fn.resize, same pixels, slower")

    def __post_init__(self):
        check_options(self)

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
            args.update({k: v for k, v in decoding(self).items() if v is not None})
        return args

    def to_output(self, node):
        """Small CPU-side outputs (labels, logits, boxes) follow the images onto the GPU."""
        return node.gpu() if self.gpu else node


DECODING = ("hw_decoder_load", "preallocate_width_hint", "preallocate_height_hint")  # Backend's GPU decoder options


def decoding(cfg) -> dict:
    """The GPU decoder's options (DECODING) of a config that declares them, as loader_config takes them,
    each checked against Backend's declaration (an OptionError naming it)."""
    return {name: check_value(Backend, name, getattr(cfg, name)) for name in DECODING}


@dataclass(frozen=True)
class Transform:
    """A model's input transform: what its checkpoint records (kdkit.models.checkpoint) and every loader
    of it reads (the train loader's normalisation, the eval loaders' centre crop)."""

    image_size: int = 224
    crop_ratio: float = 0.875
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
