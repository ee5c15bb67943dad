"""Converters: each lists one kind of raw dataset as a SourceDataset for the shard writer."""
from kdkit.shards.sources.base import SourceDataset, SourceSample, SourceSplit

__all__ = ["SourceDataset", "SourceSample", "SourceSplit"]
