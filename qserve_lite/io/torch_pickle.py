"""Read torch's zip checkpoints (``torch.save`` since torch 1.6, e.g. ``pytorch_model.bin``) without torch.

Such a file is a zip archive holding ``<prefix>/data.pkl`` (a pickle of the state dict),
``<prefix>/data/<key>`` (one raw storage per key) and ``<prefix>/byteorder``. In the pickle, every tensor is
a call ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` whose storage is a
persistent id ``('storage', torch.<Type>Storage, key, location, numel)``.

Unpickling arbitrary data executes arbitrary code, so the unpickler here resolves only the handful of
globals a plain state dict needs and maps each to a harmless local stand-in; anything else (``os.system``,
``torch.storage._load_from_bytes``, custom classes...) raises ``UnsafeCheckpointError`` naming the global.
Tensor data is read lazily: the pickle yields descriptors and ``TorchCheckpoint.get`` reads one tensor's
bytes from the zip. bf16 tensors become float32 (exact).
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from pathlib import Path

import numpy as np

from qserve_lite.errors import WeightsError
from qserve_lite.io.safetensors_reader import bf16_bits_to_f32

_BF16 = "bfloat16"  # numpy has no bf16: stored as uint16 bits, widened to fp32 on read

_STORAGE_DTYPES = {
    "HalfStorage": np.float16,
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "BFloat16Storage": _BF16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "ShortStorage": np.int16,
    "IntStorage": np.int32,
    "LongStorage": np.int64,
    "BoolStorage": np.bool_,
}

_TORCH_DTYPES = {
    "float16": np.float16, "half": np.float16, "float32": np.float32, "float": np.float32,
    "float64": np.float64, "double": np.float64, "bfloat16": _BF16, "int8": np.int8, "uint8": np.uint8,
    "int16": np.int16, "int32": np.int32, "int64": np.int64, "long": np.int64, "bool": np.bool_,
}


class UnsafeCheckpointError(WeightsError):
    """The pickle inside a torch checkpoint references a global a state dict never needs."""


class _StorageType:
    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype):
        self.name = name
        self.dtype = dtype


class _StorageRef:
    __slots__ = ("key", "dtype", "numel")

    def __init__(self, key: str, dtype, numel: int):
        self.key = key
        self.dtype = dtype
        self.numel = numel


class _TensorRef:
    """A tensor described by the pickle; its bytes stay in the zip until TorchCheckpoint.get."""

    __slots__ = ("storage", "offset", "shape", "stride")

    def __init__(self, storage: _StorageRef, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]):
        self.storage = storage
        self.offset = offset
        self.shape = shape
        self.stride = stride


def _int_tuple(x, what: str) -> tuple[int, ...]:
    if not isinstance(x, (tuple, list)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in x):
        raise WeightsError(f"corrupted torch checkpoint: tensor {what} is {x!r}, expected a tuple of ints")
    return tuple(int(v) for v in x)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    if not isinstance(storage, _StorageRef):
        raise WeightsError("corrupted torch checkpoint: a tensor is not backed by a storage record")
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise WeightsError(f"corrupted torch checkpoint: bad storage offset {storage_offset!r}")
    shape = _int_tuple(size, "size")
    strides = _int_tuple(stride, "stride")
    if len(shape) != len(strides) or any(s < 0 for s in shape) or any(s < 0 for s in strides):
        raise WeightsError(f"corrupted torch checkpoint: tensor size {shape} / stride {strides} are invalid")
    if all(s > 0 for s in shape):
        last = storage_offset + sum((n - 1) * st for n, st in zip(shape, strides, strict=True))
        if last >= storage.numel:
            raise WeightsError(
                f"corrupted torch checkpoint: a tensor of size {shape} at offset {storage_offset} reaches "
                f"past its storage '{storage.key}' of {storage.numel} elements"
            )
    return _TensorRef(storage, storage_offset, shape, strides)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


def _size(*args):
    return tuple(*args)


_ALLOWED: dict[tuple[str, str], object] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): _size,
}
_ALLOWED.update({("torch", name): _StorageType(name, dt) for name, dt in _STORAGE_DTYPES.items()})
_ALLOWED.update({("torch", name): dt for name, dt in _TORCH_DTYPES.items()})


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file)
        self._source = source
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module, name):
        obj = _ALLOWED.get((module, name))
        if obj is None:
            raise UnsafeCheckpointError(
                f"{self._source}: refusing to unpickle global '{module}.{name}': a plain state dict of "
                "tensors never needs it, and loading it could run arbitrary code. Only tensors, storages and "
                "OrderedDict are allowed; if you trust the file, convert it to safetensors with torch."
            )
        return obj

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise WeightsError(f"{self._source}: unsupported persistent record {pid!r:.80} in the pickle")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType) or not isinstance(key, str) or not isinstance(numel, int):
            raise WeightsError(f"{self._source}: malformed storage record {pid!r:.80} in the pickle")
        ref = self.storages.get(key)
        if ref is None:
            ref = self.storages[key] = _StorageRef(key, stype.dtype, numel)
        return ref


def _flatten(obj, prefix: str, out: dict[str, _TensorRef]) -> None:
    for k, v in obj.items():
        name = f"{prefix}{k}"
        if isinstance(v, _TensorRef):
            out[name] = v
        elif isinstance(v, dict):
            _flatten(v, name + ".", out)
        # other leaves (ints, strings, None, lists) carry no weights: skipped


def _data_pkl(names: list[str], src: str) -> str:
    """The archive's one '<prefix>/data.pkl' (or a bare 'data.pkl')."""
    pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if not pkls and "data.pkl" in names:
        pkls = ["data.pkl"]
    if len(pkls) != 1:
        hint = " (a TorchScript archive?)" if any(n.endswith("constants.pkl") for n in names) else ""
        raise WeightsError(
            f"{src}: not a torch state-dict archive{hint}: expected one '<prefix>/data.pkl', "
            f"found {len(pkls)}; save the weights with torch.save(model.state_dict(), ...) or as "
            "safetensors"
        )
    return pkls[0]


def _state_dict(obj, src: str) -> dict:
    """The unpickled object as a state dict; a lone {'state_dict' | 'model' | 'module': dict} is unwrapped."""
    if isinstance(obj, _TensorRef):
        raise WeightsError(f"{src}: holds a single tensor, not a state dict (name -> tensor)")
    if not isinstance(obj, dict):
        raise WeightsError(
            f"{src}: the pickle holds a {type(obj).__name__}, not a state dict (name -> tensor)"
        )
    wrappers = [k for k in ("state_dict", "model", "module") if isinstance(obj.get(k), dict)]
    if len(obj) == 1 and wrappers:
        obj = obj[wrappers[0]]
    return obj


class TorchCheckpoint:
    """A torch zip checkpoint: ``keys()``, ``shape(name)``, ``dtype(name)``, ``get(name)`` -> numpy copy."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._zip = self._open_zip()
        try:
            self._read_index(str(self.path))
        except BaseException:
            self._zip.close()
            raise

    def _open_zip(self) -> zipfile.ZipFile:
        try:
            return zipfile.ZipFile(self.path)
        except FileNotFoundError:
            raise WeightsError(f"weight file not found: {self.path}") from None
        except zipfile.BadZipFile:
            raise WeightsError(self._not_zip_message()) from None
        except OSError as e:
            raise WeightsError(f"cannot open weight file {self.path}: {e.strerror}") from None

    def _read_index(self, src: str) -> None:
        """Unpickle the state dict's tensor descriptors and check every storage is in the archive."""
        names = self._zip.namelist()
        pkl = _data_pkl(names, src)
        self._prefix = pkl[: -len("data.pkl")]
        self._big_endian = self._byteorder(names, src) == "big"
        with self._zip.open(pkl) as fh:
            up = _RestrictedUnpickler(fh, src)
            try:
                obj = up.load()
            except (WeightsError, MemoryError):
                raise
            except Exception as e:  # malformed pickles raise all sorts of errors
                raise WeightsError(
                    f"{src}: corrupted pickle in the torch checkpoint ({type(e).__name__}: {e})"
                ) from None
        self._tensors: dict[str, _TensorRef] = {}
        _flatten(_state_dict(obj, src), "", self._tensors)
        for ref in up.storages.values():
            self._check_storage(ref, src)

    def _byteorder(self, names: list[str], src: str) -> str:
        order = "little"
        if self._prefix + "byteorder" in names:
            order = self._zip.read(self._prefix + "byteorder").decode("ascii", "replace").strip()
        if order not in ("little", "big"):
            raise WeightsError(f"{src}: unknown byteorder record {order!r}")
        return order

    def _check_storage(self, ref: _StorageRef, src: str) -> None:
        member = self._prefix + "data/" + ref.key
        try:
            info = self._zip.getinfo(member)
        except KeyError:
            raise WeightsError(
                f"{src}: storage '{ref.key}' is missing from the archive (truncated file?); "
                "re-download it"
            ) from None
        if info.file_size < ref.numel * self._itemsize(ref.dtype):
            raise WeightsError(
                f"{src}: storage '{ref.key}' has {info.file_size} bytes, fewer than its {ref.numel} "
                "elements need (truncated or corrupted file); re-download it"
            )

    def _not_zip_message(self) -> str:
        try:
            with open(self.path, "rb") as fh:
                head = fh.read(2)
        except OSError:
            head = b""
        if head[:1] == b"\x80":
            return (
                f"{self.path}: saved in torch's legacy (pre-1.6) format, which is not supported; re-save "
                "it with torch >= 1.6 (torch.save default) or convert it to safetensors"
            )
        return f"{self.path}: not a torch zip checkpoint (truncated or not a weights file); re-download it"

    @staticmethod
    def _itemsize(dtype) -> int:
        return 2 if dtype is _BF16 else np.dtype(dtype).itemsize

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensors[name].shape

    def dtype(self, name: str) -> np.dtype:
        """The numpy dtype get() returns (float32 for bf16)."""
        dt = self._tensors[name].storage.dtype
        return np.dtype(np.float32 if dt is _BF16 else dt)

    def get(self, name: str, dtype=None) -> np.ndarray:
        ref = self._tensors[name]
        st = ref.storage
        raw = np.dtype(np.uint16 if st.dtype is _BF16 else st.dtype)
        if self._big_endian:
            raw = raw.newbyteorder(">")
        if any(s == 0 for s in ref.shape):
            arr = np.zeros(ref.shape, raw)
        else:
            data = self._zip.read(self._prefix + "data/" + st.key)
            flat = np.frombuffer(data, dtype=raw, count=st.numel)
            view = np.lib.stride_tricks.as_strided(
                flat[ref.offset:], shape=ref.shape, strides=tuple(s * raw.itemsize for s in ref.stride),
                writeable=False,
            )
            arr = np.array(view, dtype=raw.newbyteorder("="), copy=True, order="C")
        if st.dtype is _BF16:
            arr = bf16_bits_to_f32(arr)
        return arr if dtype is None else arr.astype(dtype)

    def close(self) -> None:
        self._zip.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load_torch_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a torch zip checkpoint as numpy (bf16 -> float32), without torch."""
    with TorchCheckpoint(path) as ck:
        return {name: ck.get(name) for name in ck.keys()}
