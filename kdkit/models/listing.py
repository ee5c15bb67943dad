"""What `kdkit models` prints: kdkit's registered variants, and a few timm baselines, with their size
and cost at one resolution.

Cost is in GMACs, not "GFLOPs", on purpose. torch's FlopCounterMode counts FLOPs = 2 x the
multiply-accumulates of convolutions and matrix products (norms, activations and pooling are not
counted). Papers quote the MAC count under the name "GFLOPs" (ResNet-50: "4.1 GFLOPs" at 224 px),
so GMACs = FlopCounterMode FLOPs / 2 is the number to compare with them.
"""
from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from kdkit.errors import KdkitError
from kdkit.models.factory import create_model

GMACS_NOTE = ("GMACs: multiply-accumulates (G) of one image, batch 1 = torch FlopCounterMode FLOPs / 2; "
              "convs and matmuls only. Papers' 'GFLOPs' for ResNet-50 (4.1) are these GMACs.")

# timm's own steps of the same ablation ladder, listed rather than re-registered under kdkit names
BASELINES = {
    "resnet18": "ResNet-18 baseline (He et al. 2015, 1512.03385)",
    "resnet50": "ResNet-50 baseline (He et al. 2015, 1512.03385)",
    "resnet50d": "ResNet-50-D: deep stem + avg-pool shortcuts (bag of tricks, 1812.01187)",
    "skresnet50d": "ResNet-50-D + SK (1903.06586); timm turns zero-gamma off here by default",
    "resnetblur50d": "ResNet-50-D + BlurPool in strided convs and stem pool (1904.11486)",
    "ecaresnet50d": "ResNet-50-D + ECA channel attention (1910.03151)",
}
# the timm names of the other seeds' backbones (TF2, Keras and OpenVINO seeds), for their size and cost
SEED_BASELINES = {  # the OpenVINO seed's "GFLOPs" are 2 x MACs: its 0.44 for MobileNetV3-L is 0.22 here
    "resnetv2_50": "pre-activation ResNet-50 (1603.05027), the TF2 seed's ResNetV2-50",
    "seresnet50": "SE-ResNet-50 (1709.01507), the TF2 seed's ResNetSE-50",
    "mobilenetv2_100": "MobileNetV2 1.0 (1801.04381), Keras seed (3,538,984 params)",
    "mobilenetv3_large_100": "MobileNetV3-Large 1.0 (1905.02244), OpenVINO seed (0.44 GFLOPs = 2 x GMACs)",
    "efficientnet_b0": "EfficientNet-B0 (1905.11946), Keras + OpenVINO seeds (0.76 GFLOPs = 2 x GMACs)",
    "efficientnet_b2": "EfficientNet-B2 (1905.11946), bag-of-tricks seed; 260 px native",
    "regnety_016": "RegNetY-1.6GF (2003.13678), bag-of-tricks seed",
}


@dataclass(frozen=True)
class ListingConfig:
    resolution: int = 224          # square input side the GMACs are measured at
    pattern: str | None = None     # glob ("assemble_*") or plain substring of the name; None: all
    baselines: bool = True         # also list the timm models in BASELINES
    num_classes: int = 1000        # head size the params are counted with (ImageNet, as papers do)


@dataclass(frozen=True)
class VariantRow:
    name: str
    source: str          # "kdkit" (registered by kdkit.models.assembled) or "timm"
    description: str
    params: int
    gmacs: float | None  # None: the model needs larger inputs than `resolution` (min_size)
    resolution: int
    min_size: int | None = None  # smallest square input it runs at, where its pretrained_cfg says


def _matches(name: str, pattern: str | None) -> bool:
    if not pattern:
        return True
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name


def measure_gmacs(model: torch.nn.Module, resolution: int, in_chans: int = 3, device: str = "meta") -> float:
    """GMACs of one batch-1 eval forward.

    On "meta" no arithmetic runs (fast for ResNet-50-size models); the model is moved there, so pass
    one you no longer need, or device="cpu" to keep it usable.
    """
    model = model.eval().to(device)
    x = torch.empty(1, in_chans, resolution, resolution, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 2e9


def _build(name: str, cfg: ListingConfig, device: str) -> torch.nn.Module:
    from kdkit.models.mlp import MLP_VARIANTS

    extra = {"img_size": cfg.resolution} if name in MLP_VARIANTS else {}  # an MLP is built for one size
    with torch.device(device):
        return create_model(name, num_classes=cfg.num_classes, **extra)


def _row(name: str, source: str, description: str, cfg: ListingConfig) -> VariantRow:
    # Built on the meta device: shapes only, no weight initialisation (half the time of a CPU build,
    # and nothing of it is needed for counting); a model whose constructor computes on tensors falls
    # back to the CPU.
    try:
        model = _build(name, cfg, "meta")
    except Exception:
        model = _build(name, cfg, "cpu")
    params = sum(p.numel() for p in model.parameters())
    min_size = ((getattr(model, "pretrained_cfg", None) or {}).get("min_input_size") or (0, 0, 0))[-1] or None
    if min_size and cfg.resolution < min_size:
        return VariantRow(name, source, description, params, None, cfg.resolution, min_size)
    try:
        gmacs = measure_gmacs(model, cfg.resolution)
    except Exception:  # an op without a meta kernel: count on a fresh CPU copy instead
        try:
            gmacs = measure_gmacs(_build(name, cfg, "cpu"), cfg.resolution, device="cpu")
        except Exception as e:
            raise KdkitError(f"{name} at {cfg.resolution}px: forward failed ({type(e).__name__}: {e})") from None
    return VariantRow(name, source, description, params, round(gmacs, 3), cfg.resolution, min_size)


def _cached_row(name: str, source: str, description: str, cfg: ListingConfig) -> VariantRow:
    """_row, remembered: an architecture's size and cost do not change between calls, and counting them
    (building every model, a FlopCounterMode forward) is what made `kdkit models` take seconds per call.
    Keyed by what defines the architectures (timm's and torch's versions, kdkit's model code); a broken
    cache file is recomputed."""
    import timm

    from kdkit import cache_root

    key = json.dumps([name, cfg.resolution, cfg.num_classes, _model_code(), timm.__version__, torch.__version__])
    path = cache_root("models") / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")
    try:
        return VariantRow(**{**json.loads(path.read_text()), "description": description, "source": source})
    except (OSError, ValueError, TypeError):
        pass
    row = _row(name, source, description, cfg)
    try:
        from kdkit import atomic

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, json.dumps(asdict(row)))
    except OSError:  # a read-only home: counted again next time
        pass
    return row


@functools.lru_cache(maxsize=1)
def _model_code() -> str:
    """A digest of kdkit's model code (kdkit/models/**.py): an edited architecture is counted again."""
    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.rglob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()


def list_variants(config: ListingConfig | None = None) -> list[VariantRow]:
    """kdkit's variants (and the timm baselines), each built without weights and measured (once per
    architecture and version: _cached_row)."""
    from kdkit.models.assembled import KD_VARIANTS
    from kdkit.models.classic import CLASSIC_VARIANTS
    cfg = config or ListingConfig()
    if cfg.resolution < 32:
        raise KdkitError(f"resolution {cfg.resolution}: the variants need at least 32 px (5 stride-2 steps)")
    from kdkit.models.mlp import mlp_variants

    wanted = [(n, "kdkit", d) for n, d in {**KD_VARIANTS, **CLASSIC_VARIANTS, **mlp_variants()}.items()]
    if cfg.baselines:
        wanted += [(n, "timm", d) for n, d in {**BASELINES, **SEED_BASELINES}.items()]
    return [_cached_row(n, src, d, cfg) for n, src, d in wanted if _matches(n, cfg.pattern)]


def format_table(rows: list[VariantRow], config: ListingConfig | None = None) -> str:
    cfg = config or ListingConfig()
    if not rows:
        return f"no model matches {cfg.pattern!r}"
    head = ("model", "from", "params", f"GMACs@{cfg.resolution}", "description")
    body = [(r.name, r.source, f"{r.params / 1e6:.2f}M", f"{r.gmacs:.2f}" if r.gmacs is not None else
             f"- (>= {r.min_size} px)", r.description) for r in rows]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(4)]
    lines = ["  ".join([line[0].ljust(widths[0]), line[1].ljust(widths[1]), line[2].rjust(widths[2]),
                        line[3].rjust(widths[3]), line[4]]) for line in [head, *body]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines + ["", GMACS_NOTE, f"params counted with a {cfg.num_classes}-class head."])


def rows_as_json(rows: list[VariantRow], config: ListingConfig | None = None) -> str:
    cfg = config or ListingConfig()
    return json.dumps({"resolution": cfg.resolution, "num_classes": cfg.num_classes,
                       "unit": "GMACs (multiply-accumulates; torch FlopCounterMode FLOPs / 2)",
                       "models": [asdict(r) for r in rows]}, indent=2)
