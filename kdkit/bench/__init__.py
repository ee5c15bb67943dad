"""Benchmarks: `kdkit bench-loader` (DALI pipelines against a DataLoader + Pillow baseline).

Kept import-light: the CLI reads AUGS when it builds its parser.
"""

# augmentations both loaders implement (DALI graph / torchvision transforms)
AUGS = ("rrc-flip", "rrc-flip-jitter", "randaugment", "autoaugment", "trivialaugment", "augmix", "eval")
