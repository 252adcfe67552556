"""The one way the gateway opens an ONNX model: CPU only, sequential, a small thread budget, no memory arena."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnxruntime as ort


def open_session(model_path: str | Path, intra_op_threads: int = 1) -> tuple[Any, dict[str, str]]:
    """The inference session and the model's metadata (name, version, thresholds, ... as the training script
    recorded them)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # onnxruntime's CPU arena keeps tens of MB per session for a model this small (measured: 44 MB with the
    # arena, 8 MB without, same speed); on a Raspberry Pi that memory matters more.
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    return session, dict(session.get_modelmeta().custom_metadata_map)
