"""Read .safetensors files into numpy without torch, with clear errors on corrupted files.

The format is an 8-byte little-endian header length, a JSON header mapping tensor names to
{dtype, shape, data_offsets}, then the raw bytes. We parse it ourselves (rather than through
safetensors.numpy) so bf16 tensors load (numpy has no bf16: we widen them to fp32) and so a
truncated or garbled file names what is wrong.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import numpy as np

from qserve_lite.errors import WeightsError

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,  # widened to fp32 on read
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """bf16 stored as uint16 -> float32 (exact: bf16 is the top half of an fp32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


class SafetensorsFile:
    """One .safetensors file, memory-mapped. `get(name)` returns a numpy array (a copy)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._fh = open(self.path, "rb")
        except OSError as e:
            raise WeightsError(f"cannot open weight file {self.path}: {e.strerror}") from None
        size = self.path.stat().st_size
        if size < 8:
            raise WeightsError(
                f"{self.path}: file is too small to be safetensors ({size} bytes); re-download it"
            )
        (header_len,) = struct.unpack("<Q", self._fh.read(8))
        if header_len <= 0 or 8 + header_len > size:
            raise WeightsError(
                f"{self.path}: corrupted safetensors header "
                f"(declares {header_len} header bytes, file has {size}); "
                "re-download or re-convert the model"
            )
        try:
            header = json.loads(self._fh.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise WeightsError(
                f"{self.path}: corrupted safetensors header (not JSON); re-download the file"
            ) from None
        if not isinstance(header, dict):
            raise WeightsError(f"{self.path}: corrupted safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        data_len = size - self._data_start
        for name, info in header.items():
            try:
                begin, end = info["data_offsets"]
                dtype = info["dtype"]
                shape = tuple(int(s) for s in info["shape"])
            except (KeyError, TypeError, ValueError):
                raise WeightsError(f"{self.path}: corrupted header entry for tensor '{name}'") from None
            if dtype not in _DTYPES:
                raise WeightsError(f"{self.path}: tensor '{name}' has unsupported dtype {dtype}")
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dtype]).itemsize
            if not (0 <= begin <= end <= data_len) or end - begin != nbytes:
                raise WeightsError(
                    f"{self.path}: tensor '{name}' points outside the file or has the wrong byte size "
                    "(truncated or corrupted file); re-download it"
                )
        self._header = header
        self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ) if data_len > 0 else None

    def keys(self) -> list[str]:
        return list(self._header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header[name]["shape"])

    def dtype(self, name: str) -> str:
        return self._header[name]["dtype"]

    def get(self, name: str, dtype=None) -> np.ndarray:
        info = self._header[name]
        begin, end = info["data_offsets"]
        raw_dtype = _DTYPES[info["dtype"]]
        shape = tuple(info["shape"])
        if end == begin:
            arr = np.zeros(shape, raw_dtype)
        else:
            arr = np.frombuffer(
                self._mm,
                dtype=raw_dtype,
                count=(end - begin) // np.dtype(raw_dtype).itemsize,
                offset=self._data_start + begin,
            ).reshape(shape)
        if info["dtype"] == "BF16":
            arr = bf16_bits_to_f32(arr)
        out = np.array(arr, dtype=dtype or arr.dtype, copy=True)
        del arr
        if end > begin:
            self._release(self._data_start + begin, end - begin)
        return out

    def _release(self, offset: int, length: int) -> None:
        """Unmap the pages of a tensor that was copied out, so that reading a large checkpoint tensor by
        tensor does not leave the whole file resident in this process (the OS page cache keeps it)."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        first = offset - offset % mmap.PAGESIZE
        last = min(offset + length, len(self._mm))
        try:
            self._mm.madvise(mmap.MADV_DONTNEED, first, last - first)
        except (OSError, ValueError):  # advice only: never fail a read because of it
            pass

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
