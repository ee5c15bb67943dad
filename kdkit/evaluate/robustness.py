"""Corruption robustness as Hendrycks & Dietterich (2019) define it and the Assemble-ResNet seed
reports it (mCE normalised by AlexNet).

With E(f, c, s) the top-1 error of model f on corruption c at severity s, and E_clean(f) its
error on the clean centre view:

    CE(f, c)          = sum_s E(f, c, s) / sum_s E(ref, c, s)
    mCE(f)            = mean over c of CE(f, c)
    relative CE(f, c) = sum_s (E(f, c, s) - E_clean(f)) / sum_s (E(ref, c, s) - E_clean(ref))
    relative mCE(f)   = mean over c of relative CE(f, c)

All are ratios (1.0 = as robust as the reference; printed x100 as %). Without a reference only
the mean corruption error is reported (Hendrycks' "mCE (unnormalized)"). The reference is any
checkpoint, evaluated in the same run on the same corrupted images; the JSON of an earlier
`kdkit eval` (its "robustness" block); or "alexnet", the published AlexNet errors on ImageNet-C
(meaningful only for ImageNet val with all 15 corruptions at severities 1-5, and even then
approximate: kdkit re-creates the corruptions rather than reading ImageNet-C's files).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from kdkit.errors import KdkitError
from kdkit.evaluate.corrupted_shards import (STORE_QUALITY, CorruptionPool, as_uint8, corrupted_set,
                                             raw_view_loader)
from kdkit.evaluate.corruptions import NAMES, SEVERITIES
from kdkit.evaluate.ensemble import ensemble_probs, normalize_uint8
from kdkit.models.checkpoint import ModelInfo


@dataclass
class RobustnessConfig:
    corruptions: list[str] = field(default_factory=lambda: list(NAMES))
    severities: list[int] = field(default_factory=lambda: list(SEVERITIES))
    reference: str | None = None  # checkpoint, JSON of an earlier run, or "alexnet"
    corrupted: Path | None = None  # read written-once sets (write_corrupted) instead of corrupting on the fly
    seed: int = 0
    store_quality: int | None = STORE_QUALITY  # JPEG round trip on the fly, as ImageNet-C's stored files; None: off
    frost_dir: Path | None = None  # the reference's frost photos; default: procedural frost (an approximation)
    workers: int = 1  # processes corrupting images (on the fly)
    progress: bool = True


@dataclass
class Reference:
    name: str
    clean_error: float | None
    errors: dict[str, dict[int, float]]  # corruption -> severity -> top-1 error
    mean_only: bool = False  # errors[c][0] is the mean over severities 1-5 (published tables)

    def errors_for(self, corruption: str, severities: list[int]) -> list[float]:
        if corruption not in self.errors:
            raise KdkitError(f"reference {self.name} has no errors for {corruption}")
        e = self.errors[corruption]
        if self.mean_only:
            if list(severities) != list(SEVERITIES):
                raise KdkitError(f"reference {self.name} has only the mean over severities 1-5; use --severities 1-5")
            return [e[0]] * len(SEVERITIES)  # sum of five = 5 x mean: the same CE
        missing = [s for s in severities if s not in e]
        if missing:
            raise KdkitError(f"reference {self.name} has no {corruption} errors at severities {missing}")
        return [e[s] for s in severities]


# AlexNet's ImageNet-C errors averaged over severities 1-5, in NAMES order, as published with
# hendrycks/robustness (and copied by AugMix's imagenet.py as ALEXNET_ERR); clean error 43.5 %
# from the paper's Table 1.
ALEXNET = Reference("alexnet (published ImageNet-C errors)", 0.435, {c: {0: e} for c, e in zip(NAMES, [
    0.886428, 0.894468, 0.922640, 0.819880, 0.826268, 0.785948, 0.798360,
    0.866816, 0.826572, 0.819324, 0.564592, 0.853204, 0.646056, 0.717840, 0.606500])}, mean_only=True)


def load_reference(spec: str) -> Reference:
    """"alexnet", or a JSON file: an earlier report, its "robustness" block, or {corruption: [e1..e5]}."""
    if spec.lower() == "alexnet":
        return ALEXNET
    path = Path(spec)
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise KdkitError(f"{path}: not a readable JSON reference ({e})") from None
    block = d.get("robustness", d)
    errs = block.get("errors", block)
    errors = {}
    for c, v in errs.items():
        if c in NAMES and isinstance(v, list):
            errors[c] = {i + 1: float(e) for i, e in enumerate(v)}
        elif c in NAMES and isinstance(v, dict):
            errors[c] = {int(s): float(e) for s, e in v.items()}
    if not errors:
        raise KdkitError(f"{path}: no per-corruption errors in it (expected a `kdkit eval` metrics.json with a "
                         "robustness block, or {corruption: [error at severity 1, ..., 5]})")
    clean = block.get("clean_error")
    return Reference(str(path), None if clean is None else float(clean), errors)


def mce_summary(errors: dict[str, dict[int, float]], clean_error: float | None, reference: Reference | None,
                corruptions: list[str], severities: list[int]) -> dict:
    """Per-corruption error, CE and relative CE, and their means (the module docstring's formulas)."""
    per = {}
    for c in corruptions:
        e = [errors[c][s] for s in severities]
        row = {"error": sum(e) / len(e)}
        if reference is not None:
            r = reference.errors_for(c, severities)
            row["ce"] = sum(e) / sum(r) if sum(r) > 0 else None
            row["relative_ce"] = None
            if clean_error is not None and reference.clean_error is not None:
                den = sum(x - reference.clean_error for x in r)
                # undefined when the reference does no worse on corrupted than on clean images
                row["relative_ce"] = sum(x - clean_error for x in e) / den if den > 0 else None
        per[c] = row

    def mean(key):
        vals = [row.get(key) for row in per.values()]
        return None if not vals or any(v is None for v in vals) else sum(vals) / len(vals)

    return {"per_corruption": per, "mean_error": mean("error"),
            "mce": mean("ce") if reference else None, "relative_mce": mean("relative_ce") if reference else None}


class _Judge:
    """Counts top-1 errors of one model (or ensemble) per (corruption, severity), and on clean views."""

    def __init__(self, models, info: ModelInfo, device):
        self.models, self.info, self.device = models, info, device
        self.wrong: dict = {}
        self.seen: dict = {}

    def update(self, tag, images_u8: np.ndarray, labels: torch.Tensor) -> None:
        x = normalize_uint8(torch.from_numpy(images_u8).to(self.device), self.info)
        pred = ensemble_probs(self.models, x).argmax(dim=1).cpu()
        self.wrong[tag] = self.wrong.get(tag, 0) + int((pred != labels).sum())
        self.seen[tag] = self.seen.get(tag, 0) + len(labels)

    def error(self, tag) -> float:
        return self.wrong[tag] / self.seen[tag]


def _on_the_fly(judges, shards, cfg, rcfg: RobustnessConfig, image_size: int, rt) -> None:
    loader = raw_view_loader(shards, image_size, cfg.crop_ratio, cfg.batch_size, cfg.num_threads, rt)
    order = [k for _, k in loader.keys()]
    pos = 0
    frost = str(rcfg.frost_dir) if rcfg.frost_dir else None
    with CorruptionPool(rcfg.workers) as pool:
        for images, labels, _ in tqdm(loader, desc="corruptions", unit="batch", disable=not rcfg.progress):
            imgs, labels = as_uint8(images), labels.cpu()
            keys = order[pos:pos + len(imgs)]
            pos += len(imgs)
            for j in judges:
                j.update("clean", imgs, labels)
            for c in rcfg.corruptions:
                outs = pool.map([(img, key, c, rcfg.severities, rcfg.seed, rcfg.store_quality, frost, False)
                                 for img, key in zip(imgs, keys)])
                for i, s in enumerate(rcfg.severities):
                    batch = np.stack([o[i] for o in outs])
                    for j in judges:
                        j.update((c, s), batch, labels)


def _from_shards(judges, shards, cfg, rcfg: RobustnessConfig, image_size: int, rt) -> None:
    sets = [(c, s) for c in rcfg.corruptions for s in rcfg.severities]
    sources = [("clean", shards, cfg.crop_ratio)]
    sources += [((c, s), corrupted_set(rcfg.corrupted, c, s, image_size), 1.0) for c, s in sets]  # already cropped
    for tag, source, ratio in tqdm(sources, desc="corrupted sets", unit="set", disable=not rcfg.progress):
        loader = raw_view_loader(source, image_size, ratio, cfg.batch_size, cfg.num_threads, rt)
        for images, labels, _ in loader:
            imgs = as_uint8(images)
            for j in judges:
                j.update(tag, imgs, labels.cpu())


def evaluate_robustness(models, infos: list[ModelInfo], shards, cfg, rcfg: RobustnessConfig, rt) -> dict:
    """Corruption errors of the model (or ensemble), its reference's, and the mCE summary; the models
    run where `rt` (kdkit.runtime) says."""
    from kdkit.evaluate.ensemble import load_models, open_eval_set

    if not rcfg.corruptions:
        raise KdkitError("no corruptions selected")
    dev = rt.device
    info = infos[0]
    judges = [_Judge(models, info, dev)]
    ref_spec, reference, ref_kind = rcfg.reference, None, None
    if ref_spec and ref_spec.lower() != "alexnet" and Path(ref_spec).suffix.lower() != ".json":
        ref_models, ref_infos = load_models([ref_spec], cfg.prefer_ema, None, dev, cfg.trust_checkpoint)
        open_eval_set(cfg.data, cfg.split, ref_infos)  # the reference must know the set's classes too
        if ref_infos[0].image_size != info.image_size:
            raise KdkitError(f"reference {ref_spec} wants {ref_infos[0].image_size} px images, the model "
                             f"{info.image_size} px; both are judged on the same corrupted views")
        judges.append(_Judge(ref_models, ref_infos[0], dev))
        ref_kind = "checkpoint"
    elif ref_spec:
        reference, ref_kind = load_reference(ref_spec), "builtin" if ref_spec.lower() == "alexnet" else "json"
    run = _from_shards if rcfg.corrupted else _on_the_fly
    run(judges, shards, cfg, rcfg, info.image_size, rt)

    def errors_of(j: _Judge) -> dict:
        return {c: {s: j.error((c, s)) for s in rcfg.severities} for c in rcfg.corruptions}

    if ref_kind == "checkpoint":
        reference = Reference(ref_spec, judges[1].error("clean"), errors_of(judges[1]))
    out = {
        "mode": "written shards" if rcfg.corrupted else "on the fly",
        "corrupted_sets": str(rcfg.corrupted) if rcfg.corrupted else None,
        "view": "centre crop; corruption applied to the cropped uint8 image, then normalised (as ImageNet-C)",
        "corruptions": rcfg.corruptions, "severities": rcfg.severities, "seed": rcfg.seed,
        "store_quality": None if rcfg.corrupted else rcfg.store_quality,
        "frost": "photos" if rcfg.frost_dir else "procedural (approximation, see CORRUPTIONS.md)",
        "num_samples": judges[0].seen["clean"],
        "clean_error": judges[0].error("clean"),
        "errors": errors_of(judges[0]),
        "reference": None if reference is None else {
            "name": reference.name, "kind": ref_kind, "clean_error": reference.clean_error,
            "errors": None if reference.mean_only else reference.errors,
            "mean_errors": {c: v[0] for c, v in reference.errors.items()} if reference.mean_only else None},
    }
    out.update(mce_summary(out["errors"], out["clean_error"], reference, rcfg.corruptions, rcfg.severities))
    return out


def format_robustness(r: dict) -> str:
    sev = r["severities"]
    how = r["mode"] + (f", JPEG q{r['store_quality']} round trip" if r.get("store_quality") else "")
    ref = r.get("reference")
    lines = [f"robustness: {len(r['corruptions'])} corruptions x severities {','.join(map(str, sev))} "
             f"({how}, seed {r['seed']}), {r['num_samples']} samples; clean error {100 * r['clean_error']:.2f} %",
             f"reference: {ref['name']}" + (f" (clean error {100 * ref['clean_error']:.2f} %)"
                                            if ref.get("clean_error") is not None else "")
             if ref else "reference: none (give --reference for CE / mCE)"]
    head = f"{'corruption':<19}" + "".join(f"{'s' + str(s):>8}" for s in sev) + f"{'error':>8}"
    head += f"{'CE':>8}{'rel.CE':>8}" if ref else ""
    lines += ["", head + "   (top-1 error %; CE, rel.CE: % of the reference's)"]

    def pct(v):
        return f"{'-':>8}" if v is None else f"{100 * v:>8.1f}"

    for c in r["corruptions"]:
        row = r["per_corruption"][c]
        line = f"{c:<19}" + "".join(pct(r["errors"][c][s]) for s in sev) + pct(row["error"])
        lines.append(line + (pct(row["ce"]) + pct(row["relative_ce"]) if ref else ""))
    def total(v):
        return "n/a" if v is None else f"{100 * v:.2f} %"

    summary = f"mean corruption error {total(r['mean_error'])}"
    if ref:
        summary += f"   mCE {total(r['mce'])}   relative mCE {total(r['relative_mce'])}"
        if r["relative_mce"] is None:
            summary += " (undefined where the reference's corrupted error is not above its clean error)"
    return "\n".join(lines + ["", summary])
