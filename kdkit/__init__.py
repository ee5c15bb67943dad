"""kdkit: knowledge distillation and fast DALI image pipelines over WebDataset shards."""
__version__ = "0.1.0"
