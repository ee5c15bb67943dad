"""TrainConfig: every option of `kdkit train`, its recipe files, and the resolved config of a run.

One frozen dataclass is the single source of truth: each option is one field declared with
kdkit.options.option (type, default, range, help, argument group), or inherited from the DALI
roles' declarations (pipelines.options: the crop, flip and augmentation options, the stored views)
or taken from them under this config's name (same_as). The CLI builds its flags from the fields
(kdkit.options.add_options), recipes are YAML files whose keys are field names, every value is
checked by kdkit.options.check_options whichever way it came, and the resolved config is written
back as YAML into the run folder. Precedence, as in timm's train.py: dataclass default < recipe
(-c/--config) < command-line flag.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from pathlib import Path

import yaml

from kdkit.errors import KdkitError, OptionError
from kdkit.options import (AUGMENT, DATA, DEVICE, EMA, KD, MODEL, OPTIMIZER, RUN, SCHEDULE, as_dict, check_options,
                           option, option_fields, same_as)
from kdkit.pipelines.options import Augment, Backend, CenterCrop, Output, RandomCrop, Reading, StoredViews

RECIPE_DIR = Path(__file__).parent / "recipes"
KD_MODES = ("none", "stored", "replay", "online")  # kdkit.train.kd.KD_MODES: the objects they name
KD_LOSSES = ("kl", "kl-ls", "dkd", "dkd-ls")  # kdkit.train.losses.KD_LOSSES: the KD terms they name
TOPK_TARGETS = ("renormalize", "marginal")  # how top-k teacher outputs become targets (kd.dense_logits_from_topk)
SCHEDULES = ("cosine", "step", "multistep", "plateau", "linear", "exp", "constant", "none")


@dataclass(frozen=True)
class TrainConfig(Augment, RandomCrop, StoredViews):
    # --- data (DALI loader over a kdkit shard set) ----------------------------------------
    data: str = option("", "dataset root (holding train/ and val/ shard sets) or a train shard-set folder", DATA)
    train_split: str = option("train", "split to train on", DATA)
    val_split: str | None = option("val", "split to evaluate on each epoch ('' or none: no evaluation)", DATA,
                                   none=True)
    val_data: str | None = option(None, "dataset root or shard-set folder to evaluate on (default: DATA's "
                                        "--val-split); e.g. the plain set, when only train has teacher logits", DATA)
    num_classes: int | None = option(None, "number of classes (default: from the shard manifest)", DATA, low=1)
    image_size: int = same_as(Output, "image_size")
    eval_crop_ratio: float = same_as(CenterCrop, "crop_ratio", group=DATA,
                                     help="evaluation centre crop: image_size / resized shorter side")
    batch_size: int = same_as(Reading, "batch_size")
    loader_threads: int | None = same_as(Backend, "num_threads")
    loader_device: str = option("auto", "DALI backend: cpu, gpu, or auto (gpu where training runs on CUDA)", DATA,
                                choices=("auto", "cpu", "gpu"))
    shuffle_buffer: int = same_as(Reading, "shuffle_buffer")
    antialias: bool = same_as(Output, "antialias")
    fast_idct: bool = same_as(Backend, "fast_idct")
    hw_decoder_load: float | None = same_as(Backend, "hw_decoder_load")
    preallocate_width_hint: int | None = same_as(Backend, "preallocate_width_hint")
    preallocate_height_hint: int | None = same_as(Backend, "preallocate_height_hint")
    # --- model ------------------------------------------------------------------------------
    model: str = option("resnet50", "timm or kdkit model name (kdkit models lists kdkit's variants)", MODEL)
    model_kwargs: dict = option({}, "extra create_model kwargs, KEY=VALUE (e.g. drop_rate=0.2 zero_init_last=true)",
                                MODEL)
    drop_rate: float | None = option(None, "dropout rate before the classifier (timm's drop_rate; the Keras seed's "
                                           "--dropout_rate; default: the model's own)", MODEL, low=0, high=1)
    am_softmax: bool = option(False, "AM-softmax head: cosine logits with an additive margin", MODEL)
    am_margin: float = option(0.35, "AM-softmax margin m", MODEL, low=0)
    am_scale: float = option(30.0, "AM-softmax scale s", MODEL, low=0, above=True)
    finetune: str | None = option(None, "checkpoint to fine-tune from: backbone loaded, classifier re-initialised",
                                  MODEL)
    freeze_epochs: int = option(0, "fine-tuning: train only the new head for this many epochs", MODEL, low=0)
    sync_bn: bool = option(False, "synchronized BatchNorm across ranks (DDP)", MODEL)
    # --- mutual learning (`kdkit train mutual`) ----------------------------------------------
    mutual: bool = option(False, "train two students together, each also on the other's predictions (set by "
                                 "`kdkit train mutual`)", KD)
    peer_model: str | None = option(None, "mutual learning: the second student's model (default: --model); "
                                          "--model-kwargs and --drop-rate apply to both", KD)
    peer_am_softmax: bool = option(False, "mutual learning: the second student gets the AM-softmax head "
                                          "(--am-margin, --am-scale)", KD)
    # --- distillation -------------------------------------------------------------------------
    kd: str = option("none", "how a batch gets its teacher targets: none, stored (logits in the shards), replay "
                             "(stored multi-view logits, the student sees the same view), online (run the teacher "
                             "each step)", KD, choices=KD_MODES)
    topk_target: str = option("renormalize", "top-k teacher outputs: how the student's target is rebuilt. "
                              "renormalize: the teacher's distribution over its k stored classes, 0 elsewhere; "
                              "marginal: FKD's marginal smoothing, the k classes keep the teacher's probabilities and "
                              "the mass left is spread evenly over the other classes (needs top-k written as "
                              "log-probabilities, as add-teacher-logits --topk does). Full logits: unused", KD,
                              choices=TOPK_TARGETS)
    kd_loss: str = option("kl", "the KD term: kl (Hinton et al.), dkd (decoupled KD, Zhao et al. 2022: target class "
                                "and non-target classes weighted apart), kl-ls / dkd-ls (the same on standardized, "
                                "z-scored logits, Sun et al. 2024; T is then their base temperature)", KD,
                          choices=KD_LOSSES)
    kd_temperature: float = option(4.0, "KD temperature T", KD, low=0, above=True)
    kd_alpha: float = option(0.9, "weight of the KD term; the hard-label loss gets 1 - alpha", KD, low=0, high=1)
    kl_weight: float = option(1.0, "kl, kl-ls: weight of the KL term within alpha's share (the logit-standardization "
                                    "authors: KD 9 against CE 0.1, i.e. --kd-alpha 0.9 --kl-weight 10)", KD, low=0)
    dkd_alpha: float = option(1.0, "dkd: weight of TCKD, the target class against the rest", KD, low=0)
    dkd_beta: float = option(8.0, "dkd: weight of NCKD, the distribution over the non-target classes (the authors: "
                                  "8 on CIFAR-100, 0.5 on ImageNet)", KD, low=0)
    dkd_warmup: int = option(0, "dkd: epochs over which the DKD term ramps in linearly (the authors: 20 of 240 on "
                                "CIFAR-100; 0 = none)", KD, low=0)
    teacher_model: str | None = option(None, "online KD: teacher model name (default: from the checkpoint)", KD)
    teacher_checkpoint: str | None = option(None, "online KD: teacher checkpoint (also checks class counts)", KD)
    checkpoint_ema: bool = option(True, "use the EMA weights of --teacher-checkpoint and --finetune where they have "
                                        "them (kdkit's one rule for every command that loads a checkpoint)", KD)
    # --- regularization -----------------------------------------------------------------------
    label_smoothing: float = option(0.0, "label smoothing of the hard-label loss", AUGMENT, low=0, high=0.999)
    mixup: float = option(0.0, "mixup alpha (0 = off)", AUGMENT, low=0)
    cutmix: float = option(0.0, "cutmix alpha (0 = off)", AUGMENT, low=0)
    mix_prob: float = option(1.0, "probability of mixing a batch when mixup or cutmix is on", AUGMENT, low=0, high=1)
    mix_switch_prob: float = option(0.5, "probability of cutmix instead of mixup when both are on", AUGMENT, low=0,
                                    high=1)
    mix_off_epoch: int = option(0, "stop mixing from this epoch on (0 = never)", AUGMENT, low=0)
    # --- optimizer ----------------------------------------------------------------------------
    opt: str = option("sgd", "timm optimizer: sgd (Nesterov), momentum, adamw, radam, lamb, lars, rmsprop (timm's "
                             "TF-style RMSpropTF), ...; prefix lookahead_ for Lookahead", OPTIMIZER)
    opt_eps: float | None = option(None, "optimizer epsilon (default: the optimizer's own; rmsprop: 1e-3, as timm's "
                                         "rmsproptf recipes)", OPTIMIZER, low=0, above=True)
    lr: float = option(0.1, "peak learning rate", OPTIMIZER, low=0, above=True)
    momentum: float = option(0.9, "SGD momentum / Adam beta1", OPTIMIZER, low=0, high=1)
    weight_decay: float = option(1e-4, "weight decay", OPTIMIZER, low=0)
    bias_decay: bool = option(False, "weight decay on biases and norm weights too (1-d parameters); off is the "
                                     "bag of tricks' no-bias-decay", OPTIMIZER)
    sam_rho: float = option(0.0, "SAM neighbourhood size rho (0 = off; two forward/backward passes per step)",
                            OPTIMIZER, low=0)
    sam_adaptive: bool = option(False, "adaptive SAM (ASAM)", OPTIMIZER)
    clip_grad: float | None = option(None, "gradient clipping threshold (default: no clipping)", OPTIMIZER, low=0,
                                     above=True)
    clip_mode: str = option("norm", "clipping by 'norm', 'value' or 'agc'", OPTIMIZER, choices=("norm", "value", "agc"))
    grad_accum: int = option(1, "micro-batches per optimizer step (gradient accumulation, Keras' iter_size)",
                             OPTIMIZER, low=1)
    # --- schedule -----------------------------------------------------------------------------
    sched: str = option("cosine", "cosine, step, multistep, plateau (reduce on plateau of val top-1), linear and exp "
                                  "(per epoch from --lr in the first epoch after warmup to --min-lr in the last), "
                                  "constant, none", SCHEDULE, choices=SCHEDULES)
    epochs: int = option(90, "epochs of training (warmup included)", SCHEDULE, low=1)
    warmup_epochs: int = option(0, "epochs of linear warmup from warmup_lr", SCHEDULE, low=0)
    warmup_lr: float = option(1e-5, "learning rate at the start of warmup", SCHEDULE, low=0)
    min_lr: float = option(0.0, "lower bound of cosine / plateau; the last epoch's LR of linear / exp", SCHEDULE,
                           low=0)
    decay_epochs: float = option(30.0, "step schedule: epochs between decays", SCHEDULE, low=0, above=True)
    decay_milestones: tuple[int, ...] = option((30, 60, 80), "multistep schedule: epochs to decay at", SCHEDULE,
                                               low=0)
    decay_rate: float = option(0.1, "step / multistep / plateau decay factor", SCHEDULE, low=0, above=True)
    patience_epochs: int = option(5, "plateau: epochs without improvement before decaying", SCHEDULE, low=0)
    # --- EMA ----------------------------------------------------------------------------------
    ema: bool = option(False, "keep an EMA of the weights, evaluated alongside the model", EMA)
    ema_decay: float = option(0.9998, "EMA decay per optimizer update", EMA, low=0, high=1)
    ema_warmup: bool = option(False, "EMA decay warmup (timm ModelEmaV3 use_warmup)", EMA)
    # --- device and performance -----------------------------------------------------------------
    device: str = option("auto", "cpu, cuda, or auto", DEVICE, choices=("auto", "cpu", "cuda"))
    amp: str = option("auto", "mixed precision: none, bf16 or fp16 (fp16 with a grad scaler); auto: bf16 on a CUDA GPU "
                              "that has it (Ampere and newer), none on the CPU", DEVICE,
                      choices=("auto", "none", "bf16", "fp16"))
    channels_last: bool | None = option(None, "channels-last memory format, faster convolutions on GPU (default: on "
                                              "with CUDA, off on the CPU)", DEVICE)
    compile: bool = option(False, "torch.compile the model", DEVICE)
    deterministic: bool = option(False, "torch deterministic algorithms (slower; for exact reproduction on GPU)",
                                 DEVICE)
    # --- run ----------------------------------------------------------------------------------
    output: str = option("runs", "folder holding the run folders", RUN)
    name: str | None = option(None, "run folder name, taken as written (default: <teacher|student|mutual>-<model>, "
                                    "the `kdkit train` mode)", RUN)
    seed: int = option(0, "seed of model init, data order, augmentation and mixing", RUN, low=0)
    resume: str | None = option(None, "continue a run: 'last' (its last.pth) or a checkpoint path", RUN)
    trust_checkpoint: bool = option(False, "load --finetune / --teacher-checkpoint / --resume files that hold "
                                           "pickled Python objects besides weights (that runs their code: only for "
                                           "files you trust); kdkit's own checkpoints never need it", RUN)
    checkpoint_every: int = option(0, "also save last.pth every N optimizer updates inside an epoch (0 = per epoch)",
                                   RUN, low=0)
    eval_every: int = option(1, "evaluate every N epochs (and after the last)", RUN, low=1)
    log_interval: int = option(50, "micro-batches between progress updates and NaN checks", RUN, low=1)
    progress: bool = option(True, "progress bar per epoch", RUN)
    tensorboard: bool = option(False, "also log to TensorBoard (needs the tensorboard package)", RUN)
    recipe: str | None = option(None, "recipe the defaults came from (set by -c/--config)", RUN)

    def __post_init__(self):
        if self.val_split in ("", "none", "None"):
            object.__setattr__(self, "val_split", None)
        check_options(self)

    def refusals(self) -> list[tuple[bool, str]]:
        """The combinations no run can train: the augmentations' own, the KD mode's, and the trainer's."""
        from kdkit.train.kd import kd_mode
        from kdkit.train.losses import kd_loss_type

        decays = self.sched in ("linear", "exp")  # from --lr in the first epoch after warmup to --min-lr in the last
        jsd = "augmix_jsd=True: "
        return Augment.refusals(self) + kd_mode(self.kd).refusals(self) + kd_loss_type(self.kd_loss).refusals(self) + [
            (decays and self.epochs - self.warmup_epochs < 2,
             f"sched={self.sched}: decays over the epochs after warmup, expected epochs >= warmup_epochs + 2 "
             f"(got epochs={self.epochs}, warmup_epochs={self.warmup_epochs})"),
            (decays and (self.min_lr > self.lr or (self.sched == "exp" and self.min_lr == 0)),
             f"min_lr={self.min_lr}: sched={self.sched} decays from lr={self.lr} to min_lr, expected "
             + ("0 < min_lr <= lr (an exponential never reaches 0)" if self.sched == "exp" else "min_lr <= lr")),
            (self.augmix_jsd and bool(self.mixup or self.cutmix),
             jsd + "mixup/cutmix would mix the three views of a sample with other samples (timm refuses mixing "
                   "with augmentation splits too); set --mixup 0 --cutmix 0"),
            (self.augmix_jsd and self.mutual, jsd + "mutual learning trains each student on its peer's predictions, "
                                                    "not on the JSD over AugMix views; use --augmix without "
                                                    "--augmix-jsd"),
            (self.augmix_jsd and self.am_softmax, jsd + "timm's JsdCrossEntropy has no AM-softmax margin; drop "
                                                        "--am-softmax"),
            (not self.mutual and bool(self.peer_model or self.peer_am_softmax),
             f"peer_model={self.peer_model!r}, peer_am_softmax={self.peer_am_softmax}: these describe the second "
             "student of `kdkit train mutual`; leave them out of other trainings"),
            (self.mutual and self.sam_rho > 0, "kdkit train mutual: --sam-rho: SAM's second pass is not supported "
                                               "for two students"),
            (self.mutual and self.ema, "kdkit train mutual: --ema: EMA weights of the two students are not supported"),
            (self.mutual and bool(self.finetune), "kdkit train mutual: --finetune: loading one backbone into two "
                                                  "students is not supported"),
            (self.sam_rho > 0 and self.grad_accum > 1,
             "sam_rho: SAM perturbs the weights along the whole batch's gradient: use --grad-accum 1 with it"),
            (self.sam_rho > 0 and self.amp == "fp16", "sam_rho: SAM with fp16 loss scaling is not supported: use "
                                                      "--amp bf16"),
        ]

    def to_dict(self) -> dict:
        return as_dict(self)

    def on(self, rt) -> TrainConfig:
        """This config with the runtime's defaults (kdkit.runtime.Runtime.training_defaults) where it says
        auto (amp) or nothing (channels_last): what a run on that device trains with."""
        auto = {k: v for k, v in rt.training_defaults().items()
                if getattr(self, k) is None or getattr(self, k) == "auto"}
        return dataclasses.replace(self, **auto) if auto else self

    def auto_options(self) -> list[str]:
        """The options this config leaves to the device (see `on`)."""
        return [k for k in ("amp", "channels_last") if getattr(self, k) in (None, "auto")]

    @property
    def run_name(self) -> str:
        from kdkit.train.kd import kd_mode

        kind = "mutual" if self.mutual else "student" if kd_mode(self.kd).distills else "teacher"
        return self.name or f"{kind}-{self.model}"

    @property
    def run_dir(self) -> Path:
        return Path(self.output) / self.run_name


FIELDS = option_fields(TrainConfig)


def recipe_path(name_or_path: str) -> Path:
    """A recipe by file path, or by name from kdkit's bundled recipes (kdkit/train/recipes/NAME.yaml)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise KdkitError(f"recipe {p}: file does not exist")
        return p
    bundled = RECIPE_DIR / f"{name_or_path}.yaml"
    if not bundled.exists():
        raise KdkitError(f"unknown recipe {name_or_path!r}; bundled recipes: {', '.join(list_recipes())}")
    return bundled


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str) -> dict:
    """The recipe's settings as a dict of TrainConfig fields; an unknown key is an error naming it."""
    path = recipe_path(name_or_path)
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise KdkitError(f"recipe {path}: not valid YAML ({e})") from None
    if not isinstance(cfg, dict):
        raise KdkitError(f"recipe {path}: expected a mapping of option: value")
    check_keys(cfg, f"recipe {path}")
    cfg.setdefault("recipe", path.stem if path.parent == RECIPE_DIR else str(path))
    return cfg


def check_keys(d: dict, where: str) -> None:
    for key in d:
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            close = difflib.get_close_matches(name, FIELDS, n=3)
            raise KdkitError(f"{where}: unknown key {key!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")
                             + "; `kdkit train teacher --help` lists every option")


def make_config(overrides: dict | None = None, recipe: str | None = None) -> TrainConfig:
    """TrainConfig from defaults < recipe < overrides (the Python-side twin of the CLI). A value of the
    wrong type or out of range is an OptionError naming the key (and the recipe it came from)."""
    values = load_recipe(recipe) if recipe else {}
    overrides = {k.replace("-", "_"): v for k, v in (overrides or {}).items()}
    check_keys(overrides, "config")
    merged = {k.replace("-", "_"): v for k, v in {**values, **overrides}.items()}
    try:
        return TrainConfig(**merged)
    except OptionError as e:
        key = str(e).split("=", 1)[0]
        source = values.get("recipe") if key in values and key not in overrides else None
        raise OptionError(f"recipe {source}: {e}" if source else str(e)) from None


def save_config(cfg: TrainConfig, path: Path) -> None:
    """The resolved config (every field, after recipe and flags), loadable again with -c."""
    d = cfg.to_dict()
    d.pop("resume", None)  # a property of one invocation, not of the run
    from kdkit import atomic

    atomic.write_text(Path(path), yaml.safe_dump(d, sort_keys=False))


def config_diff(old: dict, new: TrainConfig) -> dict:
    """{key: (old, new)} where a resumed run's options differ from the saved config."""
    now = new.to_dict()
    return {k: (old.get(k), now[k]) for k in now if k not in ("resume",) and k in old and old[k] != now[k]}
