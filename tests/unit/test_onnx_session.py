"""The gateway's way of running a model: onnxruntime's C library through ctypes, with flat buffers in and out. It
must give what onnxruntime's own Python binding gives, and turn every refusal into an OnnxError with the reason."""

from __future__ import annotations

import random
from array import array
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from gateway.filters.onnx_session import OnnxError, Tensor, library_path, open_session
from tests.servers import REPO

ANOMALY = REPO / "models" / "anomaly" / "anomaly.onnx"


def identity_model(path: Path, elem_type: int) -> Path:
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity",
                              [helper.make_tensor_value_info("x", elem_type, [None, 2])],
                              [helper.make_tensor_value_info("y", elem_type, [None, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.helper.set_model_props(model, {"name": "identity", "version": "1"})
    onnx.save(model, path)
    return path


def test_the_library_is_the_one_the_onnxruntime_wheel_ships():
    path = library_path()
    assert path is not None and Path(path).name.startswith("libonnxruntime.so")
    assert Path(path).parent == Path(ort.__file__).parent / "capi"


def test_a_run_gives_what_onnxruntime_s_python_binding_gives():
    session, meta = open_session(ANOMALY)
    assert session.inputs == ["features"] and session.outputs == ["probabilities"]
    assert meta["name"] == "sensor-anomaly" and meta == dict(ort.InferenceSession(
        str(ANOMALY), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map)
    rng = random.Random(1)
    rows = 37
    x = array("f", [rng.gauss(0, 3) for _ in range(rows * 19)])
    out = session.run(["probabilities"], {"features": Tensor(x, (rows, 19))})[0]
    expected = ort.InferenceSession(str(ANOMALY), providers=["CPUExecutionProvider"]).run(
        ["probabilities"], {"features": np.frombuffer(x, dtype=np.float32).reshape(rows, 19)})[0]
    assert out.shape == expected.shape
    np.testing.assert_array_equal(np.frombuffer(out.data, dtype=np.float32).reshape(out.shape), expected)


def test_int64_tensors_go_in_and_come_out(tmp_path):
    session, meta = open_session(identity_model(tmp_path / "i.onnx", TensorProto.INT64))
    assert meta == {"name": "identity", "version": "1"}
    values = array("q", [1, -2, 3, 2**40])
    (out,) = session.run(["y"], {"x": Tensor(values, (2, 2))})
    assert out == Tensor(values, (2, 2))
    (empty,) = session.run(["y"], {"x": Tensor(array("q"), (0, 2))})
    assert empty == Tensor(array("q"), (0, 2))


def test_a_file_that_is_not_a_model_is_refused_with_onnxruntime_s_reason(tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("not a model")
    with pytest.raises(OnnxError, match="(?i)protobuf"):
        open_session(bad)
    with pytest.raises(OnnxError):
        open_session(tmp_path / "missing.onnx")


def test_a_run_with_a_wrong_input_is_refused_with_the_reason_and_the_session_still_runs():
    session, _ = open_session(ANOMALY)
    with pytest.raises(OnnxError, match="nosuch"):
        session.run(["probabilities"], {"nosuch": Tensor(array("f", [0.0] * 19), (1, 19))})
    with pytest.raises(OnnxError, match="(?i)dimension|shape"):
        session.run(["probabilities"], {"features": Tensor(array("f", [0.0] * 18), (1, 18))})
    (ok,) = session.run(["probabilities"], {"features": Tensor(array("f", [0.0] * 19), (1, 19))})
    assert ok.shape == (1, 6)


def test_tensors_of_a_type_the_gateway_does_not_use_are_refused_with_the_reason(tmp_path):
    graph = helper.make_graph([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.DOUBLE)], "cast",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [None, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "cast.onnx")
    session, _ = open_session(tmp_path / "cast.onnx")
    with pytest.raises(OnnxError, match="element type 11"):  # ONNX's DOUBLE
        session.run(["y"], {"x": Tensor(array("f", [1.0, 2.0]), (1, 2))})
    with pytest.raises(OnnxError, match="float32"):
        session.run(["y"], {"x": Tensor(array("d", [1.0, 2.0]), (1, 2))})
