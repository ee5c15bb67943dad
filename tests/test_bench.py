"""`kdkit bench-loader` end to end on the tiny shard set (behaviour only: no timing assertions)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdkit import cli
from kdkit.bench.loader_bench import BenchConfig, format_table, run_bench
from kdkit.bench.sysinfo import _proc_children_cpu, cpu_seconds
from kdkit.errors import KdkitError

TINY = ["--batch-size", "4", "--batches", "2", "--warmup", "1", "--size", "32"]


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_cli_prints_table_and_writes_json_with_both_loaders(tiny_shards, tmp_path, capsys):
    out = tmp_path / "bench" / "result.json"
    assert cli.main(["bench-loader", str(tiny_shards), *TINY, "--repeats", "2", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "dali" in table and "dataloader+pillow" in table and "DALI / DataLoader+Pillow" in table
    report = json.loads(out.read_text())
    rows = {r["loader"]: r for r in report["results"]}
    assert set(rows) == {"dali", "dataloader+pillow"}
    for r in rows.values():
        assert 2 <= r["images"] <= 8 and r["images_per_s"] > 0 and r["cpu_percent"] >= 0 and r["device"] == "cpu"
    assert len(report["runs"]["dali"]) == 2 and report["speedup"] > 0
    assert report["config"]["threads"] == 2 and report["machine"]["cpu_cores"] >= 1
    assert report["samples"] == 24
    assert report["command"].startswith(f"kdkit bench-loader {tiny_shards} ") and "--repeats 2" in report["command"]


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_report_names_the_resize_operator_and_the_switch_changes_it(tiny_shards):
    from kdkit.pipelines import native

    def resize(**kw):
        report = run_bench(BenchConfig(tiny_shards, batch_size=4, batches=1, warmup=0, size=32, baseline=False, **kw),
                           command="test")
        assert f"DALI resize: {report['resize']}" in format_table(report)
        return report["resize"]

    assert resize() == ("kdkit_resize_normalize" if native.available() else "fn.resize")
    assert resize(native_resize=False) == "fn.resize"
    assert resize(aug="randaugment") == "fn.resize"  # policies change resized uint8 pixels: DALI's resize
    assert resize(aug="eval", split="val") == resize()


@pytest.mark.timeout(120)
def test_eval_aug_without_baseline(tiny_shards):
    report = run_bench(BenchConfig(tiny_shards, split="val", batch_size=4, batches=2, warmup=1, size=32,
                                   aug="eval", baseline=False), command="test")
    assert [r["loader"] for r in report["results"]] == ["dali"] and report["speedup"] is None
    assert report["samples"] == 12 and "DALI /" not in format_table(report)


@pytest.mark.timeout(180)
def test_gpu_feed_times_a_model_step(tiny_shards):
    report = run_bench(BenchConfig(tiny_shards, batch_size=4, batches=2, warmup=1, size=32, baseline=False,
                                   gpu_feed="resnet10t"), command="test")
    feed = report["gpu_feed"]
    assert feed["model_only"]["images"] == 8 and 2 <= feed["loader_fed"]["images"] <= 8
    assert feed["bottleneck"] in ("loader", "model") and feed["amp"] == torch.cuda.is_available()
    assert "GPU feed (resnet10t" in format_table(report)


def test_bad_options_are_user_errors(tiny_shards):
    with pytest.raises(KdkitError, match="aug='mixup': expected one of rrc-flip"):
        BenchConfig(tiny_shards, aug="mixup")
    with pytest.raises(KdkitError, match="batches=0: expected an integer >= 1"):
        BenchConfig(tiny_shards, batches=0)
    with pytest.raises(KdkitError, match="rotate: a training augmentation"):
        BenchConfig(tiny_shards, aug="eval", rotate=10)
    with pytest.raises(KdkitError, match="AugMix and auto_augment='randaugment' exclude each other"):
        BenchConfig(tiny_shards, aug="randaugment", augmix=True)
    if not torch.cuda.is_available():
        with pytest.raises(KdkitError, match="no CUDA"):
            run_bench(BenchConfig(tiny_shards, device="gpu"))
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["bench-loader", str(tiny_shards), "--aug", "mixup"])


@pytest.mark.slow
def test_cpu_use_counts_live_worker_processes():
    # DataLoader workers are alive while measured; getrusage(CHILDREN) alone would miss them
    before = cpu_seconds()
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        deadline = time.monotonic() + 30

        def busy_cpu() -> float:  # this child's own CPU time (earlier tests' workers may still be alive)
            rest = open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[1].split()
            return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")

        while busy_cpu() < 0.3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _proc_children_cpu(os.getpid()) >= 0.3
        assert cpu_seconds() - before >= 0.3
    finally:
        child.kill()
        child.wait()


@pytest.mark.slow
def test_the_gpu_check_says_in_one_line_that_there_is_no_gpu(tmp_path):
    """scripts/gpu_check.sh exits at once, status 0, where torch sees no CUDA device."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the check would run for minutes")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(["bash", str(root / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120, env={**os.environ, "PY": sys.executable})
    assert r.returncode == 0 and r.stdout.count("\n") == 1 and "no CUDA device" in r.stdout, r.stdout + r.stderr
    assert not list(tmp_path.iterdir())


def test_baseline_uses_the_equivalent_torchvision_transforms(tmp_path):
    from torchvision import transforms as T

    from kdkit.bench.loader_bench import baseline_transform

    cfg = BenchConfig(tmp_path, aug="augmix", rotate=15.0, rotate_fill=20.0, hue=0.1, augmix_severity=5,
                      augmix_width=2, augmix_depth=1, augmix_alpha=0.5)
    steps = {type(t): t for t in baseline_transform(cfg).transforms}
    assert steps[T.RandomRotation].degrees == [-15.0, 15.0] and steps[T.RandomRotation].fill == [20, 20, 20]
    assert steps[T.ColorJitter].hue == (-0.1, 0.1)
    a = steps[T.AugMix]
    assert (a.severity, a.mixture_width, a.chain_depth, a.alpha) == (5, 2, 1, 0.5)
    # and DALI gets the same options (the Train role checks them)
    dali = cfg.augment()
    got = (dali.augmix, dali.rotate, dali.rotate_fill, dali.hue, dali.augmix_width)
    assert got == (True, 15.0, 20.0, 0.1, 2)
    order = [type(t) for t in baseline_transform(cfg).transforms]
    assert order.index(T.AugMix) < order.index(T.RandomRotation) < order.index(T.ToTensor)  # rotation after resize


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_cli_accepts_the_augmentation_options(tiny_shards, capsys):
    assert cli.main(["bench-loader", str(tiny_shards), *TINY, "--threads", "1", "--rotate", "20", "--hue", "0.1",
                     "--aug", "rrc-flip-jitter"]) == 0
    out = capsys.readouterr().out
    assert "aug rrc-flip-jitter + rotate 20 + hue 0.1" in out and "dataloader+pillow" in out


@pytest.mark.parametrize("flags,expected", [(["--rotate", "-1"], "argument --rotate"),
                                            (["--hue", "0.7"], "argument --hue"),
                                            (["--augmix-severity", "0"], "argument --augmix-severity")])
def test_nonsense_augmentation_flags_are_refused(tiny_shards, capsys, flags, expected):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench-loader", str(tiny_shards), *flags])
    assert e.value.code == 2 and expected in capsys.readouterr().err


def test_synthetic_images_are_the_same_whatever_the_processes_that_write_them(tmp_path):
    """The GPU check makes its JPEGs once, in parallel: image i comes from its own generator, so the set (and
    every benchmark on it) is the same with one process or several."""
    from kdkit.bench.synthetic import write_tree

    one, two = write_tree(tmp_path / "a", images=6, classes=2, workers=1), write_tree(tmp_path / "b", images=6,
                                                                                     classes=2, workers=2)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.jpg"))
    assert one == two and len(files) == 6
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
