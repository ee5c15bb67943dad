"""`kdkit demo --quick` on a tiny MNIST subset: the whole flow runs, prints its commands, writes
its results, and a second run continues instead of starting over."""
from __future__ import annotations

import json

import pytest

from kdkit.cli import main

pytest.importorskip("mnist")

TINY = ["--quick", "--train-size", "300", "--test-size", "100", "--teacher-epochs", "1", "--losses", "kl", "dkd",
        "--student-epochs", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out), *TINY]) == 0
    return out


@pytest.mark.slow
def test_demo_runs_the_flow_and_reports(demo):
    res = json.loads((demo / "results.json").read_text())
    ways = ["no-kd", "kd-stored", "kd-replay4", "kd-replay8", "kd-online", "kd-replay8-dkd", "kd-online-dkd"]
    assert set(res["runs"]) == {"teacher", *(f"{w}-s0" for w in ways)}
    for name, row in res["runs"].items():  # every net judged on the same 100 test images
        assert row["samples"] == 100, name
        assert 0 <= row["errors"] <= 100
    s = res["summary"]["students"]
    assert list(s) == ways  # the rows in the order a reader compares them
    md = (demo / "results.md").read_text()
    assert "| teacher |" in md and "gap" in md
    for w in ways[1:]:  # every KD row says how much of the teacher-student gap it closed
        assert s[w]["label"] in md and "gap_recovered" in s[w]
    assert (demo / "students.png").stat().st_size > 0
    # the shard sets it made are valid, and the teacher outputs are where the students read them
    for rel in ("shards/train", "shards/test", "shards-kd1/train", "shards-kd4/train", "shards-kd8/train"):
        assert main(["verify", str(demo / rel)]) == 0, rel
    for k in (4, 8):
        man = json.loads((demo / f"shards-kd{k}/train/manifest.json").read_text())
        assert man["teacher"]["views"] == k


@pytest.mark.slow
def test_demo_prints_commands_a_user_can_repeat(demo):
    lines = (demo / "commands.sh").read_text().splitlines()
    verbs = [line.split()[1] if line.startswith("kdkit") else line.split()[2] for line in lines]
    assert verbs[:3] == ["kdkit.demo.mnist", "shard", "shard"]
    assert verbs.count("train") == 8 and verbs.count("add-teacher-logits") == 3 and verbs.count("eval") == 8
    assert all(line.startswith(("kdkit ", "python -m kdkit.demo.mnist")) for line in lines)
    # the same crops for every student, and the online teacher is the demo's own teacher
    students = [line for line in lines if line.startswith("kdkit train student")]
    assert all("--random-area 0.25 1.0 --no-flip" in line for line in students)
    online = [line for line in students if "--kd online" in line]
    assert len(online) == 2 and all("runs/teacher/last.pth" in line for line in online)
    assert sum("--kd-loss dkd" in line for line in students) == 2


@pytest.mark.slow
def test_demo_rerun_keeps_finished_steps(demo, capsys):
    before = {p: p.stat().st_mtime_ns for p in demo.glob("runs/*/last.pth")}
    lines = len((demo / "commands.sh").read_text().splitlines())
    assert main(["demo", "--out", str(demo), *TINY]) == 0
    assert {p: p.stat().st_mtime_ns for p in demo.glob("runs/*/last.pth")} == before
    assert len((demo / "commands.sh").read_text().splitlines()) == lines  # nothing ran again
    assert "| teacher |" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_refuses_a_folder_of_another_demo(demo, capsys):
    assert main(["demo", "--out", str(demo), *TINY[:-4], "--student-epochs", "2", "--device", "cpu"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_hinton_mlp_is_a_timm_style_model():
    import torch

    from kdkit.models.factory import create_model

    m = create_model("mlp_800", num_classes=10)
    assert m(torch.zeros(2, 3, 28, 28)).shape == (2, 10)
    assert sum(p.numel() for p in m.parameters()) == 3 * 784 * 800 + 800 + 800 * 800 + 800 + 800 * 10 + 10
    assert m.get_classifier() is m.fc
    with pytest.raises(Exception, match="--image-size 28, or build it for your size with --model-kwargs img_size=32"):
        m(torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize("flags, message", [
    (["--random-area", "0.9", "0.3"], "--random-area: MIN 0.9 is above MAX 0.3"),
    (["--random-area", "0", "1"], "--random-area"),
    (["--kd-alpha", "1.5"], "--kd-alpha"),
    (["--holdout", "5"], "--holdout"),
])
def test_demo_refuses_bad_options_in_one_line(flags, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--out", str(tmp_path / "d"), *flags])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and message in err, err
    assert not (tmp_path / "d").exists()  # refused before anything is written


def test_holdout_is_a_balanced_split_of_train():
    import numpy as np

    from kdkit.demo.mnist import hold_out

    y = np.repeat(np.arange(10), 50)
    x = np.arange(len(y))  # the "image" is its index, to tell samples apart
    (rx, ry), (hx, hy) = hold_out(x, y, 100)
    assert np.bincount(hy).tolist() == [10] * 10  # 10 of each digit held out
    assert len(rx) == 400 and not set(rx) & set(hx) and set(rx) | set(hx) == set(x)


@pytest.mark.parametrize("flags", [["--views-per-load", "3"], ["--views-per-load", "8", "--student-epochs", "8"]])
def test_demo_refuses_views_per_load_that_would_change_the_budget(flags, capsys, tmp_path):
    # 3 divides neither 10 epochs nor a batch of 128; 8 exceeds the 4 views of the K=4 row
    assert main(["demo", "--out", str(tmp_path / "d"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--views-per-load {flags[1]}: expected at most 4" in err and "the same training images" in err
    assert not (tmp_path / "d").exists()


def test_demo_replay_rows_with_views_per_load_train_on_the_same_images(tmp_path):
    from kdkit.demo.run import Demo, DemoConfig

    cfg = DemoConfig.preset(tmp_path, False, student_epochs=8, views_per_load=4)
    demo, seen = Demo(cfg, echo=lambda text: None), {}
    demo.kdkit = lambda *args: seen.__setitem__(args[args.index("--name") + 1], [str(a) for a in args])
    for way, (data, kd, loss) in cfg.student_ways().items():
        demo._train("student", way, tmp_path / data, cfg.student_model, seed=0, kd=kd, loss=loss)

    def budget(way):
        a = seen[way]
        return int(a[a.index("--epochs") + 1]), int(a[a.index("--batch-size") + 1]), "--views-per-load" in a

    assert budget("no-kd") == budget("kd-stored") == budget("kd-online") == (8, 128, False)
    for k in (4, 8):  # 2 epochs of 32 samples x 4 views: 8 x 128 images per sample set, as every row
        a = seen[f"kd-replay{k}"]
        assert budget(f"kd-replay{k}") == (2, 32, True) and a[a.index("--views-per-load") + 1] == "4"


@pytest.mark.parametrize("seeds", [1, 2])
def test_report_writes_error_counts_as_counts(seeds, tmp_path):
    """Errors are whole numbers ("180", not "180.0"); a mean over seeds may be a half; "mean ± standard
    deviation" only where there are seeds to spread."""
    from kdkit.demo.report import write_report
    from kdkit.demo.run import DemoConfig

    cfg = DemoConfig(out=tmp_path, seeds=seeds)
    rows = {"teacher": {"samples": 10000, "top1": 99.0, "errors": 100}}
    for s in range(seeds):
        for i, way in enumerate(cfg.student_ways()):
            rows[f"{way}-s{s}"] = {"samples": 10000, "top1": 98.0, "errors": 180 - 10 * i + s}
    write_report(cfg, rows, tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert ".0 |" not in md and ".0 fewer" not in md and ".0 more" not in md
    if seeds == 1:
        assert "| 180 | 1.80 |" in md and "±" not in md and "one seed" in md
    else:
        assert "| 180.5 ± 0.7 |" in md and "mean ± standard deviation over 2 seeds" in md


def test_demo_trains_the_replayed_and_online_rows_once_per_loss_with_its_settings(tmp_path):
    from kdkit.demo import LOSS_SETTINGS
    from kdkit.demo.report import label, summarize, verdict
    from kdkit.demo.run import Demo, DemoConfig

    cfg = DemoConfig.preset(tmp_path, False, losses=("kl", "dkd", "kl-ls"))
    assert list(cfg.student_ways()) == ["no-kd", "kd-stored", "kd-replay4", "kd-replay8", "kd-online", "kd-replay8-dkd",
                                        "kd-online-dkd", "kd-replay8-kl-ls", "kd-online-kl-ls"]
    demo, seen = Demo(cfg, echo=lambda text: None), {}
    demo.kdkit = lambda *args: seen.__setitem__(args[args.index("--name") + 1], [str(a) for a in args])
    for way, (data, kd, loss) in cfg.student_ways().items():
        demo._train("student", way, tmp_path / data, cfg.student_model, seed=0, kd=kd, loss=loss)

    def flag(way, name):
        a = seen[way]
        return a[a.index(name) + 1]

    assert flag("kd-replay4", "--kd-loss") == "kl" and float(flag("kd-replay4", "--kd-alpha")) == cfg.kd_alpha
    for way, loss in (("kd-online-dkd", "dkd"), ("kd-replay8-kl-ls", "kl-ls")):
        assert flag(way, "--kd-loss") == loss
        for key, value in LOSS_SETTINGS[loss].items():  # each loss's settings chosen on held-out images
            assert float(flag(way, "--" + key.replace("_", "-"))) == value
    assert label("kd-online-dkd").endswith("online teacher on its crop (consistent upper bound), DKD")
    rows = {"teacher": {"errors": 60, "top1": 99.4, "samples": 10000}}
    for i, way in enumerate(cfg.student_ways()):
        rows.update({f"{way}-s{s}": {"errors": 150 - 5 * i + s, "samples": 10000} for s in range(3)})
    lines = verdict(summarize(rows, 3), 3)
    assert any(line.startswith("DKD (kd-online) vs the same row with KL: 10 fewer errors") for line in lines)
    with pytest.raises(Exception, match="--losses kl hint: expected one or more of kl, dkd, kl-ls, dkd-ls"):
        DemoConfig.preset(tmp_path, False, losses=("kl", "hint"))
