"""DDP on CPU: two gloo processes with torchrun's environment run `fit`; every sample is trained on
exactly once per epoch across the ranks, the ranks stay in sync, only rank 0 writes, and the
reduced validation metrics equal a single-process evaluation of the saved weights."""
from __future__ import annotations

import json
import os
import socket
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import jpeg_bytes

WORLD = 2
SAMPLES = 24  # one sample per class, so a label names its sample


def one_per_class_shards(root: Path) -> Path:
    from kdkit.shards.sources.folder import list_folder
    from kdkit.shards.writer import ShardConfig, write_dataset

    rng = np.random.default_rng(5)
    for split in ("train", "val"):
        for c in range(SAMPLES):
            d = root / "raw" / split / f"c{c:02d}"
            d.mkdir(parents=True)
            (d / "0.jpg").write_bytes(jpeg_bytes(rng, 40, 48))
    write_dataset(list_folder(root / "raw"), root / "shards", ShardConfig(samples_per_shard=5, workers=1,
                                                                         progress=False))
    return root / "shards"


def config(data: Path, out: Path):
    from kdkit.train.config import make_config

    return make_config(dict(data=str(data), output=str(out), name="ddp", model="test_efficientnet", image_size=32,
                            batch_size=4, loader_threads=1, shuffle_buffer=16, epochs=2, progress=False,
                            opt="sgd", lr=0.05, mixup=0.2, ema=True, device="cpu"))


def worker(rank: int, port: int, data: str, out: str) -> None:
    """One rank, started the way torchrun starts it (its environment variables)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from kdkit.train import loop

    seen: dict[int, list[int]] = {}
    state = {"epoch": None, "main": None}
    real_epoch, real_step = loop.train_one_epoch, loop.train_step

    def epoch(p, e, *a, **k):
        state["epoch"], state["main"] = e, p.run.is_main
        return real_epoch(p, e, *a, **k)

    def step(p, batch, *a, **k):
        seen.setdefault(state["epoch"], []).extend(batch.labels.view(-1).tolist())
        out_ = real_step(p, batch, *a, **k)
        state["params"] = float(sum(q.detach().double().sum() for q in p.student.model.parameters()))
        return out_

    loop.train_one_epoch, loop.train_step = epoch, step
    loop.fit(config(Path(data), Path(out)))
    Path(out, f"rank{rank}.json").write_text(json.dumps({"seen": seen, "main": state["main"],
                                                         "params": state["params"]}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_ddp_two_cpu_ranks(tmp_path):
    data = one_per_class_shards(tmp_path / "d")
    out = tmp_path / "runs"
    out.mkdir()
    torch.multiprocessing.spawn(worker, args=(free_port(), str(data), str(out)), nprocs=WORLD, join=True)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]

    # each rank reads its own half; together every sample exactly once per epoch
    for e in ("0", "1"):
        halves = [r["seen"][e] for r in ranks]
        assert len(halves[0]) == len(halves[1]) == SAMPLES // WORLD
        assert sorted(halves[0] + halves[1]) == list(range(SAMPLES)), e
    assert ranks[0]["seen"]["0"] != ranks[0]["seen"]["1"]  # reshuffled between epochs
    assert ranks[0]["params"] == pytest.approx(ranks[1]["params"], rel=1e-12)  # DDP kept the ranks in sync

    # only rank 0 wrote: one row per epoch, one set of files
    assert [r["main"] for r in ranks] == [True, False]
    run = out / "ddp"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["samples"] == SAMPLES
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "metrics.jsonl", "last.pth", "best.pth", "curves.png"}

    # the reduced val metrics are the single-process metrics of the saved weights
    from kdkit.models.checkpoint import read_checkpoint
    from kdkit.models.factory import create_model
    from kdkit.runtime import Runtime
    from kdkit.train.data import eval_loader, prepare_data
    from kdkit.train.loop import evaluate

    cfg = config(data, out)
    info = prepare_data(cfg)
    ckpt = read_checkpoint(run / "last.pth")
    p = SimpleNamespace(rt=Runtime(), data=info, autocast=nullcontext)
    for weights, prefix in (("state_dict", "val"), ("ema_state_dict", "ema")):
        model = create_model(cfg.model, info.num_classes)
        model.load_state_dict(ckpt[weights])
        single = evaluate(model, eval_loader(cfg, info, Runtime()), p)
        assert single["count"] == SAMPLES
        assert rows[-1][f"{prefix}_top1"] == pytest.approx(single["top1"], abs=1e-9)
        assert rows[-1][f"{prefix}_top5"] == pytest.approx(single["top5"], abs=1e-9)
        assert rows[-1][f"{prefix}_loss"] == pytest.approx(single["loss"], rel=1e-5)


# ---------------------------------------------------------------------------------------------
# resuming with another number of ranks

class Interrupted(Exception):
    pass


def phase(rank: int, world: int, port: int, data: str, out: str, tag: str, stop_after, resume: bool) -> None:
    """One rank of a run of 2 epochs at batch 2 that saves last.pth after every step, stopped before
    its step `stop_after` (as a kill would stop it) or run to the end; writes the labels it trained on,
    per epoch. world 1 runs in the calling process, without torchrun's environment."""
    if world > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        torch.set_num_threads(1)
    from kdkit.train import loop
    from kdkit.train.config import make_config

    seen: dict[int, list[int]] = {}
    state = {"epoch": None, "steps": 0}
    real_epoch, real_step = loop.train_one_epoch, loop.train_step

    def epoch(p, e, *a, **k):
        state["epoch"] = e
        return real_epoch(p, e, *a, **k)

    def step(p, batch, *a, **k):
        if state["steps"] == stop_after:
            raise Interrupted
        out_ = real_step(p, batch, *a, **k)
        seen.setdefault(state["epoch"], []).extend(batch.labels.view(-1).tolist())
        state["steps"] += 1
        return out_

    loop.train_one_epoch, loop.train_step = epoch, step
    try:
        loop.fit(make_config(dict(data=data, output=out, name="resized", model="test_efficientnet", image_size=32,
                                  batch_size=2, loader_threads=1, shuffle_buffer=8, epochs=2, progress=False,
                                  opt="sgd", lr=0.05, device="cpu", checkpoint_every=1,
                                  resume="last" if resume else None)))
    except Interrupted:
        pass
    finally:
        loop.train_one_epoch, loop.train_step = real_epoch, real_step
    Path(out, f"{tag}-rank{rank}.json").write_text(json.dumps(seen))


def run_phase(world: int, data: Path, out: Path, tag: str, stop_after=None, resume=False) -> list[dict]:
    args = (world, free_port(), str(data), str(out), tag, stop_after, resume)
    if world == 1:
        phase(0, *args)
    else:
        torch.multiprocessing.spawn(phase, args=args, nprocs=world, join=True)
    return [{int(e): v for e, v in json.loads((out / f"{tag}-rank{r}.json").read_text()).items()} for r in range(world)]


@pytest.mark.timeout(400)
@pytest.mark.slow
@pytest.mark.parametrize("before, after, stop", [(2, 1, 2), (1, 2, 4)])
def test_resuming_with_another_number_of_ranks_trains_each_sample_once(tmp_path, before, after, stop):
    """8 -> 4 GPUs must not repeat half an epoch, nor 4 -> 8 skip the rest of it: an epoch interrupted
    with `before` ranks and resumed with `after` trains each of its samples exactly once, its metrics
    count every sample, and the next epoch is a whole one at the new world size."""
    data = one_per_class_shards(tmp_path / "d")
    out = tmp_path / "runs"
    out.mkdir()
    first = run_phase(before, data, out, "first", stop_after=stop)
    assert all(len(r[0]) == 2 * stop for r in first)  # stopped inside epoch 1, last.pth written at that step
    if after == 1:  # in this process: its warning is seen here
        with pytest.warns(UserWarning, match=f"written by {before} ranks, this run has {after}"):
            rest = run_phase(after, data, out, "rest", resume=True)
    else:
        rest = run_phase(after, data, out, "rest", resume=True)
    epoch1 = [x for r in first for x in r[0]] + [x for r in rest for x in r.get(0, [])]
    assert sorted(epoch1) == list(range(SAMPLES))  # each sample once: none repeated, none skipped
    assert sorted(x for r in rest for x in r[1]) == list(range(SAMPLES))  # then a whole epoch
    assert len({len(r[0]) for r in rest}) == 1  # the ranks ran equal steps (DDP)
    rows = [json.loads(line) for line in (out / "resized" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["samples"]) for r in rows] == [(1, SAMPLES), (2, SAMPLES)]
