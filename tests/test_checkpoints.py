"""One way from a file to a model: every kind of checkpoint kdkit writes (plain, AM-softmax head,
EMA, fine-tuned with a new head) and every bare timm/torchvision state dict, through every consumer
(teacher pass, online KD, fine-tuning, eval, predict, export), gives the model that was saved; and an
AM-softmax teacher teaches, stored and online."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import jpeg_bytes
from kdkit.errors import KdkitError
from kdkit.models.checkpoint import read_checkpoint
from kdkit.models.factory import create_model
from kdkit.models.heads import am_softmax, classifier_name
from test_train_loop import MODEL, cfg_for, write_colour_shards

KINDS = ("plain", "am_softmax", "ema", "finetuned", "bare", "bare_ddp")
CONSUMERS = ("teacher pass", "online KD", "fine-tuning", "eval", "predict", "export")
SIZE = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt-data")
    return {"three": write_colour_shards(root / "three"),
            "five": write_colour_shards(root / "five", num_classes=5, per_class=(2, 1), seed=1)}


@pytest.fixture(scope="module")
def files(data, tmp_path_factory):
    """{kind: (checkpoint path, model name for bare state dicts | None)}, each written as a user gets it."""
    from kdkit.train.loop import fit

    out = tmp_path_factory.mktemp("ckpts")
    three = data["three"]
    fit(cfg_for(three, out, epochs=1, name="plain"))
    fit(cfg_for(three, out, epochs=1, name="am", am_softmax=True, am_scale=16.0))
    fit(cfg_for(three, out, epochs=1, name="ema", ema=True, ema_decay=0.5))
    fit(cfg_for(data["five"], out, epochs=1, name="src"))
    fit(cfg_for(three, out, epochs=1, name="ft", finetune=str(out / "src" / "last.pth")))
    state = read_checkpoint(out / "plain" / "last.pth")["state_dict"]
    torch.save(state, out / "bare.pth")  # a plain timm state dict
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, out / "bare_ddp.pth")  # DDP-wrapped
    return {"plain": (out / "plain" / "last.pth", None), "am_softmax": (out / "am" / "last.pth", None),
            "ema": (out / "ema" / "last.pth", None), "finetuned": (out / "ft" / "last.pth", None),
            "bare": (out / "bare.pth", MODEL), "bare_ddp": (out / "bare_ddp.pth", MODEL)}


def reference(path: Path, ema: bool) -> torch.nn.Module:
    """The saved model rebuilt by hand from the file (the oracle the consumers are held against)."""
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if obj.get("format") != "kdkit-checkpoint":
        obj = read_checkpoint(Path(path).parent / "plain" / "last.pth")  # the bare files hold its weights
    model = create_model(obj["model"], num_classes=obj["num_classes"])
    if obj.get("head"):
        am_softmax(model, obj["head"]["scale"])
    model.load_state_dict(obj["ema_state_dict"] if ema and obj.get("ema_state_dict") else obj["state_dict"])
    return model.eval()


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("img") / "a.jpg"
    p.write_bytes(jpeg_bytes(np.random.default_rng(3), 48, 56))
    return p


X = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def outputs(model) -> torch.Tensor:
    with torch.no_grad():
        return model(X).float()


@pytest.mark.parametrize("consumer", CONSUMERS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.slow
def test_every_checkpoint_through_every_consumer(files, data, image, tmp_path, kind, consumer):
    path, name = files[kind]
    # one rule everywhere: a checkpoint's EMA weights where it has them
    if consumer == "teacher pass":  # kdkit add-teacher-logits
        from kdkit.teach.config import TeacherSpec
        from kdkit.teach.teachers import load_teacher

        teacher = load_teacher(TeacherSpec(path, model=name), num_classes=3)
        assert torch.allclose(outputs(teacher.model), outputs(reference(path, ema=True)), atol=1e-5)
        assert teacher.info.weights == ("ema" if kind == "ema" else "model") and teacher.record["model"] == MODEL and ("head" in teacher.record) == (kind == "am_softmax")
    elif consumer == "online KD":  # kdkit train student --kd online
        from kdkit.train.kd import build_teacher

        cfg = cfg_for(data["three"], tmp_path, kd="online", teacher_checkpoint=str(path), teacher_model=name)
        classes = json.loads((data["three"] / "train" / "manifest.json").read_text())["classes"]
        teacher = build_teacher(cfg, 3, classes, torch.device("cpu"))
        assert torch.allclose(outputs(teacher), outputs(reference(path, ema=True)), atol=1e-5)
    elif consumer == "fine-tuning":  # kdkit train --finetune: the backbone as saved, a fresh 4-class head
        from kdkit.train.model import build_model, load_finetune

        cfg = cfg_for(data["three"], tmp_path, finetune=str(path))
        model = build_model(cfg, 4)
        reset = load_finetune(model, str(path), cfg)
        head = classifier_name(model) + "."
        assert reset and all(k.startswith(head) for k in reset) and model.get_classifier().out_features == 4
        ref = reference(path, ema=True).state_dict()
        for k, v in model.state_dict().items():
            if not k.startswith(head):
                assert torch.equal(v, ref[k]), k
    elif consumer == "eval":  # kdkit eval (EMA weights where the checkpoint has them)
        from kdkit.evaluate.eval import load_models

        models, infos = load_models([path], model_name=name)
        assert infos[0].weights == ("ema" if kind == "ema" else "model")
        assert torch.allclose(outputs(models[0]), outputs(reference(path, ema=True)), atol=1e-5)
    elif consumer == "predict":  # kdkit predict: the checkpoint's transform, its probabilities
        from kdkit.evaluate.predict import PredictConfig, eval_transform, load_image, predict
        from kdkit.models.checkpoint import load_model

        _, info = load_model(path, model_name=name)
        got = predict(PredictConfig(checkpoint=path, inputs=[image], topk=3, model_name=name, device="cpu"))[0]
        with torch.no_grad():
            probs = reference(path, ema=True)(eval_transform(info)(load_image(image))[None]).softmax(-1)[0]
        assert [t["index"] for t in got.top] == probs.argsort(descending=True).tolist()
        assert [t["prob"] for t in got.top] == pytest.approx(probs.sort(descending=True).values.tolist(), abs=1e-5)
    else:  # kdkit export: the ONNX graph computes the saved model
        from kdkit.evaluate.export import ExportConfig, export, ort_session

        report = export(ExportConfig(checkpoint=path, output=tmp_path / "m.onnx", model_name=name, benchmark=False,
                                     exporter="torchscript", parity_samples=2))
        assert report["parity"]["ok"]
        size = report["input"]["shape"][-1]  # the checkpoint's (32), or timm's default for a bare state dict
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
        got = ort_session(tmp_path / "m.onnx").run(["logits"], {"images": x.numpy()})[0]
        with torch.no_grad():
            assert np.allclose(got, reference(path, ema=True)(x).numpy(), atol=1e-4)


def test_an_am_softmax_teacher_teaches_stored_and_online(files, data, tmp_path):
    """`kdkit train teacher --am-softmax` -> `add-teacher-logits` -> `train student --kd stored`, and the
    same teacher run alongside (`--kd online`): the documented flow, end to end."""
    from kdkit.pipelines import DaliLoader, loader_config
    from kdkit.shards import contract, tario
    from kdkit.teach import TeacherPassConfig, TeacherSpec, add_teacher_logits
    from kdkit.teach import members
    from kdkit.train.loop import fit

    teacher, _ = files["am_softmax"]
    out = tmp_path / "kd"
    add_teacher_logits(TeacherPassConfig(data["three"], [TeacherSpec(teacher)], out=out, splits=["train"],
                                         device="cpu", batch_size=8, threads=2, progress=False))
    # what is stored is the AM-softmax teacher's output on the eval view
    man = json.loads((out / "train" / contract.MANIFEST).read_text())
    assert man["teacher"]["teachers"][0]["head"]["type"] == "am_softmax"
    stored = [members.decode(m, man["teacher"], 3)["values"] for s in man["shards"]
              for _, m in tario.iter_tar_samples(out / "train" / s["tar"])]
    views = DaliLoader(out / "train", loader_config("eval", image_size=SIZE, batch_size=32, crop_ratio=0.875,
                                                    shard_id=0, num_shards=1, num_threads=2))
    with torch.no_grad():
        again = reference(teacher, ema=False)(next(iter(views)).images)
    assert np.abs(np.stack(stored) - again.numpy()).max() < 0.05  # fp16 storage of |logits| <= scale 16
    assert np.abs(np.stack(stored)).max() <= 16.0 + 0.01  # scaled cosines: the AM head's own logits
    stored_run = fit(cfg_for(out, tmp_path, epochs=1, name="stored", kd="stored", val_split=""))
    online_run = fit(cfg_for(data["three"], tmp_path, epochs=1, name="online", kd="online",
                             teacher_checkpoint=str(teacher)))
    assert np.isfinite(stored_run[-1]["train_loss"]) and np.isfinite(online_run[-1]["train_loss"])


class _Touch:
    """Unpickling this runs code: it creates its marker file (what a crafted checkpoint could do worse)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("consumer", CONSUMERS)
def test_a_crafted_checkpoint_never_runs_its_code(files, data, image, tmp_path, consumer, capsys):
    """Every consumer loads checkpoints as data only (torch.load weights_only=True): a file carrying code
    is refused with one line naming it and the opt-in, and its code does not run."""
    from kdkit.cli import main

    path, _ = files["plain"]
    crafted, marker = tmp_path / "crafted.pth", tmp_path / "ran"
    torch.save({**read_checkpoint(path), "payload": _Touch(marker)}, crafted)
    argv = {"teacher pass": ["add-teacher-logits", str(data["three"]), "--checkpoint", str(crafted), "--out",
                             str(tmp_path / "kd"), "--device", "cpu"],
            "online KD": ["train", "student", str(data["three"]), "--kd", "online", "--teacher-checkpoint", str(crafted),
                          "--output", str(tmp_path / "runs"), "--device", "cpu"],
            "fine-tuning": ["train", "teacher", str(data["three"]), "--model", MODEL, "--finetune", str(crafted),
                            "--output", str(tmp_path / "runs"), "--device", "cpu"],
            "eval": ["eval", str(crafted), "--data", str(data["three"]), "--device", "cpu"],
            "predict": ["predict", str(crafted), str(image), "--device", "cpu"],
            "export": ["export", str(crafted), "-o", str(tmp_path / "m.onnx")]}[consumer]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "crafted.pth: holds Python objects" in err and "--trust-checkpoint" in err
    assert not marker.exists() and not (tmp_path / "kd").exists() and not (tmp_path / "m.onnx").exists()


def test_trust_checkpoint_is_the_explicit_opt_in(files, tmp_path):
    from kdkit.models.checkpoint import load_model

    path, _ = files["plain"]
    crafted, marker = tmp_path / "crafted.pth", tmp_path / "ran"
    torch.save({**read_checkpoint(path), "payload": _Touch(marker)}, crafted)
    model, info = load_model(crafted, trust=True)
    assert marker.exists() and info.model == MODEL  # the user said so: loaded, code and all


def test_a_teacher_of_other_classes_is_refused_everywhere_it_meets_a_set(files, data, tmp_path):
    """Same class count, other class ids or order: the teacher pass and online KD refuse it as eval does,
    naming the first difference (it used to teach wrong targets silently)."""
    from kdkit.models.checkpoint import save_checkpoint
    from kdkit.teach import TeacherPassConfig, TeacherSpec, add_teacher_logits
    from kdkit.train.loop import fit

    path, _ = files["plain"]
    obj = read_checkpoint(path)
    shuffled = tmp_path / "shuffled.pth"
    save_checkpoint(shuffled, {**obj, "classes": [obj["classes"][i] for i in (1, 0, 2)]})
    with pytest.raises(KdkitError, match=r"classes are not the ones .*shuffled\.pth.*another order.*index 0"):
        add_teacher_logits(TeacherPassConfig(data["three"], [TeacherSpec(shuffled)], out=tmp_path / "kd",
                                             device="cpu", progress=False))
    with pytest.raises(KdkitError, match=r"classes are not the ones .*shuffled\.pth"):
        fit(cfg_for(data["three"], tmp_path, epochs=1, name="online", kd="online", teacher_checkpoint=str(shuffled)))
    assert not (tmp_path / "kd").exists() and not (tmp_path / "online").exists()


def test_every_command_says_which_weights_it_used_on_its_first_line(files, data, image, tmp_path, capsys):
    from kdkit.cli import main

    path, _ = files["ema"]
    kd = tmp_path / "kd"
    for argv, first in (
            (["eval", str(path), "--data", str(data["three"]), "--out", str(tmp_path / "ev"), "--device", "cpu"],
             "ema weights"),
            (["predict", str(path), str(image), "--device", "cpu", "--no-ema"], "model weights"),
            (["export", str(path), "-o", str(tmp_path / "m.onnx"), "--no-benchmark", "--exporter", "torchscript"],
             "ema weights"),
            (["add-teacher-logits", str(data["three"]), "--checkpoint", str(path), "--out", str(kd), "--split", "val",
              "--device", "cpu", "--quiet"], "ema weights")):
        assert main(argv) == 0, argv[0]
        out = capsys.readouterr().out.splitlines()
        assert first in out[0] and str(path) in out[0], (argv[0], out[:2])
