"""One prepared check of kdkit's GPU path (run it through scripts/gpu_check.sh).

On a machine with a CUDA GPU, in a few minutes, it proves the GPU path end to end and prints one
table (and writes gpu_check.json):

  1. tests      the CUDA-only tests (pytest -m gpu)
  2. loader     `kdkit bench-loader --device gpu --gpu-feed resnet50` on a generated ImageNet-like set
                (photo-like JPEGs ~500x375), pass-through and --max-size 320: loader images/s next to
                what a ResNet-50 AMP channels-last training step consumes (target: >= 3x)
  3. teacher    `kdkit add-teacher-logits --device gpu`, centre and --views 4, vs the same model's plain
                forward on preloaded GPU tensors (scripts/bench_teacher.py; target: >= 0.8x)
  4. train      `kdkit train student --kd replay` for a few hundred steps (AMP, channels-last):
                images/s and the loader-wait share (target: < 2 %)
  5. ddp        `torchrun --nproc_per_node 1` through the trainer (NCCL)
  6. pixels     replayed views decoded on the GPU against the same views on the CPU
  7. views      scripts/bench_views.py on the GPU: `--kd replay --views-per-load 4` (and 1) against
                `--kd none`, training images/s of the loader alone and with a ResNet-50 step
                (target: replay with 4 views per load >= 1x of no KD)

It installs nothing: kdkit and its dependencies must import (a venv, or PYTHONPATH of unpacked
wheels). It runs from a scratch folder so a source checkout in the working directory cannot shadow
the installed package. Without CUDA it says so on one line and exits 0. Each step that fails is
recorded with its reason and the others still run; the exit status is 1 if any failed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def sh(cmd: list[str], work: Path, timeout: int, env: dict | None = None) -> subprocess.CompletedProcess:
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def kdkit(*args) -> list[str]:
    return [sys.executable, "-m", "kdkit", *map(str, args)]


def step(results: dict, name: str, fn) -> None:
    t0 = time.perf_counter()
    try:
        results[name] = {"ok": True, **fn()}
    except Exception as e:  # noqa: BLE001 - a failed step is reported, the others still run
        results[name] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[-1500:]}"}
    results[name]["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"-- {name}: {'ok' if results[name]['ok'] else 'FAILED'} ({results[name]['seconds']} s)", flush=True)


def checked(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if r.returncode != 0:
        text = (r.stderr or "") + (r.stdout or "")
        said = [line for line in text.splitlines() if "kdkit: error" in line or "Error:" in line]
        raise RuntimeError(f"exit {r.returncode}: " + (said[0] if said else text[-1500:]))
    return r


def make_shards(work: Path, images: int, threads: int) -> dict:
    from kdkit.bench.synthetic import write_tree
    from kdkit.shards.images import ImageOptions
    from kdkit.shards.sources.folder import list_folder
    from kdkit.shards.writer import ShardConfig, write_dataset

    raw = work / "raw"
    if not (raw / "train").exists():
        write_tree(raw / "train", images=images, classes=100, seed=0)
    out = {}
    for name, max_size in (("full", None), ("320", 320)):
        folder = work / f"shards-{name}"
        write_dataset(list_folder(raw), folder, ShardConfig(samples_per_shard=500, workers=threads, progress=False,
                                                          image=ImageOptions(max_size=max_size)))
        out[name] = folder
    return out


def tests(work: Path, timeout: int) -> dict:
    try:
        import pytest  # noqa: F401
    except ImportError:
        return {"skipped": "pytest is not installed here"}
    r = sh([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(REPO / "tests")],
           work, timeout)
    tail = (r.stdout.strip().splitlines() or [""])[-1]
    if r.returncode not in (0, 5):
        raise RuntimeError(tail + "\n" + r.stdout[-1500:])
    return {"summary": tail}


def loader(work: Path, shards: dict, threads: int, batches: int) -> dict:
    rows = {}
    for name, folder in shards.items():
        js = work / f"loader-{name}.json"
        checked(sh(kdkit("bench-loader", folder, "--device", "gpu", "--batch-size", 256, "--threads", threads,
                         "--size", 224, "--batches", batches, "--warmup", 10, "--repeats", 2, "--gpu-feed",
                         "resnet50", "--json", js), work, 600))
        rep = json.loads(js.read_text())
        dali = rep["results"][0]["images_per_s"]
        base = rep["results"][1]["images_per_s"] if len(rep["results"]) > 1 else None
        feed = rep["gpu_feed"]
        step = feed["model_only"]["images_per_s"]
        rows[name] = {"dali_img_s": dali, "dataloader_img_s": base, "resnet50_step_img_s": step,
                      "fed_img_s": feed["loader_fed"]["images_per_s"], "loader_over_step": round(dali / step, 2)}
    return rows


def teacher(work: Path, threads: int) -> dict:
    r = checked(sh([sys.executable, str(REPO / "scripts" / "bench_teacher.py"), "--device", "gpu", "--model",
                    "resnet50", "--size", 224, "--images", 2000, "--batch-size", 256, "--threads", threads,
                    "--views", 4, "--repeats", 1, "--work", work / "teacher"], work, 600))
    rows = re.findall(r"^\| (teacher pass[^|]*) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| ([\d.]+) \|$", r.stdout, re.M)
    return {label.strip(): {"images_per_s": int(loop), "vs_plain_forward": float(ratio)}
            for label, _, _, loop, _, ratio in rows}


def train(work: Path, shards: dict, threads: int, steps: int) -> dict:
    from kdkit.teach import TeacherPassConfig, TeacherSpec, add_teacher_logits

    kd = work / "kd4"
    if not (kd / "train" / "manifest.json").exists():
        from kdkit.models.checkpoint import save_checkpoint
        from kdkit.models.factory import create_model

        ckpt = work / "kd-teacher.pth"  # a random ResNet-50 for the set's 100 classes: the pass's cost is real
        save_checkpoint(ckpt, {"model": "resnet50", "model_kwargs": {}, "num_classes": 100, "image_size": 224,
                               "state_dict": create_model("resnet50", num_classes=100).state_dict()})
        add_teacher_logits(TeacherPassConfig(shards["320"], [TeacherSpec(ckpt)], out=kd, views=4, device="gpu",
                                             batch_size=256, threads=threads, progress=False, splits=["train"]))
    batch = 256
    epochs = max(1, -(-steps * batch // int(json.loads((kd / "train" / "manifest.json").read_text())["num_samples"])))
    runs = work / "runs"
    checked(sh(kdkit("train", "student", kd, "--kd", "replay", "--model", "resnet50", "--val-split", "none",
                     "--batch-size", batch, "--epochs", epochs, "--loader-threads", threads, "--amp", "bf16",
                     "--channels-last", "--no-progress", "--output", runs, "--name", "replay", "--device", "cuda"),
               work, 900))
    rows = [json.loads(line) for line in (runs / "replay" / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    return {"epochs": len(rows), "images_per_s": round(last["images_per_s"], 1),
            "loader_wait_share": round(last["loader_wait_share"], 4)}


def ddp(work: Path, shards: dict) -> dict:
    checked(sh([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "kdkit",
                "train",
                "teacher", str(shards["320"]), "--model", "resnet18", "--image-size", "112", "--batch-size", "128",
                "--epochs", "1", "--val-split", "none", "--amp", "bf16", "--no-progress", "--output",
                str(work / "runs"), "--name", "ddp", "--device", "cuda"], work, 600))
    return {"metrics": json.loads((work / "runs" / "ddp" / "metrics.jsonl").read_text().splitlines()[-1])}


def pixels(work: Path, threads: int) -> dict:
    """Views boxed on the CPU (the teacher pass's pipeline), replayed on the GPU and on the CPU."""
    import torch

    from kdkit.pipelines import DaliLoader, loader_config

    kd = work / "kd4" / "train"
    options = dict(image_size=224, layout="HWC", mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3, batch_size=64,
                   shuffle=False, last_batch="partial", num_threads=threads, seed=3)
    cpu = DaliLoader(kd, loader_config("replay", device="cpu", **options))
    gpu = DaliLoader(kd, loader_config("replay", device="gpu", **options))
    diffs = []
    for (a, _, _), (b, _, _), _ in zip(cpu, gpu, range(8)):
        diffs.append((a.float() - b.float().cpu()).abs())
    d = torch.cat([x.flatten() for x in diffs])
    return {"mean_abs_diff": round(float(d.mean()), 3), "p99_abs_diff": round(float(d.quantile(0.99)), 2),
            "max_abs_diff": round(float(d.max()), 1), "note": "grey levels (0..255), same view index per sample"}


def views(work: Path, threads: int) -> dict:
    """Stored KD with several views per decode against no KD, on the GPU (scripts/bench_views.py)."""
    js = work / "views.json"
    checked(sh([sys.executable, str(REPO / "scripts" / "bench_views.py"), "--device", "cuda", "--model", "resnet50",
                "--image-size", 224, "--batch-size", 256, "--threads", threads, "--amp", "bf16", "--images", 1000,
                "--steps", 10, "--repeats", 2, "--out", work / "views", "--json", js], work, 600))
    rates = json.loads(js.read_text())["images_per_s"]
    base = rates["none"]
    return {name: {k: v for k, v in r.items()} | {f"{k}_vs_none": round(v / base[k], 2) for k, v in r.items()}
            for name, r in rates.items()}


def table(results: dict, machine: str) -> str:
    lines = [f"kdkit GPU check on {machine}", "", "| step | result |", "| --- | --- |"]
    for name, r in results.items():
        if not r.get("ok"):
            lines.append(f"| {name} | FAILED: {r['error'].splitlines()[0][:200]} |")
            continue
        body = {k: v for k, v in r.items() if k not in ("ok",)}
        lines.append(f"| {name} | {json.dumps(body)[:400]} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "kdkit-gpu-check")
    ap.add_argument("--out", type=Path, default=None, help="folder for gpu_check.json (default: --work)")
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--steps", type=int, default=300, help="training steps of the replay run (about)")
    ap.add_argument("--batches", type=int, default=40, help="measured batches per loader run")
    ap.add_argument("--only", default=None, help="comma-separated steps to run (tests,loader,teacher,train,ddp,pixels,views)")
    a = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch; nothing to check here (run it on a machine with an "
              "NVIDIA GPU)")
        return 0
    a.work.mkdir(parents=True, exist_ok=True)
    os.chdir(a.work)  # the installed kdkit, never a source checkout in the working directory
    threads = len(os.sched_getaffinity(0))
    machine = f"{torch.cuda.get_device_name(0)}, {threads} CPU threads, torch {torch.__version__}"
    only = set(a.only.split(",")) if a.only else None
    results: dict = {}
    shards = make_shards(a.work, a.images, threads)
    plan = [("tests", lambda: tests(a.work, 420)), ("loader", lambda: loader(a.work, shards, threads, a.batches)),
            ("teacher", lambda: teacher(a.work, threads)), ("train", lambda: train(a.work, shards, threads, a.steps)),
            ("ddp", lambda: ddp(a.work, shards)), ("pixels", lambda: pixels(a.work, threads)),
            ("views", lambda: views(a.work, threads))]
    for name, fn in plan:
        if only is None or name in only:
            step(results, name, fn)
    out = a.out or a.work
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps({"machine": machine, "results": results}, indent=1) + "\n")
    print("\n" + table(results, machine))
    return 0 if all(r.get("ok") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
