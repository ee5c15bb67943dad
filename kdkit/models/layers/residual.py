"""Where the last norm and the post-addition activation sit in each of timm's ResNet blocks.

timm's four ResNet blocks name these differently (and the SK blocks keep their last norm inside a
ConvNormAct), yet three things need them by name: turning a residual branch linear for EvoNorm,
dropping the final ReLU of a Big-Little big branch, and tests that check zero-gamma.
"""
from __future__ import annotations

from torch import nn
from timm.models.resnet import BasicBlock, Bottleneck
from timm.models.sknet import SelectiveKernelBasic, SelectiveKernelBottleneck

# block type -> (attribute of the last norm of the residual branch, attribute of the activation
# after the addition). None: the last norm is a ConvNormAct built with apply_act=False already.
_PARTS: dict[type, tuple[str | None, str]] = {
    BasicBlock: ("bn2", "act2"),
    Bottleneck: ("bn3", "act3"),
    SelectiveKernelBasic: (None, "act"),
    SelectiveKernelBottleneck: (None, "act"),
}


def residual_parts(block: nn.Module) -> tuple[str | None, str] | None:
    """(last norm attribute, post-add activation attribute) of a timm ResNet block, else None."""
    for cls, parts in _PARTS.items():
        if isinstance(block, cls):
            return parts
    return None


def last_norm(block: nn.Module) -> nn.Module:
    """The norm whose weight zero-gamma zeroes (the one `block.zero_init_last()` touches)."""
    name, _ = residual_parts(block)
    if name is not None:
        return getattr(block, name)
    return block.conv3.bn if isinstance(block, SelectiveKernelBottleneck) else block.conv2.bn
