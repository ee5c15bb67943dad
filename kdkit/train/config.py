"""TrainConfig: every option of `kdkit train`, its recipe files, and the resolved config of a run.

One dataclass is the single source of truth: the CLI builds its flags from the fields (name,
type, default, help and argument group come from here), recipes are YAML files whose keys are
field names, and the resolved config is written back as YAML into the run folder. Precedence,
as in timm's train.py: dataclass default < recipe (-c/--config) < command-line flag.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kdkit.errors import KdkitError, OptionError

RECIPE_DIR = Path(__file__).parent / "recipes"
KD_MODES = ("none", "stored", "replay", "online")
TOPK_TARGETS = ("renormalize", "marginal")  # how top-k teacher outputs become targets (losses.dense_logits_from_topk)


def _f(default, help: str, group: str, **kw):
    """A config field with its CLI help text and argument group."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, "group": group, **kw})
    return field(default=default, metadata={"help": help, "group": group, **kw})


D, M, K, R, O, S, E, P, N = ("Dataset parameters", "Model parameters", "Distillation parameters",
                             "Augmentation and regularization parameters", "Optimizer parameters",
                             "Learning rate schedule parameters", "Model EMA parameters",
                             "Device and performance parameters", "Run parameters")


@dataclass
class TrainConfig:
    # --- data (DALI loader over a kdkit shard set) ----------------------------------------
    data: str = _f("", "dataset root (holding train/ and val/ shard sets) or a train shard-set folder", D)
    train_split: str = _f("train", "split to train on", D)
    val_split: str | None = _f("val", "split to evaluate on each epoch ('' or none: no evaluation)", D)
    val_data: str | None = _f(None, "dataset root or shard-set folder to evaluate on (default: DATA's "
                              "--val-split); e.g. the plain set, when only train has teacher logits", D)
    num_classes: int | None = _f(None, "number of classes (default: from the shard manifest)", D)
    image_size: int = _f(224, "training and evaluation resolution (square)", D)
    eval_crop_ratio: float = _f(0.875, "evaluation centre crop: image_size / resized shorter side", D)
    batch_size: int = _f(64, "batch size per process (rank)", D)
    loader_threads: int = _f(4, "DALI worker threads per process", D)
    loader_device: str = _f("auto", "DALI backend: cpu, gpu, or auto (gpu where training runs on CUDA)", D,
                             choices=("auto", "cpu", "gpu"))
    shuffle_buffer: int = _f(4096, "DALI shuffle buffer (samples); more = better mixed batches, more memory", D)
    random_area: list = _f([0.08, 1.0], "random-resized-crop area range", R, nargs=2, item=float)
    flip: bool = _f(True, "random horizontal flip", R)
    antialias: bool = _f(True, "antialiased resize of the crops, as Pillow and torchvision do; --no-antialias "
                               "lets shrunk crops alias", R)
    fast_idct: bool = _f(False, "decode JPEGs with libjpeg-turbo's fast IDCT (CPU decoder; ~1 grey level off)", P)
    color_jitter: float = _f(0.0, "brightness/contrast/saturation jitter strength (0 = off)", R)
    hue: float = _f(0.0, "hue jitter: uniform in [-H, H] of the hue circle, 0..0.5 (0 = off; DALI's YIQ hue)", R)
    rotate: float = _f(0.0, "random rotation in [-DEG, DEG] degrees of the resized crop, 0..180 (0 = off)", R)
    rotate_fill: float | None = _f(None, "grey level 0..255 of the corners a rotation uncovers (none: the mean "
                                         "colour)", R)
    auto_augment: str | None = _f(None, "autoaugment, randaugment or trivialaugment (DALI auto_aug)", R)
    randaugment_n: int = _f(2, "RandAugment: operations per image", R)
    randaugment_m: int = _f(9, "RandAugment: magnitude", R)
    augmix: bool = _f(False, "AugMix (timm's augment_and_mix, built from DALI's auto_aug operations)", R)
    augmix_severity: int = _f(3, "AugMix: magnitude of its operations, 1..10", R)
    augmix_width: int = _f(3, "AugMix: augmentation chains mixed", R)
    augmix_depth: int = _f(-1, "AugMix: operations per chain, 1..3, or -1 to draw 1..3 per chain", R)
    augmix_alpha: float = _f(1.0, "AugMix: Dirichlet / Beta parameter of the mixing weights", R)
    augmix_jsd: bool = _f(False, "AugMix's Jensen-Shannon consistency loss (timm's JsdCrossEntropy) over the clean "
                                 "and two AugMix views of each sample; needs --augmix", R)
    # --- model ------------------------------------------------------------------------------
    model: str = _f("resnet50", "timm or kdkit model name (kdkit models lists kdkit's variants)", M)
    model_kwargs: dict = _f({}, "extra create_model kwargs, KEY=VALUE (e.g. drop_rate=0.2 zero_init_last=true)", M)
    drop_rate: float | None = _f(None, "dropout rate before the classifier (timm's drop_rate; the Keras seed's "
                                       "--dropout_rate; default: the model's own)", M)
    am_softmax: bool = _f(False, "AM-softmax head: cosine logits with an additive margin", M)
    am_margin: float = _f(0.35, "AM-softmax margin m", M)
    am_scale: float = _f(30.0, "AM-softmax scale s", M)
    finetune: str | None = _f(None, "checkpoint to fine-tune from: backbone loaded, classifier re-initialised", M)
    freeze_epochs: int = _f(0, "fine-tuning: train only the new head for this many epochs", M)
    sync_bn: bool = _f(False, "synchronized BatchNorm across ranks (DDP)", M)
    # --- mutual learning (`kdkit train mutual`) ----------------------------------------------
    mutual: bool = _f(False, "train two students together, each also on the other's predictions (set by "
                             "`kdkit train mutual`)", K)
    peer_model: str | None = _f(None, "mutual learning: the second student's model (default: --model); "
                                 "--model-kwargs and --drop-rate apply to both", K)
    peer_am_softmax: bool = _f(False, "mutual learning: the second student gets the AM-softmax head "
                                      "(--am-margin, --am-scale)", K)
    # --- distillation -------------------------------------------------------------------------
    kd: str = _f("none", "teacher signal: none, stored (logits in the shards), replay (stored multi-view "
                          "logits, student sees the same view), online (run the teacher each step)", K,
                  choices=KD_MODES)
    views_per_load: int = _f(1, "--kd replay: stored views cut from each decoded image (FKD's reuse of one decode); "
                                "a step trains on batch-size x N images, each with its own view's logits. Views per "
                                "load: a random offset o, then o..o+N-1 mod K, so distinct while N <= K (N > K is "
                                "refused) and the same after --resume. --lr is the rate of that B x N step (scale it "
                                "as for batch B x N); mixup/cutmix mix within the B x N images", K)
    topk_target: str = _f("renormalize", "top-k teacher outputs: how the student's target is rebuilt. renormalize: "
                          "the teacher's distribution over its k stored classes, 0 elsewhere; marginal: FKD's "
                          "marginal smoothing, the k classes keep the teacher's probabilities and the mass left "
                          "is spread evenly over the other classes (needs top-k written as log-probabilities, "
                          "as add-teacher-logits --topk does). Full logits: unused", K, choices=TOPK_TARGETS)
    kd_temperature: float = _f(4.0, "KD temperature T", K)
    kd_alpha: float = _f(0.9, "weight of the KD term; the hard-label loss gets 1 - alpha", K)
    teacher_model: str | None = _f(None, "online KD: teacher model name (default: from the checkpoint)", K)
    teacher_checkpoint: str | None = _f(None, "online KD: teacher checkpoint (also checks class counts)", K)
    checkpoint_ema: bool = _f(True, "use the EMA weights of --teacher-checkpoint and --finetune where they have them "
                                    "(kdkit's one rule for every command that loads a checkpoint)", K)
    # --- regularization -----------------------------------------------------------------------
    label_smoothing: float = _f(0.0, "label smoothing of the hard-label loss", R)
    mixup: float = _f(0.0, "mixup alpha (0 = off)", R)
    cutmix: float = _f(0.0, "cutmix alpha (0 = off)", R)
    mix_prob: float = _f(1.0, "probability of mixing a batch when mixup or cutmix is on", R)
    mix_switch_prob: float = _f(0.5, "probability of cutmix instead of mixup when both are on", R)
    mix_off_epoch: int = _f(0, "stop mixing from this epoch on (0 = never)", R)
    # --- optimizer ----------------------------------------------------------------------------
    opt: str = _f("sgd", "timm optimizer: sgd (Nesterov), momentum, adamw, radam, lamb, lars, rmsprop (timm's "
                          "TF-style RMSpropTF), ...; prefix lookahead_ for Lookahead", O)
    opt_eps: float | None = _f(None, "optimizer epsilon (default: the optimizer's own; rmsprop: 1e-3, as timm's "
                                     "rmsproptf recipes)", O)
    lr: float = _f(0.1, "peak learning rate", O)
    momentum: float = _f(0.9, "SGD momentum / Adam beta1", O)
    weight_decay: float = _f(1e-4, "weight decay", O)
    bias_decay: bool = _f(False, "weight decay on biases and norm weights too (1-d parameters); off is the "
                                 "bag of tricks' no-bias-decay", O)
    sam_rho: float = _f(0.0, "SAM neighbourhood size rho (0 = off; two forward/backward passes per step)", O)
    sam_adaptive: bool = _f(False, "adaptive SAM (ASAM)", O)
    clip_grad: float | None = _f(None, "gradient clipping threshold (off by default)", O)
    clip_mode: str = _f("norm", "clipping by 'norm', 'value' or 'agc'", O, choices=("norm", "value", "agc"))
    grad_accum: int = _f(1, "micro-batches per optimizer step (gradient accumulation, Keras' iter_size)", O)
    # --- schedule -----------------------------------------------------------------------------
    sched: str = _f("cosine", "cosine, step, multistep, plateau (reduce on plateau of val top-1), linear and exp "
                              "(per epoch from --lr in the first epoch after warmup to --min-lr in the last), "
                              "constant, none", S,
                     choices=("cosine", "step", "multistep", "plateau", "linear", "exp", "constant", "none"))
    epochs: int = _f(90, "epochs of training (warmup included)", S)
    warmup_epochs: int = _f(0, "epochs of linear warmup from warmup_lr", S)
    warmup_lr: float = _f(1e-5, "learning rate at the start of warmup", S)
    min_lr: float = _f(0.0, "lower bound of cosine / plateau; the last epoch's LR of linear / exp", S)
    decay_epochs: float = _f(30, "step schedule: epochs between decays", S)
    decay_milestones: list = _f([30, 60, 80], "multistep schedule: epochs to decay at", S, nargs="+", item=int)
    decay_rate: float = _f(0.1, "step / multistep / plateau decay factor", S)
    patience_epochs: int = _f(5, "plateau: epochs without improvement before decaying", S)
    # --- EMA ----------------------------------------------------------------------------------
    ema: bool = _f(False, "keep an EMA of the weights, evaluated alongside the model", E)
    ema_decay: float = _f(0.9998, "EMA decay per optimizer update", E)
    ema_warmup: bool = _f(False, "EMA decay warmup (timm ModelEmaV3 use_warmup)", E)
    # --- device and performance -----------------------------------------------------------------
    device: str = _f("auto", "cpu, cuda, or auto", P, choices=("auto", "cpu", "cuda"))
    amp: str = _f("none", "mixed precision: none, bf16 or fp16 (fp16 with a grad scaler)", P,
                   choices=("none", "bf16", "fp16"))
    channels_last: bool = _f(False, "channels-last memory format (faster convolutions on GPU)", P)
    compile: bool = _f(False, "torch.compile the model", P)
    deterministic: bool = _f(False, "torch deterministic algorithms (slower; for exact reproduction on GPU)", P)
    # --- run ----------------------------------------------------------------------------------
    output: str = _f("runs", "folder holding the run folders", N)
    name: str | None = _f(None, "run folder name (default: <teacher|student>-<model>)", N)
    seed: int = _f(0, "seed of model init, data order, augmentation and mixing", N)
    resume: str | None = _f(None, "continue a run: 'last' (its last.pth) or a checkpoint path", N)
    trust_checkpoint: bool = _f(False, "load --finetune / --teacher-checkpoint / --resume files that hold pickled "
                                       "Python objects besides weights (that runs their code: only for files you "
                                       "trust); kdkit's own checkpoints never need it", N)
    checkpoint_every: int = _f(0, "also save last.pth every N optimizer updates inside an epoch (0 = per epoch)", N)
    eval_every: int = _f(1, "evaluate every N epochs (and after the last)", N)
    log_interval: int = _f(50, "micro-batches between progress updates and NaN checks", N)
    progress: bool = _f(True, "progress bar per epoch", N)
    tensorboard: bool = _f(False, "also log to TensorBoard (needs the tensorboard package)", N)
    recipe: str | None = _f(None, "recipe the defaults came from (set by -c/--config)", N)

    def __post_init__(self):
        if self.val_split in ("", "none", "None"):
            self.val_split = None
        check_values(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def run_name(self) -> str:
        kind = "mutual" if self.mutual else "teacher" if self.kd == "none" else "student"
        return self.name or f"{kind}-{self.model}"

    @property
    def run_dir(self) -> Path:
        return Path(self.output) / self.run_name


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
TYPES = typing.get_type_hints(TrainConfig)

# allowed ranges of the numeric options: (low, high, low excluded); None = unbounded on that side
LIMITS = {
    "num_classes": (1, None, False), "image_size": (8, None, False), "eval_crop_ratio": (0, 1, True),
    "batch_size": (1, None, False), "loader_threads": (1, None, False), "shuffle_buffer": (1, None, False),
    "random_area": (0, 1, True), "color_jitter": (0, None, False),
    "hue": (0, 0.5, False), "rotate": (0, 180, False), "rotate_fill": (0, 255, False),
    "augmix_severity": (1, 10, False), "augmix_width": (1, None, False), "augmix_depth": (-1, 3, False),
    "augmix_alpha": (0, None, True), "randaugment_n": (0, None, False),
    "randaugment_m": (0, 30, False), "am_margin": (0, None, False), "am_scale": (0, None, True),
    "freeze_epochs": (0, None, False), "kd_temperature": (0, None, True), "kd_alpha": (0, 1, False),
    "views_per_load": (1, None, False),
    "label_smoothing": (0, 0.999, False), "mixup": (0, None, False), "cutmix": (0, None, False),
    "mix_prob": (0, 1, False), "mix_switch_prob": (0, 1, False), "mix_off_epoch": (0, None, False),
    "lr": (0, None, True), "opt_eps": (0, None, True), "drop_rate": (0, 1, False), "momentum": (0, 1, False),
    "weight_decay": (0, None, False), "sam_rho": (0, None, False),
    "clip_grad": (0, None, True), "grad_accum": (1, None, False), "epochs": (1, None, False),
    "warmup_epochs": (0, None, False), "warmup_lr": (0, None, False), "min_lr": (0, None, False),
    "decay_epochs": (0, None, True), "decay_milestones": (0, None, False), "decay_rate": (0, None, True),
    "patience_epochs": (0, None, False), "ema_decay": (0, 1, False), "seed": (0, None, False),
    "checkpoint_every": (0, None, False), "eval_every": (1, None, False), "log_interval": (1, None, False),
}


def _kind(hint) -> tuple[type, bool]:
    """(base type, None allowed) of a field's annotation."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    base = args[0] if optional and args else (typing.get_origin(hint) or hint)
    return (typing.get_origin(base) or base), optional


def _check_number(name: str, value, kind: type):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise OptionError(f"{name}={value!r}: expected {'an integer' if kind is int else 'a number'}")
    low, high, above = LIMITS.get(name, (None, None, False))
    if (low is not None and (value <= low if above else value < low)) or (high is not None and value > high):
        what = "an integer" if kind is int else "a number"
        span = (f"{low} {'<' if above else '<='} {name} <= {high}" if low is not None and high is not None
                else f"{'>' if above else '>='} {low}" if low is not None else f"<= {high}")
        raise OptionError(f"{name}={value!r}: expected {what} {span}")
    return float(value) if kind is float else value


def check_values(cfg: TrainConfig) -> None:
    """Every field against its type and range (recipes, flags and Python callers alike): an OptionError
    naming the option, before anything runs. Numbers given where lists of numbers are due are refused."""
    for name, f in FIELDS.items():
        value = getattr(cfg, name)
        kind, optional = _kind(TYPES[name])
        if value is None and optional:
            continue
        if kind in (int, float):
            setattr(cfg, name, _check_number(name, value, kind))
        elif kind is bool:
            if not isinstance(value, bool):
                raise OptionError(f"{name}={value!r}: expected true or false")
        elif kind is str:
            if not isinstance(value, str):
                raise OptionError(f"{name}={value!r}: expected a string")
            if "choices" in f.metadata and value not in f.metadata["choices"]:
                raise OptionError(f"{name}={value!r}: expected one of {', '.join(f.metadata['choices'])}")
        elif kind is list:
            n = f.metadata.get("nargs")
            if not isinstance(value, (list, tuple)) or (isinstance(n, int) and len(value) != n):
                raise OptionError(f"{name}={value!r}: expected a list of "
                                  + (f"{n} numbers" if isinstance(n, int) else "numbers"))
            setattr(cfg, name, [_check_number(name, v, f.metadata["item"]) for v in value])
        elif kind is dict and not isinstance(value, dict):
            raise OptionError(f"{name}={value!r}: expected a mapping of KEY: VALUE")
    if cfg.random_area[0] > cfg.random_area[1]:
        raise OptionError(f"random_area={cfg.random_area}: expected (min, max) with min <= max")
    if cfg.sched in ("linear", "exp"):  # from --lr in the first epoch after warmup to --min-lr in the last
        if cfg.epochs - cfg.warmup_epochs < 2:
            raise OptionError(f"sched={cfg.sched}: decays over the epochs after warmup, expected epochs >= "
                              f"warmup_epochs + 2 (got epochs={cfg.epochs}, warmup_epochs={cfg.warmup_epochs})")
        if cfg.min_lr > cfg.lr or (cfg.sched == "exp" and cfg.min_lr == 0):
            raise OptionError(f"min_lr={cfg.min_lr}: sched={cfg.sched} decays from lr={cfg.lr} to min_lr, expected "
                              + ("0 < min_lr <= lr (an exponential never reaches 0)" if cfg.sched == "exp"
                                 else "min_lr <= lr"))
    if cfg.views_per_load > 1 and cfg.kd != "replay":
        raise OptionError(f"views_per_load={cfg.views_per_load}: several stored views per load need kd=replay "
                          f"(the run has kd={cfg.kd}); leave it at 1")
    check_augment_combinations(cfg)


def check_augment_combinations(cfg: TrainConfig) -> None:
    """Augmentation options that cannot go together, each refused with what to do instead."""
    if cfg.augmix_depth == 0:
        raise OptionError("augmix_depth=0: expected 1, 2, 3, or -1 (drawn from 1..3 per chain)")
    if cfg.rotate and cfg.kd == "replay":
        raise OptionError("rotate: --kd replay feeds the stored teacher views, which record crop box and flip but no "
                          "rotation angle; a rotated view is not what the teacher saw. Use --kd stored, or --rotate 0")
    if cfg.augmix and cfg.auto_augment:
        raise OptionError(f"augmix: one augmentation policy at a time; drop --auto-augment {cfg.auto_augment} "
                          "or --augmix")
    if cfg.augmix_jsd and not cfg.augmix:
        raise OptionError("augmix_jsd: the Jensen-Shannon loss compares AugMix views; add --augmix")
    if cfg.augmix_jsd and cfg.kd != "none":
        raise OptionError(f"augmix_jsd: the JSD loss trains on the labels (timm's JsdCrossEntropy), not on a teacher; "
                          f"use --kd none, or --augmix without --augmix-jsd for --kd {cfg.kd}")
    if cfg.augmix_jsd and (cfg.mixup or cfg.cutmix):
        raise OptionError("augmix_jsd: mixup/cutmix would mix the three views of a sample with other samples (timm "
                          "refuses mixing with augmentation splits too); set --mixup 0 --cutmix 0")
    if cfg.augmix_jsd and cfg.mutual:
        raise OptionError("augmix_jsd: mutual learning trains each student on its peer's predictions, not on the "
                          "JSD over AugMix views; use --augmix without --augmix-jsd")
    if cfg.augmix_jsd and cfg.am_softmax:
        raise OptionError("augmix_jsd: timm's JsdCrossEntropy has no AM-softmax margin; drop --am-softmax")


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
    Path(path).write_text(yaml.safe_dump(d, sort_keys=False))


def config_diff(old: dict, new: TrainConfig) -> dict:
    """{key: (old, new)} where a resumed run's options differ from the saved config."""
    now = new.to_dict()
    return {k: (old.get(k), now[k]) for k in now if k not in ("resume",) and k in old and old[k] != now[k]}
