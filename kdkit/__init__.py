"""kdkit: knowledge distillation and fast DALI image pipelines over WebDataset shards."""
__version__ = "0.1.0"


def cache_root(sub: str):
    """kdkit's cache folder for `sub` ("native": builds of its DALI operator; "checked": verified shard
    checksums): $KDKIT_CACHE/sub, by default ~/.cache/kdkit/sub."""
    import os
    from pathlib import Path

    return Path(os.environ.get("KDKIT_CACHE") or Path.home() / ".cache" / "kdkit") / sub
