"""`kdkit train`: the knowledge-distillation trainer (teacher and student), its recipes and LR finder.

    from kdkit.train import TrainConfig, fit, make_config
    fit(make_config({"data": "shards/food", "model": "resnet50", "kd": "stored"}, recipe="bag-of-tricks"))

Modules: config (every option, recipes), kd (the KD modes: how a batch gets its teacher targets),
data (shard checks, the run's DALI loaders: one train loader per run), model (build, fine-tune,
AM-softmax head, freezing), losses (the criterion), mix, mutual (two students), optim (timm
factories + SAM), build (the Trainer: students, KD mode, loaders, position), loop (the training
step and epoch), state (checkpoint / resume), runs (run folder), lr_find, cli; devices and DDP
under torchrun come from kdkit.runtime.
Heavy imports (torch, DALI, timm) happen in the modules, not here.
"""
from kdkit.train.config import TrainConfig, list_recipes, load_recipe, make_config


def fit(cfg: TrainConfig) -> list[dict]:
    from kdkit.train.loop import fit as _fit

    return _fit(cfg)


def lr_find(cfg: TrainConfig, **kwargs):
    from kdkit.train.lr_find import lr_find as _lr_find

    return _lr_find(cfg, **kwargs)


__all__ = ["TrainConfig", "fit", "lr_find", "list_recipes", "load_recipe", "make_config"]
