"""Images in, VILA1.5 pixels out: decode JPEG / PNG bytes and preprocess them as SigLIP's image processor does
for VILA1.5's `image_aspect_ratio: resize` (stretch to size x size with bicubic resampling, no crop; scale by
1/255; normalize with the model's mean and std; CHW float32).

Decoding and resizing use Pillow when it is installed (`pip install 'qserve-lite[vlm]'`; the same filter the
Hugging Face processor uses). Without Pillow, PNG still works (a stdlib zlib decoder: 8- and 16-bit gray,
gray+alpha, RGB, RGBA and palette images, not interlaced) with a numpy bicubic resampler that follows
Pillow's (antialiased: the filter widens by the scale when shrinking; a = -0.5; rounded to 8 bits after
each pass), within one level of Pillow's fixed-point output; JPEG needs Pillow (MissingDecoder).

Bad image bytes raise ImageError (the caller records it against the sample and goes on); a missing decoder
raises MissingDecoder, a QServeLiteError (the run cannot go on without it).
"""

from __future__ import annotations

import importlib.util
import io
import re
import struct
import zlib

import numpy as np

from qserve_lite.errors import QServeLiteError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageError(Exception):
    """One image cannot be decoded (corrupt, truncated, unsupported variant)."""


class MissingDecoder(QServeLiteError):
    """The image format needs Pillow, which is not installed."""


def pillow_available() -> bool:
    return importlib.util.find_spec("PIL") is not None


def _pillow_rgb(data: bytes):
    from PIL import Image  # optional: the [vlm] extra

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img.convert("RGB")
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad data
        message = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(e))  # no object addresses: reproducible
        raise ImageError(f"{type(e).__name__}: {message}") from None


def decode_image(data: bytes, ext: str = "") -> np.ndarray:
    """uint8 [H, W, 3] RGB of JPEG / PNG bytes."""
    if pillow_available():
        return np.asarray(_pillow_rgb(data), dtype=np.uint8)
    if data[:8] == PNG_SIGNATURE:
        return decode_png(data)
    if ext.lower() == "png":
        raise ImageError("not a PNG file (bad signature)")
    raise MissingDecoder(f"decoding {ext or 'these'} images needs Pillow: pip install 'qserve-lite[vlm]' (or "
                         "pip install pillow); without it only PNG is read")


def preprocess(data: bytes, ext: str, size: int, mean, std) -> np.ndarray:
    """float32 [3, size, size]: decoded, resized (bicubic, stretched), scaled to [0, 1], normalized."""
    if pillow_available():
        from PIL import Image

        img = _pillow_rgb(data).resize((size, size), Image.BICUBIC)
        x = np.asarray(img, dtype=np.float32)
    else:
        x = resize_bicubic(decode_image(data, ext), size, size).astype(np.float32)
    return normalize(x, mean, std)


def normalize(x: np.ndarray, mean, std) -> np.ndarray:
    """[H, W, 3] in 0..255 -> float32 [3, H, W], (x / 255 - mean) / std per channel."""
    x = x.astype(np.float32) * np.float32(1 / 255)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


# ---- numpy bicubic resampling (Pillow's algorithm) ----

def _bicubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def resample_matrix(in_size: int, out_size: int) -> np.ndarray:
    """float64 [out, in]: each output sample's normalized bicubic weights over the input (Pillow's
    precompute_coeffs: support 2 x max(scale, 1), centers at (i + 0.5) x scale)."""
    scale = in_size / out_size
    fscale = max(scale, 1.0)
    support = 2.0 * fscale
    m = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        w = _bicubic((np.arange(lo, hi) - center + 0.5) / fscale)
        total = w.sum()
        m[i, lo:hi] = w / total if total else w
    return m


def resize_bicubic(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 [H, W, C] -> uint8 [height, width, C]: horizontal then vertical pass, each rounded to 8 bits."""
    h, w, _ = img.shape
    x = img.astype(np.float64)
    if w != width:
        x = np.clip(np.rint(np.einsum("ow,hwc->hoc", resample_matrix(w, width), x)), 0, 255)
    if h != height:
        x = np.clip(np.rint(np.einsum("oh,hwc->owc", resample_matrix(h, height), x)), 0, 255)
    return x.astype(np.uint8)


# ---- stdlib PNG decoder (no Pillow) ----

_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def _png_chunks(data: bytes):
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if len(body) != length:
            raise ImageError("truncated PNG chunk")
        yield kind, body
        pos += 12 + length
        if kind == b"IEND":
            return
    raise ImageError("truncated PNG (no IEND)")


def _unfilter(raw: bytes, height: int, stride: int, bpp: int) -> np.ndarray:
    """The PNG scanline filters undone: uint8 [height, stride]."""
    rows = np.frombuffer(raw, dtype=np.uint8)
    if rows.size != height * (stride + 1):
        raise ImageError(f"PNG image data has {rows.size} bytes, expected {height * (stride + 1)}")
    rows = rows.reshape(height, stride + 1)
    out = np.zeros((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.int64)
    for y in range(height):
        ftype, line = rows[y, 0], rows[y, 1:].astype(np.int64)
        if ftype == 0:
            cur = line
        elif ftype == 1:  # Sub: running sum along each channel lane
            pad = -stride % bpp
            lanes = np.concatenate([line, np.zeros(pad, np.int64)]).reshape(-1, bpp)
            cur = (np.cumsum(lanes, axis=0) % 256).reshape(-1)[:stride]
        elif ftype == 2:  # Up
            cur = (line + prev) % 256
        elif ftype in (3, 4):  # Average, Paeth: sequential along the row
            cur = _unfilter_sequential(line, prev, bpp, ftype)
        else:
            raise ImageError(f"PNG filter type {ftype} is invalid")
        out[y] = cur
        prev = cur.astype(np.int64)
    return out


def _unfilter_sequential(line: np.ndarray, prev: np.ndarray, bpp: int, ftype: int) -> np.ndarray:
    cur = np.zeros_like(line)
    for x0 in range(0, len(line), bpp):
        sl = slice(x0, min(x0 + bpp, len(line)))
        n = sl.stop - sl.start
        a = cur[x0 - bpp : x0 - bpp + n] if x0 >= bpp else np.zeros(n, np.int64)
        b = prev[sl]
        if ftype == 3:
            pred = (a + b) // 2
        else:
            c = prev[x0 - bpp : x0 - bpp + n] if x0 >= bpp else np.zeros(n, np.int64)
            p = a + b - c
            pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
            pred = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
        cur[sl] = (line[sl] + pred) % 256
    return cur


def decode_png(data: bytes) -> np.ndarray:
    """uint8 [H, W, 3] RGB of a non-interlaced PNG (alpha dropped, 16-bit samples cut to their high byte)."""
    if data[:8] != PNG_SIGNATURE:
        raise ImageError("not a PNG file (bad signature)")
    header, palette, idat = None, None, []
    for kind, body in _png_chunks(data):
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body[:13])
        elif kind == b"PLTE":
            palette = np.frombuffer(body, dtype=np.uint8).reshape(-1, 3)
        elif kind == b"IDAT":
            idat.append(body)
    if header is None:
        raise ImageError("PNG without IHDR")
    width, height, depth, color, _, _, interlace = header
    if interlace:
        raise MissingDecoder("interlaced PNG needs Pillow: pip install 'qserve-lite[vlm]'")
    if color not in _CHANNELS or depth not in (8, 16) or (color == 3 and (depth != 8 or palette is None)):
        raise ImageError(f"PNG color type {color} at bit depth {depth} is not supported without Pillow")
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as e:
        raise ImageError(f"corrupt PNG image data ({e})") from None
    channels, nbytes = _CHANNELS[color], depth // 8
    px = _unfilter(raw, height, width * channels * nbytes, channels * nbytes)
    px = px.reshape(height, width, channels, nbytes)[..., 0]  # 16-bit: the high (first) byte
    if color == 3:
        return palette[np.minimum(px[..., 0], len(palette) - 1)]
    if channels <= 2:
        return np.repeat(px[..., :1], 3, axis=2)
    return np.ascontiguousarray(px[..., :3])


def encode_png(img: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes (RGB, 8-bit, filter 'Sub' on every row): for tests and synthetic data."""
    h, w, _ = img.shape
    x = img.astype(np.int16)
    sub = x.copy()
    sub[:, 1:] = (x[:, 1:] - x[:, :-1]) % 256
    rows = np.concatenate([np.ones((h, 1), np.uint8), sub.astype(np.uint8).reshape(h, w * 3)], axis=1)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (PNG_SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows.tobytes()))
            + chunk(b"IEND", b""))
