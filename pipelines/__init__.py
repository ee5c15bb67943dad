"""DALI pipelines over kdkit shard sets, one module per role, each on CPU or GPU by one switch.

    train          random-resized-crop (ROI decode), flip, jitter / auto-augment, normalize
    eval           resize shorter side + centre crop, or flip / ten-crop test-time views
    teacher_views  centre crop + K random crops with their boxes and flips, reproducible
    replay         one stored teacher view per sample, cut and flipped exactly as stored

`DaliLoader(shards, LoaderConfig(...), role=...)` wraps any of them as an iterator of torch
batches; the plain graph functions (decode_train, eval_views, ...) compose into custom pipelines.
"""
from kdkit.pipelines.common import IMAGE_EXT, LABEL_EXT, LOGITS_EXT, VIEW_FIELDS, VIEWS_EXT
from kdkit.pipelines.loader import ROLES, Batch, DaliLoader, LoaderConfig, ViewsBatch, build_pipeline
from kdkit.pipelines.shardset import ShardError, ShardSet, reading_order, resolve_shards, scan_shards

__all__ = [
    "IMAGE_EXT", "LABEL_EXT", "LOGITS_EXT", "VIEWS_EXT", "VIEW_FIELDS", "ROLES", "Batch", "ViewsBatch",
    "DaliLoader", "LoaderConfig", "build_pipeline", "ShardError", "ShardSet", "reading_order",
    "resolve_shards", "scan_shards",
]
