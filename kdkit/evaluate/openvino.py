"""OpenVINO IRs as kdkit writes them (`kdkit export --format openvino`, kdkit.evaluate.deploy), run
on the CPU like the PyTorch model: what `kdkit predict model.xml` and the export's own checks call.
openvino (and nncf, for int8) are the optional `deploy` extra (pip install -e ".[deploy]").
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from kdkit.errors import KdkitError
from kdkit.evaluate.ensemble import denormalize_uint8
from kdkit.models.checkpoint import ModelInfo

SPEC, REPORT, IR, IR_INT8 = "input.json", "report.json", "model.xml", "model_int8.xml"
RT_KEY = ["kdkit", "spec"]  # where the input spec lives in an IR's rt_info


def no_telemetry_without_consent() -> None:
    """OpenVINO's converter and NNCF send usage data (Google Analytics) from the machine they run on
    unless a consent file declines it (openvino_telemetry); kdkit sends nothing its user did not agree
    to, so here no consent file reads as declined. A user who opted in (`opt_in_out --opt_in`) still
    sends. openvino_telemetry has no setting for this (only CI variables), hence the wrapper."""
    try:
        from openvino_telemetry.utils import opt_in_checker as oc
    except ImportError:  # without it both libraries use their no-op stub
        return
    check = oc.OptInChecker.check
    if getattr(check, "kdkit", False):
        return

    def declined_without_a_file(self, *args, **kwargs):
        result = check(self, *args, **kwargs)
        return oc.ConsentCheckResult.DECLINED if result == oc.ConsentCheckResult.NO_FILE else result

    declined_without_a_file.kdkit = True
    oc.OptInChecker.check = declined_without_a_file


def require(*modules: str):
    """Import the deploy extra's packages, or one line saying how to install them."""
    import importlib

    no_telemetry_without_consent()  # before nncf's import: it starts its telemetry on import
    try:
        return [importlib.import_module(m) for m in modules]
    except ImportError as e:
        raise KdkitError(f"OpenVINO export needs the deploy extra ({e.name} is not installed): "
                         "pip install -e \".[deploy]\" (or pip install \"kdkit[deploy]\")") from None


class OpenVINOModel:
    """A compiled IR on the CPU, called like the PyTorch model: normalised float (N, 3, S, S) in,
    logits out (uint8 NHWC is made for an IR with the preprocessing inside). fp32 inference
    precision: OpenVINO would otherwise run bf16 on CPUs that have it."""

    def __init__(self, path: Path, threads: int | None = None):
        ov, = require("openvino")
        core = ov.Core()
        self.path = Path(path)
        model = core.read_model(str(path))
        if not model.has_rt_info(RT_KEY):
            raise KdkitError(f"{path}: an OpenVINO IR without kdkit's input spec; export it with `kdkit export "
                             "--format openvino`")
        self.spec = json.loads(model.get_rt_info(RT_KEY).astype(str))
        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.request = core.compile_model(model, "CPU", config).create_infer_request()
        self.uint8 = self.spec["preprocessing_in_model"]
        self.model_info = ModelInfo(**dict(self.spec["model"], source=str(self.path), classes=self.spec["classes"]))

    def feed(self, images: torch.Tensor) -> np.ndarray:
        """The IR's input for normalised float views."""
        return denormalize_uint8(images.cpu(), self.model_info).numpy() if self.uint8 else images.cpu().numpy()

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.request.infer({0: x})[0].copy()  # the request reuses its output buffer

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.run(self.feed(images)))


def ir_path(path: Path) -> Path:
    """model.xml for an export folder, the file itself for an .xml."""
    path = Path(path)
    return path / IR if path.is_dir() else path


def is_ir(path: Path) -> bool:
    path = Path(path)
    return path.suffix == ".xml" or (path.is_dir() and (path / IR).exists())


def load_ir(path: Path, threads: int | None = None) -> tuple[OpenVINOModel, ModelInfo]:
    """(callable model, ModelInfo) of an IR written by `kdkit export --format openvino`."""
    path = ir_path(path)
    if not path.exists():
        raise KdkitError(f"{path}: does not exist")
    m = OpenVINOModel(path, threads)
    return m, m.model_info
