"""The one way the gateway runs an ONNX model: onnxruntime's C API, CPU only, sequential, a small thread budget, no
memory arena.

The gateway calls the C library the onnxruntime wheel ships (`onnxruntime/capi/libonnxruntime.so.*`) through ctypes
rather than the wheel's Python binding, because the binding imports numpy and brings its own copy of the runtime:
together 16.7 MB resident that a Raspberry Pi pays for nothing (benchmarks/RESULTS.md). The C API is onnxruntime's
stable public interface: `OrtGetApiBase()->GetApi(version)` returns a table of functions whose order never changes
between releases (new ones are only appended), so the positions below hold for every release at or above
API_VERSION.

Tensors go in and come out as flat `array.array` buffers with a shape (`Tensor`): float32 ('f') and int64 ('q'), the
two types the gateway's models use.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import threading
from array import array
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

API_VERSION = 17  # onnxruntime 1.17, the oldest release the gateway supports (pyproject.toml)

# Positions in the OrtApi function table (include/onnxruntime/core/session/onnxruntime_c_api.h).
_GET_ERROR_MESSAGE = 2
_CREATE_ENV = 3
_CREATE_SESSION = 7
_RUN = 9
_CREATE_SESSION_OPTIONS = 10
_SET_EXECUTION_MODE = 13
_DISABLE_MEM_PATTERN = 17
_DISABLE_CPU_MEM_ARENA = 19
_SET_INTRA_OP_THREADS = 24
_SET_INTER_OP_THREADS = 25
_SESSION_GET_INPUT_COUNT = 30
_SESSION_GET_OUTPUT_COUNT = 31
_SESSION_GET_INPUT_NAME = 36
_SESSION_GET_OUTPUT_NAME = 37
_CREATE_TENSOR_WITH_DATA = 49
_GET_TENSOR_MUTABLE_DATA = 51
_GET_TENSOR_ELEMENT_TYPE = 60
_GET_DIMENSIONS_COUNT = 61
_GET_DIMENSIONS = 62
_GET_TENSOR_TYPE_AND_SHAPE = 65
_CREATE_CPU_MEMORY_INFO = 69
_ALLOCATOR_FREE = 76
_GET_ALLOCATOR = 78
_RELEASE_STATUS = 93
_RELEASE_SESSION = 95
_RELEASE_VALUE = 96
_RELEASE_TENSOR_TYPE_AND_SHAPE = 99
_RELEASE_SESSION_OPTIONS = 100
_SESSION_GET_MODEL_METADATA = 111
_METADATA_LOOKUP = 116
_RELEASE_MODEL_METADATA = 118
_METADATA_KEYS = 123

# Enum values from the same header.
_LOGGING_ERROR = 3
_SEQUENTIAL = 0
_DEVICE_ALLOCATOR = 0
_MEM_TYPE_DEFAULT = 0
_FLOAT, _INT64 = 1, 7
_TYPECODES = {_FLOAT: "f", _INT64: "q"}
_ELEMENT_TYPES = {"f": _FLOAT, "q": _INT64}

_P = ctypes.c_void_p
_PP = ctypes.POINTER(ctypes.c_void_p)
_I64P = ctypes.POINTER(ctypes.c_int64)
_STRINGS = ctypes.POINTER(ctypes.c_char_p)


class OnnxError(RuntimeError):
    """onnxruntime refused: a file that is not a model, a missing input, a wrong shape, ... (its own message)."""


class Tensor(NamedTuple):
    """A tensor as a flat buffer, row-major: `data` holds prod(shape) values."""

    data: array
    shape: tuple[int, ...]


def library_path() -> str | None:
    """The onnxruntime C library of the installed wheel (Linux: libonnxruntime.so.*), found without importing the
    package (which would import numpy); None when onnxruntime is not installed."""
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted(glob.glob(os.path.join(folder, "capi", "libonnxruntime.so*")))
        if found:
            return found[0]
    return None


class _Api:
    """The function table, and what lives as long as the process: its one OrtEnv (onnxruntime wants one per
    process), the description of plain CPU memory, onnxruntime's default allocator."""

    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path)

        class ApiBase(ctypes.Structure):
            _fields_ = [("GetApi", ctypes.CFUNCTYPE(_P, ctypes.c_uint32)),
                        ("GetVersionString", ctypes.CFUNCTYPE(ctypes.c_char_p))]

        lib.OrtGetApiBase.restype = ctypes.POINTER(ApiBase)
        base = lib.OrtGetApiBase().contents
        self.version = (base.GetVersionString() or b"?").decode()
        table = base.GetApi(API_VERSION)
        if not table:
            raise OnnxError(f"onnxruntime {self.version} does not offer C API version {API_VERSION}")
        self._table = ctypes.cast(table, ctypes.POINTER(_P))
        self._lib = lib  # keeps the library loaded as long as the table is used
        self.error_message = ctypes.CFUNCTYPE(ctypes.c_char_p, _P)(self._table[_GET_ERROR_MESSAGE])
        self.release_status = ctypes.CFUNCTYPE(None, _P)(self._table[_RELEASE_STATUS])
        self.release = {i: ctypes.CFUNCTYPE(None, _P)(self._table[i])
                        for i in (_RELEASE_SESSION, _RELEASE_VALUE, _RELEASE_TENSOR_TYPE_AND_SHAPE,
                                  _RELEASE_SESSION_OPTIONS, _RELEASE_MODEL_METADATA)}
        self._functions: dict[int, Any] = {}
        self.env = _P()
        self.call(_CREATE_ENV, (ctypes.c_int, ctypes.c_char_p, _PP), _LOGGING_ERROR, b"gateway", ctypes.byref(self.env))
        self.cpu = _P()  # where input tensors live: plain CPU memory the caller owns
        self.call(_CREATE_CPU_MEMORY_INFO, (ctypes.c_int, ctypes.c_int, _PP), _DEVICE_ALLOCATOR, _MEM_TYPE_DEFAULT,
                  ctypes.byref(self.cpu))
        self.allocator = _P()  # onnxruntime's default allocator: the strings it returns are freed with it
        self.call(_GET_ALLOCATOR, (_PP,), ctypes.byref(self.allocator))

    def function(self, index: int, argtypes: tuple[Any, ...]) -> Any:
        """Function `index` of the table, returning an OrtStatus (None for success); see `check`."""
        fn = self._functions.get(index)
        if fn is None:
            fn = self._functions[index] = ctypes.CFUNCTYPE(_P, *argtypes)(self._table[index])
        return fn

    def check(self, status: int | None) -> None:
        """A returned OrtStatus is an error: raised with its message."""
        if status:
            message = (self.error_message(status) or b"").decode("utf-8", "replace")
            self.release_status(status)
            raise OnnxError(message)

    def call(self, index: int, argtypes: tuple[Any, ...], *args: Any) -> None:
        self.check(self.function(index, argtypes)(*args))

    def free(self, pointer: Any) -> None:
        self.call(_ALLOCATOR_FREE, (_P, _P), self.allocator, pointer)

    def take_string(self, pointer: ctypes.c_char_p | _P) -> str:
        """A string onnxruntime allocated for us, copied, then freed."""
        value = ctypes.cast(pointer, ctypes.c_char_p).value or b""
        self.free(pointer)
        return value.decode("utf-8", "replace")


_api: _Api | None = None
_api_lock = threading.Lock()


def _the_api() -> _Api:
    global _api
    with _api_lock:
        if _api is None:
            path = library_path()
            if path is None:
                raise OnnxError("onnxruntime is not installed")
            _api = _Api(path)
        return _api


class Session:
    """One model, loaded. `run` is not thread-safe for one session: the gateway has one caller per model."""

    def __init__(self, model_path: str | Path, intra_op_threads: int = 1) -> None:
        api = self._api = _the_api()
        options = _P()
        api.call(_CREATE_SESSION_OPTIONS, (_PP,), ctypes.byref(options))
        try:
            api.call(_SET_INTRA_OP_THREADS, (_P, ctypes.c_int), options, intra_op_threads)
            api.call(_SET_INTER_OP_THREADS, (_P, ctypes.c_int), options, 1)
            api.call(_SET_EXECUTION_MODE, (_P, ctypes.c_int), options, _SEQUENTIAL)
            # onnxruntime's CPU arena keeps tens of MB per session for a model this small (measured: 44 MB with the
            # arena, 8 MB without, same speed); on a Raspberry Pi that memory matters more.
            api.call(_DISABLE_CPU_MEM_ARENA, (_P,), options)
            api.call(_DISABLE_MEM_PATTERN, (_P,), options)
            self._session = _P()
            api.call(_CREATE_SESSION, (_P, ctypes.c_char_p, _P, _PP), api.env, os.fsencode(model_path), options,
                     ctypes.byref(self._session))
        finally:
            api.release[_RELEASE_SESSION_OPTIONS](options)
        self.inputs = self._names(_SESSION_GET_INPUT_COUNT, _SESSION_GET_INPUT_NAME)
        self.outputs = self._names(_SESSION_GET_OUTPUT_COUNT, _SESSION_GET_OUTPUT_NAME)
        self.metadata = self._metadata()
        # What every run calls, looked up once: a run is a few microseconds of work for these models.
        f = api.function
        self._create_tensor = f(_CREATE_TENSOR_WITH_DATA, (_P, _P, ctypes.c_size_t, _I64P, ctypes.c_size_t,
                                                           ctypes.c_int, _PP))
        self._run = f(_RUN, (_P, _P, _STRINGS, _PP, ctypes.c_size_t, _STRINGS, ctypes.c_size_t, _PP))
        self._type_and_shape = f(_GET_TENSOR_TYPE_AND_SHAPE, (_P, _PP))
        self._element_type = f(_GET_TENSOR_ELEMENT_TYPE, (_P, ctypes.POINTER(ctypes.c_int)))
        self._rank = f(_GET_DIMENSIONS_COUNT, (_P, ctypes.POINTER(ctypes.c_size_t)))
        self._dimensions = f(_GET_DIMENSIONS, (_P, _I64P, ctypes.c_size_t))
        self._data = f(_GET_TENSOR_MUTABLE_DATA, (_P, _PP))
        self._release_value = api.release[_RELEASE_VALUE]
        self._release_info = api.release[_RELEASE_TENSOR_TYPE_AND_SHAPE]
        self._name_arrays: dict[tuple[str, ...], Any] = {}
        self._typecodes: dict[str, str] = {}  # an output's element type is fixed by the model: checked once

    def _names(self, count_index: int, name_index: int) -> list[str]:
        api, count = self._api, ctypes.c_size_t()
        api.call(count_index, (_P, ctypes.POINTER(ctypes.c_size_t)), self._session, ctypes.byref(count))
        names = []
        for i in range(count.value):
            name = _P()
            api.call(name_index, (_P, ctypes.c_size_t, _P, _PP), self._session, i, api.allocator, ctypes.byref(name))
            names.append(api.take_string(name))
        return names

    def _metadata(self) -> dict[str, str]:
        """The model's custom metadata (name, version, thresholds, ... as its training script recorded them)."""
        api, meta = self._api, _P()
        api.call(_SESSION_GET_MODEL_METADATA, (_P, _PP), self._session, ctypes.byref(meta))
        try:
            keys, count = ctypes.POINTER(_P)(), ctypes.c_int64()
            api.call(_METADATA_KEYS, (_P, _P, ctypes.POINTER(ctypes.POINTER(_P)), ctypes.POINTER(ctypes.c_int64)),
                     meta, api.allocator, ctypes.byref(keys), ctypes.byref(count))
            out: dict[str, str] = {}
            if count.value > 0:
                names = [api.take_string(keys[i]) for i in range(count.value)]
                api.free(keys)
                for key in names:
                    value = _P()
                    api.call(_METADATA_LOOKUP, (_P, _P, ctypes.c_char_p, _PP), meta, api.allocator,
                             key.encode(), ctypes.byref(value))
                    out[key] = api.take_string(value) if value else ""
            return out
        finally:
            api.release[_RELEASE_MODEL_METADATA](meta)

    def run(self, output_names: Sequence[str], feeds: Mapping[str, Tensor]) -> list[Tensor]:
        """The named outputs for the given inputs, each copied out of onnxruntime's memory."""
        check = self._api.check
        n_in, n_out = len(feeds), len(output_names)
        in_names, out_names = self._name_array(tuple(feeds)), self._name_array(tuple(output_names))
        values = (_P * n_in)()
        outputs = (_P * n_out)()
        cpu = self._api.cpu
        try:
            for i, (name, tensor) in enumerate(feeds.items()):
                data = tensor.data
                element_type = _ELEMENT_TYPES.get(data.typecode)
                if element_type is None:
                    raise OnnxError(f"input {name!r} is an array of {data.typecode!r}: the gateway sends float32 "
                                    "('f') and int64 ('q') only")
                address, length = data.buffer_info()
                shape = (ctypes.c_int64 * len(tensor.shape))(*tensor.shape)
                value = _P()
                check(self._create_tensor(cpu, address, length * data.itemsize, shape, len(tensor.shape),
                                          element_type, ctypes.byref(value)))
                values[i] = value
            check(self._run(self._session, None, in_names, values, n_in, out_names, n_out, outputs))
            return [self._copy(name, outputs[i]) for i, name in enumerate(output_names)]
        finally:
            for value in (*values, *outputs):
                if value:
                    self._release_value(value)

    def _name_array(self, names: tuple[str, ...]) -> Any:
        found = self._name_arrays.get(names)
        if found is None:
            found = self._name_arrays[names] = (ctypes.c_char_p * len(names))(*(n.encode() for n in names))
        return found

    def _copy(self, name: str, value: int) -> Tensor:
        check, info = self._api.check, _P()
        check(self._type_and_shape(value, ctypes.byref(info)))
        try:
            typecode = self._typecodes.get(name)
            if typecode is None:
                kind = ctypes.c_int()
                check(self._element_type(info, ctypes.byref(kind)))
                if kind.value not in _TYPECODES:
                    raise OnnxError(f"output {name!r} has element type {kind.value}: the gateway reads float32 and "
                                    "int64 only")
                typecode = self._typecodes[name] = _TYPECODES[kind.value]
            rank = ctypes.c_size_t()
            check(self._rank(info, ctypes.byref(rank)))
            dims = (ctypes.c_int64 * rank.value)()
            check(self._dimensions(info, dims, rank.value))
        finally:
            self._release_info(info)
        shape = tuple(dims)
        count = 1
        for d in shape:
            count *= d
        data = array(typecode)
        if count:
            pointer = _P()
            check(self._data(value, ctypes.byref(pointer)))
            data.frombytes(ctypes.string_at(pointer, count * data.itemsize))
        return Tensor(data, shape)

    def close(self) -> None:
        if self._session:
            self._api.release[_RELEASE_SESSION](self._session)
            self._session = _P()

    def __del__(self) -> None:
        session = getattr(self, "_session", None)
        if session:
            self.close()


def open_session(model_path: str | Path, intra_op_threads: int = 1) -> tuple[Session, dict[str, str]]:
    """The model's session and its metadata."""
    session = Session(model_path, intra_op_threads)
    return session, session.metadata
