"""The demo's results: a Hinton-style table (test errors), results.json and a plot of the curves."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

LABELS = {
    "no-kd": "student, labels only (no KD)",
    "kd-stored": "student, KD from stored single-view logits",
    "kd-replay": "student, KD from replayed multi-view logits",
}


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def clear_difference(a: dict, b: dict, seeds: int) -> bool:
    """Do two ways' mean errors differ by more than twice the standard error of the larger seed
    spread? (With one seed there is no spread to compare with: never.)"""
    spread = max(a["errors_sd"], b["errors_sd"])
    return seeds > 1 and abs(a["errors_mean"] - b["errors_mean"]) > 2 * spread / seeds ** 0.5


def summarize(rows: dict, seeds: int) -> dict:
    """Mean/sd of the test errors of each way over seeds, and the share of the teacher-student gap
    that KD recovers: (errors without KD - errors with KD) / (errors without KD - teacher errors)."""
    teacher = rows["teacher"]
    out = {"teacher": {"errors": teacher["errors"], "top1": teacher["top1"], "samples": teacher["samples"]},
           "students": {}}
    for way in LABELS:
        errs = [rows[f"{way}-s{s}"]["errors"] for s in range(seeds)]
        m, sd = _stats(errs)
        out["students"][way] = {"errors_per_seed": errs, "errors_mean": m, "errors_sd": sd,
                                "error_pct_mean": 100.0 * m / teacher["samples"]}
    base = out["students"]["no-kd"]["errors_mean"]
    gap = base - teacher["errors"]
    for way in ("kd-stored", "kd-replay"):
        s = out["students"][way]
        s["gap_recovered"] = (base - s["errors_mean"]) / gap if gap > 0 else None
        s["clear_difference"] = clear_difference(out["students"]["no-kd"], s, seeds)
    return out


def verdict(summary: dict, seeds: int) -> list[str]:
    """Plain sentences on what the numbers show, including when KD does not help."""
    lines = []
    base = summary["students"]["no-kd"]
    gap = base["errors_mean"] - summary["teacher"]["errors"]
    if gap <= 0:
        lines.append("The student alone is as good as the teacher here, so there is no gap for KD to close.")
    for way in ("kd-stored", "kd-replay"):
        s = summary["students"][way]
        d = base["errors_mean"] - s["errors_mean"]
        what = LABELS[way].replace("student, ", "")
        if d > 0:
            share = f"{100 * s['gap_recovered']:.0f} % of the teacher-student gap" if s["gap_recovered"] else "errors"
            msg = f"{what}: {d:.1f} fewer errors than without KD ({share} recovered)"
        elif d < 0:
            msg = f"{what}: {-d:.1f} more errors than without KD: KD did not help in this run"
        else:
            msg = f"{what}: the same errors as without KD"
        if seeds == 1:
            msg += "; one seed only, so this cannot be told apart from seed noise (run more --seeds)"
        elif not s["clear_difference"]:
            msg += f"; within the spread of {seeds} seeds, so not a clear difference"
        lines.append(msg + ".")
    stored, replay = summary["students"]["kd-stored"], summary["students"]["kd-replay"]
    d = stored["errors_mean"] - replay["errors_mean"]
    clear = clear_difference(stored, replay, seeds)
    lines.append(f"Replayed multi-view vs stored single-view logits: {abs(d):.1f} {'fewer' if d >= 0 else 'more'} "
                 f"errors with replay; " + ("a clear difference over the seeds." if clear else
                                            "not a clear difference over the seeds (within their spread)."
                                            if seeds > 1 else "one seed only, cannot tell."))
    return lines


def write_report(cfg, rows: dict, out: Path) -> list[Path]:
    out = Path(out)
    summary = summarize(rows, cfg.seeds)
    n = summary["teacher"]["samples"]
    md = [f"# kdkit demo: MNIST{' (quick subset)' if cfg.quick else ''}", "",
          f"Test set: {n} images; train set: {cfg.train_size or 60000} images. Teacher `{cfg.teacher_model}` "
          f"({cfg.teacher_epochs} epochs); student `{cfg.student_model}` ({cfg.student_epochs} epochs, the same "
          f"budget, seeds 0..{cfg.seeds - 1}, and augmentation for all three ways); KD T={cfg.kd_temperature}, "
          f"alpha={cfg.kd_alpha}; multi-view: {cfg.views} stored views per image; {cfg.image_size} px; "
          f"device {cfg.device}.", "",
          "| net | test errors | error % | per seed |", "| --- | ---: | ---: | --- |",
          f"| teacher | {summary['teacher']['errors']} | {100 * summary['teacher']['errors'] / n:.2f} | |"]
    for way, label in LABELS.items():
        s = summary["students"][way]
        sd = f" ± {s['errors_sd']:.1f}" if cfg.seeds > 1 else ""
        md.append(f"| {label} | {s['errors_mean']:.1f}{sd} | {s['error_pct_mean']:.2f} | "
                  f"{', '.join(map(str, s['errors_per_seed']))} |")
    md += ["", "Share of the teacher-student gap recovered by KD, (E_noKD - E_KD) / (E_noKD - E_teacher): "
           + ", ".join(f"{LABELS[w].split(', ')[1]} "
                       + (f"{100 * summary['students'][w]['gap_recovered']:.0f} %"
                          if summary["students"][w]["gap_recovered"] is not None else "n/a")
                       for w in ("kd-stored", "kd-replay")) + ".", ""]
    md += ["- " + line for line in verdict(summary, cfg.seeds)]
    md += ["", "For reference, Hinton et al. (2015) report 67 errors (teacher, 2x1200 + dropout + jitter), "
           "146 (2x800 student alone) and 74 (the student distilled at T=20) on the full 10,000 test images.",
           "", "Stored logits are computed once per view; with mixup/cutmix the mixed target is an "
           "approximation (not used here). Curves: students.png; commands: commands.sh."]
    (out / "results.md").write_text("\n".join(md) + "\n")
    (out / "results.json").write_text(json.dumps({"config": {k: str(v) if isinstance(v, Path) else v
                                                             for k, v in vars(cfg).items()},
                                                  "runs": rows, "summary": summary,
                                                  "verdict": verdict(summary, cfg.seeds)}, indent=1) + "\n")
    files = [out / "results.md", out / "results.json"]
    if plot_students(cfg, out):
        files.append(out / "students.png")
    return files


def plot_students(cfg, out: Path) -> bool:
    """Test error (%) per epoch of each way (mean over seeds, band = min..max), teacher as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def curve(name):
        p = out / "runs" / name / "metrics.jsonl"
        rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []
        return {r["epoch"]: 100.0 - r["val_top1"] for r in rows if r.get("val_top1") is not None}

    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for way, label in LABELS.items():
        curves = [curve(f"{way}-s{s}") for s in range(cfg.seeds)]
        epochs = sorted(set.intersection(*(set(c) for c in curves))) if curves and all(curves) else []
        if not epochs:
            continue
        ys = [[c[e] for c in curves] for e in epochs]
        ax.plot(epochs, [statistics.fmean(y) for y in ys], marker="o", label=label)
        if cfg.seeds > 1:
            ax.fill_between(epochs, [min(y) for y in ys], [max(y) for y in ys], alpha=0.2)
        drawn = True
    t = curve("teacher")
    if t:
        ax.axhline(t[max(t)], color="k", ls="--", lw=1, label="teacher (final)")
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xlabel("epoch")
    ax.set_ylabel("test error (%, log scale)")
    ax.set_yscale("log")  # the last epochs, where the ways differ, sit near the bottom
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator

    # plain numbers on the log axis (1, 2, 3, 5 %, ...), not "3x10^0"; whole epochs on the other
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
    ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(1.5, 4.0, 7.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("MNIST students, same budget" + (f" (mean of {cfg.seeds} seeds, band min..max)"
                                                     if cfg.seeds > 1 else ""))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "students.png", dpi=90)
    plt.close(fig)
    return True
