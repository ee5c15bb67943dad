"""Judging models: `kdkit eval` (accuracy, calibration, ensembles, test-time views, corruption
robustness / mCE), `kdkit predict` and `kdkit export` (ONNX + ONNX Runtime parity and throughput).

    from kdkit.evaluate import EvalConfig, evaluate
    report = evaluate(EvalConfig(checkpoints=["runs/r18/best.pt"], data="shards/imagenet"))

Names are imported on first use, so importing the package (the CLI does) does not pull in torch.
"""
from __future__ import annotations

import importlib

_WHERE = {
    "ensemble_probs": "ensemble",
    "EvalConfig": "eval", "evaluate": "eval", "format_report": "eval", "write_outputs": "eval",
    "classification_metrics": "metrics",
    "RobustnessConfig": "robustness", "Reference": "robustness", "mce_summary": "robustness",
    "load_reference": "robustness", "ALEXNET": "robustness",
    "corrupt": "corruptions", "CORRUPTION_NAMES": "corruptions",
    "write_corrupted": "corrupted_shards",
    "PredictConfig": "predict", "ExportConfig": "export", "export_onnx": "export",
}
# predict() and export() share their module's name, which Python binds on the package once the
# module is imported; import them from kdkit.evaluate.predict / kdkit.evaluate.export.
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'kdkit.evaluate' has no attribute {name!r}")
    module = importlib.import_module(f"kdkit.evaluate.{_WHERE[name]}")
    return getattr(module, "NAMES" if name == "CORRUPTION_NAMES" else name)
