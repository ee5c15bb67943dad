"""The GPU check: proves kdkit's GPU path the first time it meets a CUDA machine, in one command
(run it through scripts/gpu_check.sh; docs/gpu.md says how, with kdkit installed from wheels).

The steps, in order, each with its budget on one H100 (PLAN below: 470 s together, under the 8 minutes
one device session leaves after start-up and install). A step's subprocesses are stopped at twice its
budget; a step that cannot finish before --deadline (default 540 s) is not started and is reported
as skipped. gpu_check.json (and gpu_check.log, every command's output) is rewritten after each step,
so a run cut short keeps what it did.

  data      5,120 photo-like JPEGs (~440x350, 100 classes; a multiple of 256, so no configuration below
            drops a partial batch of decoded images) made once, in parallel, sharded as they are
            ("full") and downscaled to 320 px ("320"); 256 more, three in four EXIF-rotated
            (orientations 3, 6, 8), for the pixel check
  decoders  which JPEG decoders load and run here: nvImageCodec's hardware (HW_GPU_ONLY), CUDA
            (nvJPEG), hybrid and CPU backends on one of the JPEGs, and the GPU's JPEG engine use
            (nvidia-smi dmon, column jpg) while DALI decodes with hw_decoder_load 1, then 0.
            Fails when nvJPEG cannot decode (the GPU path would fall back to the CPU unseen)
  pixels    views boxed by a CPU teacher pass on the EXIF set, replayed by the CPU loader and by the
            GPU loader with hw_decoder_load 0 (CUDA decoder) and 1 (hardware decoder); every view
            compared pixel by pixel (grey levels 0..255). Pass: mean |diff| < 1, 99th percentile < 4,
            every image's mean < 2 (the IDCTs differ by about one level; a wrong region, chroma
            upsampling or orientation moves an image by tens)
  ddp       `torchrun --standalone --nproc_per_node 1 kdkit train`: the process group (NCCL) and DDP
            run even with one rank; passes when the run says "rank 0 of 1, nccl process group"
  tests     the CUDA-only tests (pytest -m gpu), less the torch.compile one (a minute of Inductor)
  teach     `kdkit add-teacher-logits --views 4 --device gpu` over the 320 set with a ResNet-50: the
            set the train and views steps read; its images/s
  train     `kdkit train student --kd replay` (ResNet-50, batch 256, no --amp / --channels-last: the
            CUDA defaults, bf16 and channels-last, must be on) for about 200 steps: images/s and the
            loader-wait share (CUDA events; target < 2 %)
  views     scripts/bench_views.py: replay with 4 views per decode (and 1) against --kd none, loader
            alone and with the ResNet-50 step (target: 4 views per load >= 1x of no KD)
  loader    `kdkit bench-loader --gpu-feed resnet50` on both sets: loader images/s next to what the
            ResNet-50 AMP step consumes (target: loader >= 3x the step)
  teacher   scripts/bench_teacher.py: the teacher pass (centre, 4 views) against the plain forward on
            preloaded tensors (target >= 0.8x)

It installs and builds nothing (KDKIT_NATIVE=0: the GPU backend never uses kdkit's CPU operator), runs
from a scratch folder (a source checkout cannot shadow the installed kdkit) and starts every command
with this Python, so kdkit and its dependencies must import from a venv or PYTHONPATH. Without CUDA it
says so on one line and exits 0. `--device cpu` runs every step on the CPU instead, at the GPU run's
tensor sizes (224 px, ResNet-50, loader and teacher batches of 256, 64-image pixel batches) with a few
batches each: it finds import, shape and plumbing faults on any machine, and measures nothing. Training
steps take batches of 32 there (TRAIN_BATCH_CPU: a ResNet-50 step at 256 holds some 25 GB of
activations, more than a small machine has; the GPU run uses 256), and the teacher step its own 64
images (a forward-only ResNet-50 pass over the whole set would take the CPU half an hour). Exit status 1 if a step failed.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # tests/ and scripts/ are read from here, kdkit never is

# (step, budget in seconds on one H100, 16 cores)
PLAN = [("data", 40), ("decoders", 20), ("pixels", 35), ("ddp", 35), ("tests", 80), ("teach", 45),
        ("train", 60), ("views", 50), ("loader", 60), ("teacher", 45)]
TRAIN_BATCH_CPU = 32  # --device cpu: images per training step (see the docstring)
LIMITS = {"mean": 1.0, "p99": 4.0, "image_mean": 2.0}  # the pixels step's pass limits (grey levels)
EXIF_ORIENTATIONS = (1, 3, 6, 8)  # image i of the pixel set carries EXIF_ORIENTATIONS[i % 4]


class CheckFailed(Exception):
    """A step that ran but missed its pass limits: its measurements are kept beside the reason."""

    def __init__(self, why: str, measured: dict):
        super().__init__(why)
        self.measured = measured


@dataclass
class Ctx:
    work: Path
    out: Path
    gpu: bool  # False: --device cpu, the same steps on the CPU
    threads: int
    images: int  # of the main set
    pixel_images: int
    batches: int  # measured batches per loader run
    warmup: int
    repeats: int
    steps: int  # training steps of the train step
    train_batch: int  # images per training step (train, views, loader's ResNet-50 step)
    log: Path

    def limit(self, budget: float) -> float:
        """A command's time limit: twice its budget on the GPU; on the CPU (no budget) an hour."""
        return 2 * budget if self.gpu else 3600

    @property
    def dali(self) -> str:
        return "gpu" if self.gpu else "cpu"

    @property
    def torch_device(self) -> str:
        return "cuda" if self.gpu else "cpu"

    def path(self, name: str) -> Path:
        return self.work / name


# ---------------------------------------------------------------------------------------------
# running commands

def sh(ctx: Ctx, name: str, cmd: list, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command in the scratch folder with this Python's environment; its output goes to the log."""
    cmd = [str(c) for c in cmd]
    print("$ " + " ".join(cmd), flush=True)
    environ = {**os.environ, "KDKIT_NATIVE": "0", "PYTHONUNBUFFERED": "1", **(env or {})}
    try:
        r = subprocess.run(cmd, cwd=ctx.work, capture_output=True, text=True, timeout=timeout, env=environ)
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        _log(ctx, name, cmd, text + f"\n(timed out after {timeout:.0f} s)")
        raise RuntimeError(f"{cmd[2] if len(cmd) > 2 else cmd[0]}: timed out after {timeout:.0f} s") from None
    _log(ctx, name, cmd, (r.stdout or "") + (r.stderr or ""))
    return r


def _log(ctx: Ctx, name: str, cmd: list, text: str) -> None:
    with open(ctx.log, "a") as f:
        f.write(f"\n===== {name}: {' '.join(cmd)}\n{text}\n")


def checked(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if r.returncode != 0:
        text = (r.stderr or "") + (r.stdout or "")
        said = [line for line in text.splitlines() if "kdkit: error" in line or "Error:" in line or "Error " in line]
        raise RuntimeError(f"exit {r.returncode}: " + (said[-1] if said else text[-1500:]))
    return r


def kdkit(*args) -> list:
    return [sys.executable, "-m", "kdkit", *args]


# ---------------------------------------------------------------------------------------------
# the steps

def data(ctx: Ctx, budget: float) -> dict:
    from kdkit.bench.synthetic import write_tree
    from kdkit.shards.images import ImageOptions
    from kdkit.shards.sources.folder import list_folder
    from kdkit.shards.writer import ShardConfig, write_dataset

    if all((ctx.path(f"shards-{n}") / "train" / "manifest.json").exists() for n in ("full", "320", "exif")):
        return {"images": ctx.images, "pixel_images": ctx.pixel_images, "note": f"made before, in {ctx.work}"}
    t0 = time.perf_counter()
    raw = ctx.path("raw")
    write_tree(raw / "train", images=ctx.images, classes=100, seed=0, workers=ctx.threads)
    made = time.perf_counter() - t0
    for name, max_size in (("full", None), ("320", 320)):
        write_dataset(list_folder(raw), ctx.path(f"shards-{name}"),
                      ShardConfig(samples_per_shard=512, workers=ctx.threads, progress=False,
                                  image=ImageOptions(max_size=max_size)))
    exif_tree(ctx.path("raw-exif") / "train", ctx.pixel_images)
    write_dataset(list_folder(ctx.path("raw-exif")), ctx.path("shards-exif"),
                  ShardConfig(samples_per_shard=64, workers=ctx.threads, progress=False))
    return {"images": ctx.images, "pixel_images": ctx.pixel_images, "jpegs_s": round(made, 1),
            "workers": ctx.threads}


def exif_tree(root: Path, n: int) -> None:
    """n photo-like JPEGs in 4 classes, image i tagged with EXIF orientation EXIF_ORIENTATIONS[i % 4]
    (1: none; 3, 6, 8: the decoder must rotate them as a phone's camera asks)."""
    import numpy as np
    from PIL import Image

    from kdkit.bench.synthetic import photo_like_jpeg

    for i in range(n):
        rng = np.random.default_rng([7, i])
        img = Image.open(io.BytesIO(photo_like_jpeg(rng, int(rng.integers(380, 500)), int(rng.integers(300, 400)))))
        exif = img.getexif()
        exif[0x0112] = EXIF_ORIENTATIONS[i % len(EXIF_ORIENTATIONS)]
        folder = root / f"c{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"img{i:04d}.jpg", "JPEG", quality=90, exif=exif.tobytes())


def decoders(ctx: Ctx, budget: float) -> dict:
    """nvImageCodec's backends on one JPEG, and the GPU's JPEG engine while DALI decodes (nvidia-smi)."""
    from importlib import metadata

    from nvidia import nvimgcodec

    jpeg = next(ctx.path("raw").rglob("*.jpg")).read_bytes()
    ran = {}
    for kind in ("HW_GPU_ONLY", "GPU_ONLY", "HYBRID_CPU_GPU", "CPU_ONLY") if ctx.gpu else ("CPU_ONLY",):
        where = {} if ctx.gpu else {"device_id": nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY}
        try:
            dec = nvimgcodec.Decoder(backends=[nvimgcodec.Backend(getattr(nvimgcodec.BackendKind, kind))], **where)
            img = dec.decode(jpeg)
            ran[kind] = f"decodes {tuple(img.shape)}" if img is not None else "cannot decode (no such backend here)"
        except Exception as e:  # noqa: BLE001 - what failed is the finding
            ran[kind] = f"error: {type(e).__name__}: {str(e)[:200]}"
    versions = {}
    for pkg in ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-nvimgcodec-cu13", "nvidia-nvimgcodec-cu12",
                "nvidia-nvjpeg", "nvidia-nvjpeg-cu12", "torch"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    out = {"nvimgcodec": ran, "versions": versions}
    if not ctx.gpu:
        return out
    engine = {load: jpeg_engine_use(ctx, load, seconds=5) for load in (1.0, 0.0)}
    out.update(jpg_engine_percent_max=engine, hardware_decoder_ran=None if engine[1.0] is None else engine[1.0] > 0)
    if not ran["GPU_ONLY"].startswith("decodes"):
        raise CheckFailed("nvJPEG (nvImageCodec's CUDA backend) cannot decode here: DALI's GPU decoder would "
                          "fall back to the CPU", out)
    return out


def jpeg_engine_use(ctx: Ctx, load: float, seconds: float) -> int | None:
    """The highest 'jpg' utilisation nvidia-smi dmon shows while a DALI GPU eval loader decodes the full
    set for `seconds` with hw_decoder_load=load; None where dmon has no jpg column (an older driver)."""
    from kdkit.pipelines import eval_loader
    from kdkit.pipelines.options import Transform
    from kdkit.runtime import Runtime, pick_device

    rt = Runtime(device=pick_device("gpu"))
    loader = eval_loader(ctx.path("shards-full"), Transform(224), 256, ctx.threads, rt, split="train",
                         hw_decoder_load=load)
    mon = subprocess.Popen(["nvidia-smi", "dmon", "-s", "u", "-d", "1"], stdout=subprocess.PIPE, text=True)
    try:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in loader:
                if time.perf_counter() - t0 >= seconds:
                    break
        time.sleep(1.5)  # one more sample of the last second
    finally:
        mon.terminate()
        text = mon.communicate(timeout=10)[0]
    _log(ctx, "decoders", ["nvidia-smi", "dmon", f"(hw_decoder_load {load})"], text)
    header = next((line.lstrip("#").split() for line in text.splitlines() if line.startswith("#") and "gpu" in line),
                  None)
    if not header or "jpg" not in header:
        return None
    col = header.index("jpg")
    values = [int(f[col]) for f in (line.split() for line in text.splitlines() if not line.startswith("#"))
              if len(f) > col and f[col].isdigit()]
    return max(values, default=0)


def pixels(ctx: Ctx, budget: float) -> dict:
    """The same stored views replayed on the CPU and on the GPU (hw_decoder_load 0 and 1)."""
    from kdkit.models.checkpoint import save_checkpoint
    from kdkit.models.factory import create_model
    from kdkit.pipelines import DaliLoader, loader_config
    from kdkit.teach import TeacherPassConfig, TeacherSpec, add_teacher_logits

    views = ctx.path("exif-kd4")
    if not (views / "train" / "manifest.json").exists():
        import torch

        torch.manual_seed(0)
        ckpt = ctx.path("tiny-teacher.pth")  # the boxes matter here, not the logits: a tiny model, on the CPU
        save_checkpoint(ckpt, {"model": "test_efficientnet", "model_kwargs": {}, "num_classes": 4, "image_size": 224,
                               "state_dict": create_model("test_efficientnet", num_classes=4).state_dict()})
        add_teacher_logits(TeacherPassConfig(ctx.path("shards-exif"), [TeacherSpec(ckpt)], out=views, views=4,
                                             device="cpu", batch_size=64, threads=ctx.threads, progress=False))
    common = dict(image_size=224, layout="HWC", mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3, batch_size=64,
                  shuffle=False, last_batch="partial", num_threads=ctx.threads, seed=3, views_per_load=4)

    def replay(device: str, load: float | None = None) -> dict:
        """{(sample, view): HWC float image}: all 4 views of every sample (views_per_load = K)."""
        extra = {"device": "gpu", "device_id": 0, "hw_decoder_load": load} if device == "gpu" else {
            "device": "cpu", "native_resize": False}  # DALI's fn.resize on both sides: the same filter
        loader = DaliLoader(views, loader_config("replay", **common, **extra))
        out, first = {}, 0
        for batch in loader:
            n = batch.images.shape[0] // 4
            for j, (img, v) in enumerate(zip(batch.images, loader.last_view_index.tolist())):
                out[(first + j // 4, v)] = img.float().cpu()
            first += n
        return out

    cpu = replay("cpu")
    rows, failed = {}, []
    for name, load in (("cuda_decoder", 0.0), ("hardware_decoder", 1.0)):
        other = replay(ctx.dali, load) if ctx.gpu else replay("cpu")
        if set(other) != set(cpu):
            raise CheckFailed(f"{name}: the GPU replay yielded other (sample, view) pairs than the CPU one",
                              {"cpu": len(cpu), name: len(other)})
        rows[name] = compare(cpu, other)
        failed += [f"{name}: {k} {v} >= {LIMITS[k]}" for k, v in rows[name]["all"].items()
                   if k in LIMITS and v >= LIMITS[k]]
    rows["views"] = len(cpu)
    rows["limits"] = LIMITS
    rows["note"] = "grey levels 0..255; 'exif' = the EXIF-rotated images (orientations 3, 6, 8)"
    if failed:
        raise CheckFailed("; ".join(failed), rows)
    return rows


def compare(a: dict, b: dict) -> dict:
    """mean, 99th percentile and max of |a - b| over all views and over the EXIF-rotated ones, and the worst
    image's mean; percentiles from a 1/16-level histogram (torch.quantile refuses over 2**24 values)."""
    import torch

    def stats(keys) -> dict:
        hist = torch.zeros(256 * 16, dtype=torch.float64)
        total = worst = top = 0.0
        n = 0
        for k in keys:
            d = (a[k] - b[k]).abs().flatten()
            hist += torch.histc(d, bins=256 * 16, min=0, max=256).double()
            total, n = total + float(d.sum()), n + d.numel()
            worst, top = max(worst, float(d.mean())), max(top, float(d.max()))
        cum = hist.cumsum(0) / max(n, 1)
        p99 = float(torch.searchsorted(cum, torch.tensor([0.99], dtype=torch.float64))[0] + 1) / 16
        return {"mean": round(total / max(n, 1), 3), "p99": round(p99, 2), "max": round(top, 1),
                "image_mean": round(worst, 3)}

    keys = sorted(a)
    rotated = [k for k in keys if EXIF_ORIENTATIONS[k[0] % len(EXIF_ORIENTATIONS)] != 1]
    return {"all": stats(keys), "exif": stats(rotated)}


def fresh_run(ctx: Ctx, name: str) -> None:
    """The check's own run folder, emptied: a rerun after a run cut short must not meet "already holds a run"."""
    import shutil

    shutil.rmtree(ctx.path("runs") / name, ignore_errors=True)


def ddp(ctx: Ctx, budget: float) -> dict:
    fresh_run(ctx, "ddp")
    r = checked(sh(ctx, "ddp", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 1,
                                "-m", "kdkit", "train", "teacher", ctx.path("shards-320"), "--model", "resnet18",
                                "--image-size", 112, "--batch-size", 128, "--epochs", 1, "--val-split", "none",
                                "--no-progress", "--output", ctx.path("runs"), "--name", "ddp",
                                "--device", ctx.torch_device], ctx.limit(budget)))
    text = r.stdout + r.stderr
    group = "nccl" if ctx.gpu else "gloo"
    row = json.loads((ctx.path("runs") / "ddp" / "metrics.jsonl").read_text().splitlines()[-1])
    out = {"process_group": f"rank 0 of 1, {group} process group" in text, "ddp": "x 1 ranks" in text,
           "images_per_s": round(row["images_per_s"], 1), "train_loss": round(row["train_loss"], 4)}
    if not (out["process_group"] and out["ddp"]):
        raise CheckFailed(f"torchrun of one rank did not run a {group} process group and DDP", out)
    return out


def tests(ctx: Ctx, budget: float) -> dict:
    try:
        import pytest  # noqa: F401
    except ImportError:
        return {"skipped": "pytest is not installed here"}
    compiled = "tests/test_train_options.py::test_gpu_training_with_dali_gpu_loader[bf16-True]"  # Inductor: a minute
    r = sh(ctx, "tests", [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                          "--rootdir", REPO, REPO / "tests", "--deselect", compiled], ctx.limit(budget))
    tail = (r.stdout.strip().splitlines() or [""])[-1]
    if r.returncode not in (0, 5):
        raise RuntimeError(tail + "\n" + r.stdout[-1500:])
    return {"summary": tail}


def teach(ctx: Ctx, budget: float) -> dict:
    """The 4-view set the train and views steps read: a random ResNet-50 teacher (its cost is real)."""
    from kdkit.models.checkpoint import save_checkpoint
    from kdkit.models.factory import create_model

    import torch

    torch.manual_seed(0)  # the same teacher again on a rerun: the pass then finds its set done, or resumes it
    ckpt = ctx.path("resnet50-teacher.pth")
    save_checkpoint(ckpt, {"model": "resnet50", "model_kwargs": {}, "num_classes": 100, "image_size": 224,
                           "state_dict": create_model("resnet50", num_classes=100).state_dict()})
    r = checked(sh(ctx, "teach", kdkit("add-teacher-logits", ctx.path("shards-320"), "--checkpoint", ckpt,
                                       "--views", 4, "--out", ctx.path("kd4"), "--device", ctx.dali,
                                       "--batch-size", 256 if ctx.gpu else 64, "--split", "train", "--quiet"),
                   ctx.limit(budget)))
    rate = re.search(r"train: \d+ shards written, \d+ kept, (\d+) img/s", r.stdout)
    return {"samples_per_s": int(rate.group(1)) if rate else None, "views": 4,
            "note": "samples/s (each 4 views + the centre decode)"}


def train(ctx: Ctx, budget: float) -> dict:
    kd = ctx.path("kd4")
    batch = ctx.train_batch
    fresh_run(ctx, "replay")
    samples = json.loads((kd / "train" / "manifest.json").read_text())["num_samples"]
    epochs = max(1, -(-ctx.steps * batch // samples))
    r = checked(sh(ctx, "train", kdkit("train", "student", kd, "--kd", "replay", "--model", "resnet50",
                                       "--val-split", "none", "--batch-size", batch, "--epochs", epochs,
                                       "--no-progress", "--output", ctx.path("runs"), "--name", "replay",
                                       "--device", ctx.torch_device), ctx.limit(budget)))
    rows = [json.loads(line) for line in (ctx.path("runs") / "replay" / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    opening = next((line for line in r.stdout.splitlines() if line.startswith("kdkit train: resnet50")), "")
    out = {"epochs": len(rows), "steps": epochs * (samples // batch), "images_per_s": round(last["images_per_s"], 1),
           "loader_wait_share": round(last["loader_wait_share"], 4),
           "cuda_defaults": "bf16 autocast, channels-last (the CUDA defaults" in opening}
    if ctx.gpu and not out["cuda_defaults"]:
        raise CheckFailed("the run did not say it trains in bf16 and channels-last by default on CUDA", out)
    return out


def views(ctx: Ctx, budget: float) -> dict:
    js = ctx.path("views.json")
    checked(sh(ctx, "views", [sys.executable, REPO / "scripts" / "bench_views.py", "--data", ctx.path("kd4"),
                              "--device", ctx.torch_device, "--model", "resnet50", "--image-size", 224,
                              "--batch-size", ctx.train_batch, "--threads", ctx.threads,
                              "--amp", "bf16" if ctx.gpu else "none",
                              "--steps", 10 if ctx.gpu else 1, "--warmup", ctx.warmup, "--repeats", ctx.repeats,
                              "--json", js], ctx.limit(budget)))
    rates = json.loads(js.read_text())["images_per_s"]
    base = rates["none"]
    return {name: {**r, **{f"{k}_vs_none": round(v / base[k], 2) for k, v in r.items()}} for name, r in rates.items()}


def loader(ctx: Ctx, budget: float) -> dict:
    rows = {}
    for name in ("full", "320"):
        js = ctx.path(f"loader-{name}.json")
        checked(sh(ctx, "loader", kdkit("bench-loader", ctx.path(f"shards-{name}"), "--device", ctx.dali,
                                        "--batch-size", ctx.train_batch, "--threads", ctx.threads, "--size", 224,
                                        "--batches",
                                        ctx.batches, "--warmup", ctx.warmup, "--repeats", ctx.repeats,
                                        "--gpu-feed", "resnet50", "--no-baseline", "--json", js), ctx.limit(budget)))
        rep = json.loads(js.read_text())
        dali = rep["results"][0]["images_per_s"]
        feed = rep["gpu_feed"]
        step_rate = feed["model_only"]["images_per_s"]
        rows[name] = {"dali_img_s": round(dali, 1), "resnet50_step_img_s": round(step_rate, 1),
                      "fed_img_s": round(feed["loader_fed"]["images_per_s"], 1),
                      "loader_over_step": round(dali / step_rate, 2)}
    return rows


def teacher(ctx: Ctx, budget: float) -> dict:
    import shutil

    shutil.rmtree(ctx.path("teacher"), ignore_errors=True)  # a rerun's passes must not find their outputs done
    # on the CPU 64 images of its own, in 16 classes (every class present: the teacher must predict the set's)
    data = ["--shards", ctx.path("shards-320")] if ctx.gpu else ["--images", 64, "--classes", 16]
    r = checked(sh(ctx, "teacher", [sys.executable, REPO / "scripts" / "bench_teacher.py", "--device", ctx.dali,
                                    "--model", "resnet50", "--size", 224, *data,
                                    "--batch-size", 256 if ctx.gpu else 64, "--threads", ctx.threads,
                                    "--views", 4, "--repeats", 1, "--work", ctx.path("teacher")], ctx.limit(budget)))
    rows = re.findall(r"^\| (teacher pass[^|]*) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| ([\d.]+) \|$", r.stdout, re.M)
    return {label.strip(): {"images_per_s": int(loop), "vs_plain_forward": float(ratio)}
            for label, _, _, loop, _, ratio in rows}


STEPS = {"data": data, "decoders": decoders, "pixels": pixels, "ddp": ddp, "tests": tests, "teach": teach,
         "train": train, "views": views, "loader": loader, "teacher": teacher}
NEEDS = {"pixels": ["data"], "ddp": ["data"], "teach": ["data"], "train": ["teach"], "views": ["teach"],
         "loader": ["data"], "teacher": ["data"], "decoders": ["data"]}


# ---------------------------------------------------------------------------------------------
# the run

def step(results: dict, name: str, fn, ctx: Ctx, budget: float) -> None:
    t0 = time.perf_counter()
    try:
        results[name] = {"ok": True, **fn(ctx, budget)}
    except CheckFailed as e:
        results[name] = {"ok": False, "error": str(e), **e.measured}
    except Exception as e:  # noqa: BLE001 - a failed step is reported, the others still run
        results[name] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[-1500:]}"}
    results[name]["seconds"] = round(time.perf_counter() - t0, 1)
    results[name]["budget_s"] = budget
    print(f"-- {name}: {'ok' if results[name]['ok'] else 'FAILED'} ({results[name]['seconds']} s of {budget})",
          flush=True)


def write_json(ctx: Ctx, machine: dict, results: dict, started: float) -> None:
    doc = {"machine": machine, "device": ctx.torch_device, "elapsed_s": round(time.perf_counter() - started, 1),
           "planned_s": sum(b for _, b in PLAN), "results": results}
    tmp = ctx.out / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(ctx.out / "gpu_check.json")


def table(results: dict, machine: dict) -> str:
    lines = [f"kdkit GPU check on {machine.get('gpu', 'the CPU')} ({machine.get('cpu_threads')} CPU threads, torch "
             f"{machine.get('torch')})", "", "| step | s (budget) | result |", "| --- | --- | --- |"]
    for name, r in results.items():
        body = {k: v for k, v in r.items() if k not in ("ok", "seconds", "budget_s")}
        head = "" if r.get("ok") else "FAILED: "
        lines.append(f"| {name} | {r.get('seconds', '-')} ({r.get('budget_s', '-')}) | {head}"
                     f"{json.dumps(body)[:600]} |")
    return "\n".join(lines)


def describe_machine(gpu: bool, threads: int) -> dict:
    import platform

    import torch

    m = {"cpu_threads": threads, "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
         "cuda": torch.version.cuda}
    if gpu:
        m["gpu"] = torch.cuda.get_device_name(0)
        try:
            m["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                         capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    import kdkit

    m["kdkit"] = str(Path(kdkit.__file__).parent)  # the installed package, not a checkout
    return m


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "kdkit-gpu-check")
    ap.add_argument("--out", type=Path, default=None, help="folder for gpu_check.json and gpu_check.log "
                                                          "(default: --work)")
    ap.add_argument("--device", choices=["gpu", "cpu"], default="gpu",
                    help="cpu: every step on the CPU at the GPU run's tensor sizes, a few batches each")
    ap.add_argument("--only", default=None, help="comma-separated steps (" + ",".join(n for n, _ in PLAN) + "); "
                    "the steps they read from run too")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds after which no step starts (default: 540 on the GPU, none with --device cpu)")
    a = ap.parse_args()
    gpu = a.device == "gpu"
    deadline = a.deadline if a.deadline is not None else (540 if gpu else float("inf"))
    import torch

    if gpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch; nothing to check here (run it on a machine with an "
              "NVIDIA GPU, or with --device cpu to check the steps on the CPU)")
        return 0
    started = time.perf_counter()
    a.work.mkdir(parents=True, exist_ok=True)
    out = a.out or a.work
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(a.work)  # the installed kdkit, never a source checkout in the working directory
    os.environ["KDKIT_NATIVE"] = "0"  # nothing built here: the GPU backend never uses kdkit's CPU operator
    threads = len(os.sched_getaffinity(0))
    ctx = Ctx(work=a.work, out=out, gpu=gpu, threads=threads, images=5120 if gpu else 512, pixel_images=256,
              batches=40 if gpu else 1, warmup=5 if gpu else 0, repeats=2 if gpu else 1, steps=200 if gpu else 2,
              train_batch=256 if gpu else TRAIN_BATCH_CPU,
              log=out / "gpu_check.log")
    ctx.log.write_text("")
    machine = describe_machine(gpu, threads)
    wanted = set(a.only.split(",")) if a.only else {n for n, _ in PLAN}
    while True:  # and what they read from
        more = wanted | {d for n in wanted for d in NEEDS.get(n, [])}
        if more == wanted:
            break
        wanted = more
    results: dict = {}
    for name, budget in PLAN:
        if name not in wanted:
            continue
        elapsed = time.perf_counter() - started
        missing = [d for d in NEEDS.get(name, []) if not results.get(d, {}).get("ok")]
        if elapsed + budget > deadline:
            results[name] = {"ok": False, "error": f"skipped: {elapsed:.0f} s gone, its budget {budget} s would "
                                                   f"pass the {deadline:.0f} s deadline"}
        elif missing:
            results[name] = {"ok": False, "error": f"skipped: needs {', '.join(missing)}, which failed"}
        else:
            step(results, name, STEPS[name], ctx, budget)
        write_json(ctx, machine, results, started)
    print("\n" + table(results, machine))
    return 0 if all(r.get("ok") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
