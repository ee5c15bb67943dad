"""DALI pipelines over kdkit shard sets, one module per role, each on CPU or GPU by one switch.

    train          random-resized-crop (ROI decode), flip, jitter / auto-augment, normalize
    eval           resize shorter side + centre crop, or flip / ten-crop test-time views
    teacher_views  centre crop + K random crops with their boxes and flips, reproducible
    replay         one stored teacher view per sample (or N of one decode: views_per_load), cut and
                   flipped exactly as stored

    loader = DaliLoader("shards/food", loader_config("train", batch_size=256, device="gpu"))

A LoaderConfig is the role (Train, Eval, Replay, TeacherViews: its own options) plus the Output
tensors, the Reading of the shards and the Backend (pipelines.config); DaliLoader wraps it as an
iterator of torch batches. The graph functions (decode_train, eval_views, ...) compose into
custom pipelines. Installed as kdkit.pipelines.
"""
try:
    import nvidia.dali  # noqa: F401
except ImportError:  # kdkit installed without the extra for the machine's CUDA
    from kdkit.errors import KdkitError

    raise KdkitError("NVIDIA DALI is not installed: install kdkit with the extra for your CUDA driver, "
                     "`pip install -e '.[cu13]'` (driver R580+, or no GPU) or `'.[cu12]'` (R525-R575), or run "
                     "`bash scripts/setup.sh [--cuda 12]` (README: Which CUDA)") from None

from kdkit.pipelines.common import IMAGE_EXT, LABEL_EXT, LOGITS_EXT, VIEW_FIELDS, VIEWS_EXT
from kdkit.pipelines.config import (Backend, Batch, LoaderConfig, Output, Reading, Role, ViewsBatch, loader_config,
                                    roles)
from kdkit.pipelines.eval import Eval
from kdkit.pipelines.loader import DaliLoader, build_pipeline
from kdkit.pipelines.replay import Replay
from kdkit.pipelines.shardset import ShardError, ShardSet, reading_order, resolve_shards, scan_shards
from kdkit.pipelines.teacher_views import TeacherViews
from kdkit.pipelines.train import Train

__all__ = [
    "IMAGE_EXT", "LABEL_EXT", "LOGITS_EXT", "VIEWS_EXT", "VIEW_FIELDS", "Batch", "ViewsBatch", "DaliLoader",
    "LoaderConfig", "loader_config", "roles", "Role", "Train", "Eval", "Replay", "TeacherViews", "Output",
    "Reading", "Backend", "build_pipeline", "ShardError", "ShardSet", "reading_order", "resolve_shards",
    "scan_shards",
]
