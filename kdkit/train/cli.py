"""`kdkit train teacher|student|mutual` and `kdkit lr-find`: flags built from TrainConfig's fields.

    kdkit train teacher shards/food -c bag-of-tricks --model resnet50 --epochs 30
    kdkit train student shards/food -c assemble-resnet50-kd --kd replay --name r50-kd
    kdkit train student shards/food --name r50-kd --resume          # continue after a kill
    kdkit train mutual shards/food --model mobilenetv3_large_100 --peer-am-softmax --kd-alpha 0.5
    torchrun --nproc_per_node 8 -m kdkit train student shards/imagenet -c assemble-resnet50-kd
    kdkit lr-find shards/food -c bag-of-tricks --model resnet50

Precedence (timm's train.py): TrainConfig default < recipe (-c NAME or FILE.yaml) < flag. Flags
have no argparse defaults (SUPPRESS), so the namespace holds exactly what was typed and the recipe
fills the rest. kdkit/cli.py wires these in with add_parser(sub) and add_lr_find_parser(sub).
"""
from __future__ import annotations

import argparse

import yaml

from kdkit import options
from kdkit.errors import KdkitError
from kdkit.options import KD, HelpFormatter, add_options, given_options, option_fields
from kdkit.train.config import FIELDS, KD_MODES, TrainConfig, list_recipes, load_recipe, make_config

# what each mode takes besides the options every training has: a teacher never distills, only mutual
# learning has a peer; `mutual` itself is set by the mode
DISTILL = ("kd", "topk_target", "kd_loss", "kd_temperature", "kd_alpha", "kl_weight", "dkd_alpha", "dkd_beta",
           "dkd_warmup", "teacher_model", "teacher_checkpoint", "views_per_load")
MODE_OPTIONS = {
    "teacher": (),
    "lr-find": DISTILL,
    "student": DISTILL,
    "mutual": (*DISTILL, "peer_model", "peer_am_softmax"),
}
NOT_FLAGS = ("data", "recipe", "mutual", "resume")  # the positional, -c, the mode, and --resume (below)
PEER = ("peer_model", "peer_am_softmax")


def command_of(mode: str) -> str:
    return "kdkit lr-find" if mode == "lr-find" else f"kdkit train {mode}"


def not_taken(mode: str) -> list[str]:
    """The options of other modes that `mode` does not take (their flags are refused naming the mode)."""
    kd_only = [n for n, f in option_fields(TrainConfig).items() if f.metadata["group"] == KD]
    return [n for n in kd_only if n not in MODE_OPTIONS[mode] and n not in NOT_FLAGS and n != "checkpoint_ema"]


def not_in_mode(mode: str, name: str) -> str:
    """One line: which command takes option `name` instead of `mode`."""
    flag = options.flag_of(TrainConfig, name)
    if name in PEER:
        why = "only mutual learning trains a peer; use `kdkit train mutual`"
    else:
        why = "it trains without a teacher; use `kdkit train student` to distill"
    return f"`{command_of(mode)}` takes no {flag}: {why}"


class _NotInMode(argparse.Action):
    """A flag of another mode: refused in one line naming the mode and the command that takes it (argparse
    would say "unrecognized arguments", or with prefix matching take --kd for --kd-alpha)."""

    def __init__(self, *args, mode: str, **kwargs):
        self.mode = mode
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(not_in_mode(self.mode, self.dest[len("not_taken_"):]))


def add_train_arguments(p: argparse.ArgumentParser, mode: str, kd_default: str | None = None) -> None:
    """-c/--config, the DATA positional and one flag per TrainConfig option this mode takes, in timm's
    argument groups (kdkit.options.add_options). Flags have no argparse defaults (SUPPRESS): the
    namespace holds what was typed, the recipe fills the rest."""
    p.add_argument("-c", "--config", default=None, metavar="RECIPE",
                   help=f"recipe name ({', '.join(list_recipes())}) or YAML file filling the defaults")
    p.add_argument("data", nargs="?", default=argparse.SUPPRESS,
                   help="dataset root (holding train/ and val/ shard sets) or a train shard-set folder")
    groups: dict = {}
    add_options(p, TrainConfig, exclude=set(NOT_FLAGS) | set(not_taken(mode)), suppress=True, groups=groups,
                defaults={"kd": kd_default} if kd_default else None)
    for name in not_taken(mode):  # not in the help; given, refused naming the mode that takes it
        p.add_argument(options.flag_of(TrainConfig, name), nargs="*", dest="not_taken_" + name, action=_NotInMode,
                       mode=mode, help=argparse.SUPPRESS)
    groups[options.RUN].add_argument(
        "--resume", nargs="?", const="last", default=argparse.SUPPRESS, metavar="CHECKPOINT",
        help="continue the run named by --name from its last.pth, or from CHECKPOINT")


# what a resumed run may change from its saved config: where and how it runs and reports, and how long
# it goes on; everything else would make it another run (a new --name, or --finetune from its weights)
RESUME_MAY_CHANGE = {"data", "val_data", "output", "name", "resume", "epochs", "checkpoint_every", "eval_every",
                     "log_interval", "progress", "tensorboard", "loader_threads", "device", "loader_device",
                     "compile", "trust_checkpoint", "hw_decoder_load", "preallocate_width_hint",
                     "preallocate_height_hint"}


def config_from_args(a: argparse.Namespace, mode: str) -> TrainConfig:
    """TrainConfig of a parsed command line: the recipe's values, then every flag that was given. With
    --resume, the run's saved config.yaml instead of the recipe: flags may change only what
    RESUME_MAY_CHANGE lists (each change is printed when the run starts)."""
    given = given_options(a, TrainConfig)
    if "resume" in given:
        saved = _saved_config(a, given, mode)
        if saved is not None:
            return saved
    recipe = load_recipe(a.config) if a.config else {}
    if mode == "teacher" and "kd" in recipe:
        from kdkit.train.kd import kd_mode

        if recipe["kd"] in KD_MODES and kd_mode(recipe["kd"]).distills:
            raise KdkitError(f"recipe {a.config} distills (kd: {recipe['kd']}); use `kdkit train student`")
    if recipe.get("mutual") and mode != "mutual":
        raise KdkitError(f"recipe {a.config} trains two students (mutual: true); use `kdkit train mutual`")
    for key, value in recipe.items():  # what the mode's flags refuse, a recipe may not set either
        name = key.replace("-", "_")
        if name in not_taken(mode) and name != "kd" and options.plain(value) != options.plain(FIELDS[name].default):
            raise KdkitError(f"recipe {a.config} sets {key}: {value}; " + not_in_mode(mode, name))
    if mode == "mutual":
        given["mutual"] = True
    if mode == "student" and "kd" not in given and "kd" not in recipe:
        given["kd"] = "stored"
    if "model_kwargs" in recipe and "model_kwargs" in given:  # flags add to / override the recipe's kwargs
        given["model_kwargs"] = {**recipe["model_kwargs"], **given["model_kwargs"]}
    try:
        return make_config(named({**recipe, **given}, mode))
    except TypeError as e:
        raise KdkitError(f"bad option: {e}") from None


def named(values: dict, mode: str) -> dict:
    """The values with the run's default name where none is given: <mode>-<model>, after the `kdkit train`
    mode the user chose (TrainConfig.run_name can only tell a student from its KD mode, and `kdkit train
    student --kd none` is still a student)."""
    if values.get("name") or mode not in ("teacher", "student", "mutual"):
        return values
    return {**values, "name": f"{mode}-{values.get('model', FIELDS['model'].default)}"}


def _saved_config(a: argparse.Namespace, given: dict, mode: str) -> TrainConfig | None:
    """The resumed run's own config (runs/NAME/config.yaml) with the flags that may change applied; None
    where the run has no saved config (a checkpoint given by path from elsewhere)."""
    import shlex
    from pathlib import Path

    if mode == "mutual":
        given["mutual"] = True
    name = given.get("name") or make_config(named({**(load_recipe(a.config) if a.config else {}), **given,
                                                    **({"kd": given.get("kd", "stored")} if mode == "student" else {})},
                                                   mode)).run_name
    path = Path(given.get("output", FIELDS["output"].default)) / name / "config.yaml"
    if not path.exists():
        return None
    saved = yaml.safe_load(path.read_text()) or {}
    if given.get("mutual") and not saved.get("mutual"):  # no --mutual flag to name: say which command
        raise KdkitError(f"{path.parent}: this run was not trained with `kdkit train mutual`; resume it with the "
                         "command that started it (`kdkit train student|teacher ... --resume`)")
    changed = sorted(k for k, v in given.items() if k not in RESUME_MAY_CHANGE and saved.get(k) != options.plain(v))
    if changed:
        flags = ", ".join(f"--{k.replace('_', '-')} {shlex.quote(str(given[k]))} (the run has {saved.get(k)!r})"
                          for k in changed)
        raise KdkitError(f"{path.parent}: resuming continues the run as it started; these flags would make it "
                         f"another run: {flags}. Leave them out, or start a new run (--name) from its weights "
                         "(--finetune)")
    return make_config({**{k: v for k, v in saved.items() if k in FIELDS}, **given})


def resume_command(cfg: TrainConfig, mode: str) -> str:
    """The command that continues this run (its saved config supplies every other option)."""
    import shlex

    args = ["kdkit", "train", mode, cfg.data, "--name", cfg.run_name, "--output", cfg.output, "--resume"]
    return shlex.join(str(x) for x in args)


def _run(mode: str):
    def run(a: argparse.Namespace) -> int:
        from kdkit.errors import Interrupted
        from kdkit.train.loop import fit

        cfg = config_from_args(a, mode)
        try:
            fit(cfg)
        except KeyboardInterrupt:
            last = cfg.run_dir / "last.pth"
            if not last.exists():  # stopped before the first checkpoint: there is nothing to resume
                raise Interrupted("kdkit train: interrupted before the first checkpoint; nothing was saved, run the "
                                  "same command again to start over") from None
            raise Interrupted(f"kdkit train: interrupted; {last} keeps the last checkpoint. "
                              f"Continue with: {resume_command(cfg, mode)}") from None
        return 0
    return run


def add_parser(sub) -> None:
    """`kdkit train` with its sub-commands `teacher`, `student` and `mutual`."""
    p = sub.add_parser("train", help="train a teacher, or distill a student, on a shard set",
                       formatter_class=HelpFormatter,
                       description="Train on a kdkit shard set through the DALI loader.\n\n"
                                   + __doc__.split("\n\n")[1])
    s = p.add_subparsers(dest="train_mode", required=True, metavar="MODE", parser_class=options.Parser)
    for mode, kd_default, text in (
            ("teacher", None, "train a model on the labels alone (no distillation): the teacher for a later "
                              "teacher pass, or any plain classifier"),
            ("student", "stored", "distill a student from the teacher logits stored in the shards "
                                  "(--kd stored / replay) or from a teacher run alongside (--kd online)"),
            ("mutual", "none", "deep mutual learning: train --model and a peer (--peer-model, optionally with "
                               "--peer-am-softmax) together, each on the labels and the other's predictions at "
                               "--kd-temperature, weighted by --kd-alpha (with --kd stored / replay / online: on "
                               "the mean of the teacher's and the other's); the peer is saved as peer_best.pth / "
                               "peer_last.pth in the run folder")):
        q = s.add_parser(mode, help=text.split(":")[0] if mode == "mutual" else text,
                         description=text + ". Recipe values fill the defaults; every "
                         "flag overrides them; the resolved config is saved as runs/NAME/config.yaml.",
                         formatter_class=HelpFormatter)
        add_train_arguments(q, mode, kd_default)
        q.set_defaults(func=_run(mode))


def add_lr_find_parser(sub) -> None:
    """`kdkit lr-find`: the LR range test with the same options as `kdkit train`."""
    p = sub.add_parser("lr-find", help="LR range test: plot training loss against an exponentially growing LR",
                       formatter_class=HelpFormatter,
                       description="Train from the run's initial state with the LR growing exponentially from "
                                   "--start-lr to --end-lr, one update per batch, with the same step and loss as "
                                   "`kdkit train`; stop when the smoothed loss diverges. Writes lr_find.png and "
                                   "lr_find.json into runs/NAME and prints the suggested LR.")
    add_train_arguments(p, "lr-find")
    g = p.add_argument_group("LR finder")
    g.add_argument("--start-lr", type=options.POSITIVE, default=1e-7, help="first LR (default: 1e-7)")
    g.add_argument("--end-lr", type=options.POSITIVE, default=10.0, help="last LR (default: 10)")
    g.add_argument("--num-steps", type=options.integer(5), default=100, help="optimizer updates, one batch each (default: 100)")
    g.add_argument("--diverge", type=options.number(1, above=True), default=4.0,
                   help="stop when the smoothed loss exceeds this multiple of its minimum (default: 4)")

    def run(a: argparse.Namespace) -> int:
        from kdkit.train.lr_find import lr_find

        r = lr_find(config_from_args(a, "lr-find"), a.start_lr, a.end_lr, a.num_steps, diverge=a.diverge)
        print(f"suggested lr {r.suggested_lr:.3g} (steepest descent); loss minimum at {r.lr_at_min:.3g}; "
              f"plot: {r.png}")
        return 0

    p.set_defaults(func=run)


__all__ = ["add_parser", "add_lr_find_parser", "add_train_arguments", "config_from_args"]
