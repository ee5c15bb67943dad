"""Big-Little Net (bL-Net) stem and stage, built from timm's residual blocks (timm has no bL-Net).

Paper: Chen et al., "Big-Little Net: An Efficient Multi-Scale Feature Representation for Visual and
Speech Recognition", ICLR 2019, https://arxiv.org/abs/1807.03848 - as assembled into ResNet-50 by
Lee et al., "Compounding the Performance Improvements of Assembled Techniques in a Convolutional
Neural Network", 2020, https://arxiv.org/abs/2001.06268 (clovaai/assembled-cnn, `resnet_version=2`).

A stage splits into a *big* branch (most of the depth, full width, run at half the resolution) and a
*little* branch (few blocks, 1/alpha the width, full resolution). The big branch is upsampled, added
to the little one, and one merge block does the stage's own stride. In bL-ResNet-50 that stride is
at the *end* of a stage (stage strides 2, 2, 1, 2 after the bL stem instead of 1, 2, 2, 2), so each
little branch runs at the resolution a plain ResNet stage would, and each big branch at half of it:
that is where the FLOPs go down. Channels in and out match a timm ResNet stage, so the stage and stem
drop into timm's ResNet; only feature_info's reductions change (kdkit.models.assembled updates them).

Differences from the reference TensorFlow code, kept small on purpose:
- the projection shortcuts use timm's ResNet-D average-pool downsample (2x2) instead of a 3x3
  average pool, so one downsample helper serves every stage;
- the big branch output is resized to the little branch's size (not a fixed 2x upsample), so odd
  feature sizes work;
- dilation (output_stride < 32) is not supported in bL stages.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn
from timm.layers import ConvNormAct
from timm.models.resnet import downsample_avg, downsample_conv

from kdkit.models.layers.residual import residual_parts


def make_blocks(block_fn, inplanes: int, planes: int, depth: int, stride: int, block_kwargs: dict,
                avg_down: bool = True) -> nn.Sequential:
    """`depth` timm residual blocks; the first one carries the stride and the projection shortcut."""
    outplanes = planes * block_fn.expansion
    downsample = None
    if stride != 1 or inplanes != outplanes:
        down = downsample_avg if avg_down else downsample_conv
        downsample = down(inplanes, outplanes, kernel_size=1, stride=stride, norm_layer=block_kwargs["norm_layer"])
    blocks = [block_fn(inplanes, planes, stride, downsample, **block_kwargs)]
    blocks += [block_fn(outplanes, planes, **block_kwargs) for _ in range(depth - 1)]
    return nn.Sequential(*blocks)


class BigLittleStage(nn.Module):
    """One bL stage in place of a ResNet stage of `depth` blocks.

    big:    max(1, depth - 1) blocks, the first with stride 2, `planes` wide, no ReLU after its last
            addition (the merge adds and rectifies);
    little: max(1, depth // beta - 1) blocks, stride 1, `planes // alpha` wide, then a 1x1 conv +
            norm up to the big branch's channels;
    merge:  ReLU(little + upsampled big), then one block with the stage's `stride`.
    """

    def __init__(self, block_fn, inplanes: int, planes: int, depth: int, stride: int, alpha: int = 2,
                 beta: int = 4, block_kwargs: dict | None = None, avg_down: bool = True):
        super().__init__()
        kw = dict(block_kwargs or {})
        kw.setdefault("norm_layer", nn.BatchNorm2d)
        kw.setdefault("act_layer", nn.ReLU)
        if planes % alpha:
            raise ValueError(f"bL stage: width {planes} is not divisible by bl_alpha={alpha}")
        outplanes = planes * block_fn.expansion
        little_planes = planes // alpha

        self.big = make_blocks(block_fn, inplanes, planes, max(1, depth - 1), 2, kw, avg_down)
        last = self.big[-1]
        setattr(last, residual_parts(last)[1], nn.Identity())
        last.linear_out = True  # read by the EvoNorm layout pass, which would otherwise restore the ReLU

        self.little = make_blocks(block_fn, inplanes, little_planes, max(1, depth // beta - 1), 1, kw, avg_down)
        self.little_expand = ConvNormAct(little_planes * block_fn.expansion, outplanes, 1, apply_act=False,
                                         norm_layer=kw["norm_layer"], act_layer=kw["act_layer"])
        # a plain ReLU whatever the norm: it rectifies a sum, like the one after a residual addition
        self.merge_act = nn.ReLU(inplace=True)
        self.merge = make_blocks(block_fn, outplanes, planes, 1, stride, kw, avg_down)

    def forward(self, x):
        little = self.little_expand(self.little(x))
        big = F.interpolate(self.big(x), size=little.shape[-2:], mode="nearest")
        return self.merge(self.merge_act(little + big))

    def __iter__(self):
        # timm's checkpoint_seq(flatten=True) iterates over each stage; gradient checkpointing then
        # treats a bL stage as one segment instead of failing on a non-Sequential stage
        return iter((self,))


class BigLittleStem(nn.Module):
    """bL module 0, in place of the stem max-pool: stride 2, channels kept.

    big: 3x3 stride-2 conv; little: 3x3 conv, 3x3 stride-2 conv (channels / alpha), 1x1 conv back;
    ReLU of the sum, then a 1x1 conv-norm-act fuses them.
    """

    def __init__(self, channels: int, alpha: int = 2, norm_layer=nn.BatchNorm2d, act_layer=nn.ReLU):
        super().__init__()
        if channels % alpha:
            raise ValueError(f"bL stem: {channels} channels are not divisible by bl_alpha={alpha}")
        little = channels // alpha
        kw = dict(norm_layer=norm_layer, act_layer=act_layer)
        self.big = ConvNormAct(channels, channels, 3, stride=2, apply_act=False, **kw)
        self.little = nn.Sequential(
            ConvNormAct(channels, little, 3, **kw),
            ConvNormAct(little, little, 3, stride=2, **kw),
            ConvNormAct(little, channels, 1, apply_act=False, **kw),
        )
        self.merge_act = nn.ReLU(inplace=True)
        self.fuse = ConvNormAct(channels, channels, 1, **kw)

    def forward(self, x):
        return self.fuse(self.merge_act(self.big(x) + self.little(x)))
