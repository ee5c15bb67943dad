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
import importlib

# what `from kdkit.pipelines import X` finds, and the module holding it: imported on first use, so that
# kdkit.pipelines.options (the loader's options, no DALI) imports where DALI is not installed
_EXPORTS = {
    "IMAGE_EXT": "common", "LABEL_EXT": "common", "TEACHER_EXT": "common",
    "VIEW_FIELDS": "common", "Backend": "options", "Output": "options", "Reading": "options",
    "Batch": "config", "ViewsBatch": "config", "LoaderConfig": "config", "loader_config": "config",
    "roles": "config", "eval_loader": "loader", "Role": "config", "Eval": "eval", "DaliLoader": "loader",
    "build_pipeline": "loader", "Replay": "replay", "TeacherViews": "teacher_views", "Train": "train",
    "ShardError": "kdkit.shards.reader", "ShardSet": "kdkit.shards.reader", "reading_order": "kdkit.shards.reader",
    "resolve_shards": "kdkit.shards.reader", "scan_shards": "kdkit.shards.reader",
}
__all__ = list(_EXPORTS)


def require_dali() -> None:
    """A KdkitError saying how to install DALI, where it is missing."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:  # kdkit installed without the extra for the machine's CUDA
        from kdkit.errors import KdkitError

        raise KdkitError("NVIDIA DALI is not installed: install kdkit with the extra for your CUDA driver, "
                         "`pip install -e '.[cu13]'` (driver R580+, or no GPU) or `'.[cu12]'` (R525-R575), or run "
                         "`bash scripts/setup.sh [--cuda 12]` (docs/gpu.md: Which CUDA)") from None


def __getattr__(name: str):
    where = _EXPORTS.get(name)
    if where is None:
        raise AttributeError(f"module 'kdkit.pipelines' has no attribute {name!r}")
    if where not in ("options",) and not where.startswith("kdkit."):
        require_dali()
    module = importlib.import_module(where if where.startswith("kdkit.") else f"kdkit.pipelines.{where}")
    value = getattr(module, name)
    globals()[name] = value
    return value
