"""What a teacher pass is asked to do, as one typed config the CLI fills and Python users build.

The config splits in two: options that change the stored bytes (teachers, views, top-k, the
transform, the view seed, and the device and AMP: CPU and GPU decoders and fp16 differ in the last
bits) make up the pass's *fingerprint*, which resume and "already done" checks compare; options that
only change how fast it runs (threads, batch size in single-view mode) do not, so a pass interrupted
on one machine may be finished on another of the same kind.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kdkit.errors import KdkitError
from kdkit.options import DEVICES, same_as
from kdkit.pipelines.options import Backend, decoding
from kdkit.shards.location import location


@dataclass
class TeacherSpec:
    """One teacher: a local checkpoint, plus the model name when the checkpoint does not carry one."""

    checkpoint: Path
    model: str | None = None  # required for a bare timm/torchvision state dict
    model_kwargs: dict = field(default_factory=dict)  # extra create_model kwargs for a bare state dict
    prefer_ema: bool = True  # the EMA weights where the checkpoint has them (kdkit's rule for every command)
    trust: bool = False  # the file may hold pickled Python objects (--trust-checkpoint): loading them runs code


@dataclass
class TeacherPassConfig:
    shards: Path  # a shard-set folder, or a dataset root holding one per split (or a bucket URL of either)
    teachers: list[TeacherSpec] = field(default_factory=list)  # several: probabilities are averaged
    splits: list[str] | None = None  # of a dataset root; None = every split found
    out: Path | None = None  # a new dataset root (or set folder, local or a bucket URL) beside the old one ...
    in_place: bool = False  # ... or replace each shard of the input atomically
    views: int | None = None  # None: the centre crop only; K: K random-resized-crop views + boxes
    topk: int | None = None  # store the k largest logits (+ indices) instead of all of them
    import_h5: Path | None = None  # take the outputs from this HDF5 file instead of running a teacher
    export_h5: Path | None = None  # write the set's teacher outputs to this HDF5 file at the end
    repack: bool = False  # convert the set's teacher outputs from one .npy member per array to the packed member
    # transform: None = what the (first) teacher's checkpoint or timm config says
    image_size: int | None = None
    crop_ratio: float | None = None
    random_area: tuple[float, float] = (0.08, 1.0)
    random_aspect_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    antialias: bool = True
    seed: int = 0  # seed of the random views: sample j of shard s draws from (seed, s, j) (teacher_views.ViewDraws)
    # running
    device: str = "cpu"  # "gpu": CUDA device LOCAL_RANK, DALI on the GPU, AMP; "auto": the GPU where one is visible
    amp: bool = True  # fp16 autocast on the GPU (ignored on the CPU)
    batch_size: int = 64
    threads: int | None = None  # DALI threads; None: cores / local ranks on the GPU, min(8, cores) on the CPU
    # the GPU decoder (pipelines.options.DECODING): how fast, not what, so not in the fingerprint
    hw_decoder_load: float | None = same_as(Backend, "hw_decoder_load")
    preallocate_width_hint: int | None = same_as(Backend, "preallocate_width_hint")
    preallocate_height_hint: int | None = same_as(Backend, "preallocate_height_hint")
    torch_threads: int | None = None  # CPU teacher: torch intra-op threads; None = cores left by DALI (>= 1)
    rank: int | None = None  # this process's part; default: torch.distributed rank (0 alone)
    world: int | None = None  # number of parts; default: torch.distributed world size (1 alone)
    progress: bool = True
    command: str = ""

    def check(self) -> None:
        """Contradictions in the options, refused before anything is read."""
        computing = bool(self.teachers)
        if computing and self.import_h5:
            raise KdkitError("--import-h5 takes the outputs from the file: give it without --model/--checkpoint")
        if self.repack and (computing or self.import_h5 or self.views or self.topk):
            raise KdkitError("--repack converts the outputs the set holds: give it without --checkpoint, --import-h5, "
                             "--views or --topk")
        writing = computing or self.import_h5 is not None or self.repack
        if writing and self.out is None and not self.in_place:
            raise KdkitError("say where the result goes: --out NEW_FOLDER (a new set beside the old one) "
                             "or --in-place (replace each shard atomically)")
        if writing and self.out is not None and self.in_place:
            raise KdkitError("--out and --in-place: give one of them, not both")
        if not writing and self.export_h5 is None:
            raise KdkitError("nothing to do: give a teacher (--checkpoint [--model]), --import-h5 FILE, --repack, "
                             "or --export-h5 FILE to export logits the set already holds")
        if not writing and (self.out is not None or self.in_place):
            raise KdkitError("--out/--in-place need a teacher or --import-h5 to take outputs from")
        if self.out is not None and location(self.out).resolve() == location(self.shards).resolve():
            raise KdkitError(f"{self.out}: --out is the input itself; use --in-place to replace its shards")
        if self.views is not None and self.views < 1:
            raise KdkitError(f"--views {self.views}: expected K >= 1 random views (leave it out for the centre crop)")
        if self.topk is not None and self.topk < 1:
            raise KdkitError(f"--topk {self.topk}: expected k >= 1")
        if self.device not in DEVICES:
            raise KdkitError(f"--device {self.device}: expected one of {', '.join(DEVICES)}")
        if self.batch_size < 1 or (self.threads is not None and self.threads < 1):
            raise KdkitError("--batch-size and --threads must be at least 1")
        decoding(self)  # the decoder's options, checked as the flags check them
        if self.crop_ratio is not None and not 0 < self.crop_ratio <= 1:
            raise KdkitError(f"--crop-ratio {self.crop_ratio}: expected 0 < ratio <= 1")

    def view_transform(self, image_size: int, crop_ratio: float) -> dict:
        """The views the teacher saw, as stored in the manifest (enough to reproduce them)."""
        t = {"image_size": image_size, "interpolation": "linear", "antialias": self.antialias}
        if self.views is None:
            return {"view": "center", "resize_shorter": int(round(image_size / crop_ratio)),
                    "crop_ratio": crop_ratio, **t}
        # the stored boxes are what counts, these say how they were drawn: per sample, from numpy's
        # default_rng((seed, shard index, index in the shard)), whatever the batch size or the ranks
        return {"view": "random-resized-crop", "views": self.views, "random_area": list(self.random_area),
                "random_aspect_ratio": list(self.random_aspect_ratio), "flip": self.flip, "seed": self.seed,
                "draws": "per sample: default_rng((seed, shard, index))", **t}
