"""The demo's results: a Hinton-style table (test errors), results.json and a plot of the curves."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

def loss_words(loss: str) -> str:
    from kdkit.train.losses import kd_loss_type

    return kd_loss_type(loss).words


def split_way(way: str) -> tuple[str, str]:
    """(row, KD term) of a way name: `kd-replay4-dkd` -> (`kd-replay4`, `dkd`); kl rows have no suffix."""
    from kdkit.train.config import KD_LOSSES

    for loss in sorted(KD_LOSSES, key=len, reverse=True):
        if way.endswith("-" + loss):
            return way[:-len(loss) - 1], loss
    return way, "kl"


def label(way: str) -> str:
    """The table's name of a row: no-kd, kd-stored, kd-replay<K>, kd-online, and the last two with a loss."""
    row, loss = split_way(way)
    if row.startswith("kd-replay"):
        text = f"student, KD from replayed {row[len('kd-replay'):]}-view logits"
    else:
        text = {"no-kd": "student, labels only (no KD)",
                "kd-stored": "student, KD from stored single-view (centre) logits",
                "kd-online": "student, KD from an online teacher on its crop (consistent upper bound)"}[row]
    return text + (f", {loss_words(loss)}" if loss != "kl" else "")


def count(x: float) -> str:
    """A number of errors as a person writes it: 180, or 180.5 for a mean over seeds (never "180.0")."""
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"


def seed_words(seeds: int) -> str:
    return "seed 0" if seeds == 1 else f"seeds 0..{seeds - 1}"


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def difference_se(a: dict, b: dict, seeds: int) -> float:
    """Standard error of the difference of two ways' mean errors, sqrt(sd_a^2 + sd_b^2) / sqrt(seeds)."""
    return (a["errors_sd"] ** 2 + b["errors_sd"] ** 2) ** 0.5 / seeds ** 0.5


def clear_difference(a: dict, b: dict, seeds: int) -> bool:
    """Do two ways' mean errors differ by more than two standard errors of the difference? (With
    one seed there is no spread to compare with: never.)"""
    return seeds > 1 and abs(a["errors_mean"] - b["errors_mean"]) > 2 * difference_se(a, b, seeds)


def _ways(rows: dict) -> list[str]:
    """The student rows in run order, from run names `<way>-s<seed>`."""
    return list(dict.fromkeys(name.rsplit("-s", 1)[0] for name in rows if name != "teacher"))


def summarize(rows: dict, seeds: int) -> dict:
    """Mean/sd of the test errors of each way over seeds, and the share of the teacher-student gap
    that KD recovers: (errors without KD - errors with KD) / (errors without KD - teacher errors)."""
    teacher = rows["teacher"]
    out = {"teacher": {"errors": teacher["errors"], "top1": teacher["top1"], "samples": teacher["samples"]},
           "students": {}}
    for way in _ways(rows):
        errs = [rows[f"{way}-s{s}"]["errors"] for s in range(seeds)]
        m, sd = _stats(errs)
        out["students"][way] = {"label": label(way), "errors_per_seed": errs, "errors_mean": m, "errors_sd": sd,
                                "error_pct_mean": 100.0 * m / teacher["samples"]}
    base = out["students"]["no-kd"]["errors_mean"]
    gap = base - teacher["errors"]
    for way, s in out["students"].items():
        if way != "no-kd":
            s["gap_recovered"] = (base - s["errors_mean"]) / gap if gap > 0 else None
            s["clear_difference"] = clear_difference(out["students"]["no-kd"], s, seeds)
    return out


def verdict(summary: dict, seeds: int) -> list[str]:
    """Plain sentences on what the numbers show, including when KD does not help."""
    lines = []
    students = summary["students"]
    base = students["no-kd"]
    gap = base["errors_mean"] - summary["teacher"]["errors"]
    if gap <= 0:
        lines.append("The student alone is as good as the teacher here, so there is no gap for KD to close.")
    for way, s in students.items():
        if way == "no-kd":
            continue
        d = base["errors_mean"] - s["errors_mean"]
        what = s["label"].replace("student, ", "")
        if d > 0:
            share = f"{100 * s['gap_recovered']:.0f} % of the teacher-student gap" if s["gap_recovered"] else "errors"
            msg = f"{what}: {count(d)} fewer errors than without KD ({share} recovered)"
        elif d < 0:
            msg = f"{what}: {count(-d)} more errors than without KD: KD did not help in this run"
        else:
            msg = f"{what}: the same errors as without KD"
        if seeds == 1:
            msg += "; one seed only, so this cannot be told apart from seed noise (run more --seeds)"
        elif not s["clear_difference"]:
            msg += f"; within the spread of {seeds} seeds, so not a clear difference"
        lines.append(msg + ".")
    stored = students["kd-stored"]
    replays = [w for w in students if w.startswith("kd-replay") and split_way(w)[1] == "kl"]
    for way in replays:
        lines.append(_versus(students[way], stored, "single-view logits", seeds))
    if replays and "kd-online" in students:  # how far stored views are from the consistent upper bound
        most = replays[-1]
        lines.append(_versus(students["kd-online"], students[most], f"replayed {most[len('kd-replay'):]}-view logits",
                             seeds))
    for way, s in students.items():  # each other KD term against KL on the same row
        row, loss = split_way(way)
        if loss != "kl" and row in students:
            lines.append(_versus(s, students[row], "the same row with KL", seeds, f"{loss_words(loss)} ({row})"))
    return lines


def _versus(a: dict, b: dict, b_name: str, seeds: int, a_name: str | None = None) -> str:
    """`a` against `b`: the difference of the means, its standard error and whether it is clear."""
    d = b["errors_mean"] - a["errors_mean"]
    a_name = a_name or a["label"].split("KD from ")[-1].capitalize()
    head = f"{a_name} vs {b_name}: {count(abs(d))} {'fewer' if d >= 0 else 'more'} errors"
    if seeds == 1:
        return head + "; one seed only, cannot tell."
    se = difference_se(a, b, seeds)
    return head + (f" ({abs(d) / se:.1f} standard errors of the difference, {se:.1f}); " if se > 0 else "; ") + \
        ("a clear difference over the seeds." if clear_difference(a, b, seeds)
         else "not a clear difference over the seeds (within two standard errors).")


def write_report(cfg, rows: dict, out: Path) -> list[Path]:
    out = Path(out)
    summary = summarize(rows, cfg.seeds)
    n = summary["teacher"]["samples"]
    md = [f"# kdkit demo: MNIST{' (quick subset)' if cfg.quick else ''}", "",
          (f"Validation set: {n} images held out of the training set (the test set is not read); "
           if cfg.holdout else f"Test set: {n} images; ")
          + f"train set: {cfg.train_size or 60000 - (cfg.holdout or 0)} images. Teacher `{cfg.teacher_model}` "
          f"({cfg.teacher_epochs} epochs); student `{cfg.student_model}` ({cfg.student_epochs} epochs, SGD "
          f"{cfg.student_lr} + cosine; the same budget, {seed_words(cfg.seeds)} and augmentation for every row: "
          f"random-resized crops of {cfg.random_area[0]:g}-{cfg.random_area[1]:g} of the area, no flip); KD "
          f"T={cfg.kd_temperature:g}, alpha={cfg.kd_alpha:g}"
          + "".join(f"; {loss_words(loss)}: " + " ".join(map(str, cfg.loss_flags(loss)))
                    for loss in cfg.losses if loss != "kl")
          + "; replayed rows: K stored views per image"
          + (f", {cfg.views_per_load} of them per decoded sample ({cfg.student_budget('replay')[0]} epochs "
             f"of {cfg.student_budget('replay')[1]} samples x {cfg.views_per_load} views: the same training "
             "images)" if cfg.views_per_load > 1 else "")
          + f"; {cfg.image_size} px; every net evaluated on the centre view at crop ratio {cfg.eval_crop_ratio:g}"
          + f"; device {cfg.device}.", "",
          f"| net | {'validation' if cfg.holdout else 'test'} errors | error % | gap recovered | per seed |", "| --- | ---: | ---: | ---: | --- |",
          f"| teacher | {summary['teacher']['errors']} | {100 * summary['teacher']['errors'] / n:.2f} | | |"]
    for s in summary["students"].values():
        sd = f" ± {s['errors_sd']:.1f}" if cfg.seeds > 1 else ""
        share = s.get("gap_recovered")
        md.append(f"| {s['label']} | {count(s['errors_mean'])}{sd} | {s['error_pct_mean']:.2f} | "
                  + (f"{100 * share:.0f} %" if share is not None else "") + " | "
                  + f"{', '.join(map(str, s['errors_per_seed']))} |")
    md += ["", "Gap recovered: the share of the teacher-student gap KD closes, (E_noKD - E_KD) / (E_noKD - E_teacher); "
           + (f"errors are mean ± standard deviation over {cfg.seeds} seeds." if cfg.seeds > 1 else
              "errors of one seed (0), so no spread to show; --seeds N reports a mean and its spread."), ""]
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
    """Test error (%) of each way against the training images it has seen, in passes over the set (a
    replay row's epoch with N views per load counts N: every row ends at the same x), mean over seeds,
    band = min..max; the teacher as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def curve(name):
        p = out / "runs" / name / "metrics.jsonl"
        rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []
        return {r["epoch"]: 100.0 - r["val_top1"] for r in rows if r.get("val_top1") is not None}

    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    # colour = row (no KD, stored, replayed, online), line and marker = KD term: 10 ways or more stay apart
    rows = list(dict.fromkeys(split_way(way)[0] for way in cfg.student_ways()))
    styles = {"kl": ("-", "o"), "dkd": ("--", "^"), "kl-ls": (":", "s"), "dkd-ls": ("-.", "D")}
    for way, (_, kd, _) in cfg.student_ways().items():
        row, loss = split_way(way)
        ls, marker = styles.get(loss, ("-", "o"))
        colour = plt.get_cmap("tab10")(rows.index(row) % 10)
        curves = [curve(f"{way}-s{s}") for s in range(cfg.seeds)]
        epochs = sorted(set.intersection(*(set(c) for c in curves))) if curves and all(curves) else []
        if not epochs:
            continue
        ys = [[c[e] for c in curves] for e in epochs]
        x = [e * cfg.row_views(kd) for e in epochs]  # an epoch of N views per load is N passes
        ax.plot(x, [statistics.fmean(y) for y in ys], ls=ls, marker=marker, color=colour,
                label=label(way).replace("student, ", ""))
        if cfg.seeds > 1:
            ax.fill_between(x, [min(y) for y in ys], [max(y) for y in ys], color=colour, alpha=0.12 if loss != "kl" else 0.2)
        drawn = True
    t = curve("teacher")
    if t:
        ax.axhline(t[max(t)], color="k", ls="--", lw=1, label="teacher (final)")
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xlabel("training images seen, in passes over the set (epochs of one view per image)")
    ax.set_ylabel(f"{'validation' if cfg.holdout else 'test'} error (%, log scale)")
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
    ax.legend(fontsize=8, loc="upper right")  # the top right is empty: errors fall with the epochs
    fig.tight_layout()
    fig.savefig(out / "students.png", dpi=90)
    plt.close(fig)
    return True
