"""Building blocks timm lacks, built from timm's own layers and residual blocks."""
from kdkit.models.layers.big_little import BigLittleStage, BigLittleStem
from kdkit.models.layers.residual import residual_parts

__all__ = ["BigLittleStage", "BigLittleStem", "residual_parts"]
