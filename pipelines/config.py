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

from kdkit.errors import OptionError
from kdkit.pipelines import common
from kdkit.pipelines.options import Backend, Output, Reading

__all__ = ["Backend", "Batch", "LoaderConfig", "Output", "Reading", "Role", "ViewsBatch", "loader_config", "roles"]


class Batch(NamedTuple):
    images: torch.Tensor
    labels: torch.Tensor
    teacher_logits: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None  # (values, indices) for top-k


class ViewsBatch(NamedTuple):
    center: torch.Tensor  # (B, C, H, W)
    views: torch.Tensor  # (B, K, C, H, W)
    boxes: torch.Tensor  # (B, K, 5) int32 pixels of the decoded image: x, y, w, h, flip
    labels: torch.Tensor


def as_nchw(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """DALI's HWC output seen as (..., C, H, W) with channels-last strides (layout "channels_last")."""
    return t.movedim(-1, -3) if channels_last else t


class Role:
    """One kind of loader: what it reads, the graph it builds, what it outputs and how its batches
    look. Subclasses are frozen dataclasses holding the role's own options (pipelines.train.Train,
    pipelines.eval.Eval, pipelines.replay.Replay, pipelines.teacher_views.TeacherViews); the
    defaults here are the common case: images and labels in, Batch(images, labels, teacher_logits) out."""

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

    def graph(self, members: list, teacher: dict, output: Output, backend: Backend) -> tuple:
        """The role's DALI outputs from the reader's members and the teacher outputs' arrays (values[,
        indices][, boxes]: common.unpack_teacher; empty when not read), inside a pipeline definition."""
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
