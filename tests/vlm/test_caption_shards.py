"""WebDataset input on the CPU: the tar reader (grouping, multi-dot extensions, skipped members, truncation),
the wids index, image decoding (stdlib PNG, Pillow when installed) and preprocessing."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from vila_fixtures import png, write_tar

from qserve_lite.caption.feed import image_item
from qserve_lite.core.vision_config import VisionConfig, VLMConfig
from qserve_lite.io import images
from qserve_lite.io.webdataset import Sample as WdsSample
from qserve_lite.io.webdataset import (
    ShardIndexError,
    ShardReadError,
    iter_samples,
    list_shards,
    read_index,
    split_name,
)

VCFG = VLMConfig(VisionConfig(hidden_size=32, intermediate_size=40, num_layers=3, num_heads=2, image_size=70),
                 64)


def test_split_name():
    assert split_name("dir/sub/000123.seg.png") == ("dir/sub/000123", "seg.png")
    assert split_name("000123.JPG") == ("000123", "jpg")
    assert split_name("noext") is None and split_name("dir/.hidden.txt") is None
    assert split_name("a.b/c.txt") == ("a.b/c", "txt")  # dots in directories are not extensions


def test_reader_groups_consecutive_members(tmp_path):
    tar = write_tar(tmp_path / "s.tar", [
        ("d/", b""), ("d/000001.jpg", b"J1"), ("d/000001.seg.png", b"P1"), ("d/000001.txt", b"t1"),
        ("d/.DS_Store", b"x"), ("d/000002.json", b"{}"), ("d/000002.PNG", b"P2"), ("d/000001.txt", b"again"),
        ("README", b"no extension"),
    ])
    samples = list(iter_samples(tar))
    assert [s.key for s in samples] == ["d/000001", "d/000002", "d/000001"]
    assert samples[0].members == {"jpg": b"J1", "seg.png": b"P1", "txt": b"t1"}
    assert samples[1].members == {"json": b"{}", "png": b"P2"}
    assert samples[2].members == {"txt": b"again"}  # not contiguous: a separate sample (webdataset's rule)


def test_truncated_and_missing_shards(tmp_path):
    members = [(f"{i:04d}.png", bytes(3000)) for i in range(6)]
    data = write_tar(tmp_path / "s.tar", members).read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: 512 * 24])  # mid-way through the 4th member (7 blocks each)
    got = []
    with pytest.raises(ShardReadError, match="truncated or corrupt after sample 0002"):
        for s in iter_samples(tmp_path / "cut.tar"):
            got.append(s.key)
    assert got == ["0000", "0001", "0002"]  # the damaged sample is not yielded
    with pytest.raises(ShardReadError, match="does not exist"):
        list(iter_samples(tmp_path / "none.tar"))
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ShardReadError):
        list(iter_samples(tmp_path / "junk.tar"))


def _index(path, shardlist, **extra):
    path.write_text(json.dumps({"wids_version": 1, "shardlist": shardlist, **extra}))
    return path


def test_index_validated(tmp_path):
    for name in ("a", "b"):
        write_tar(tmp_path / f"{name}.tar", [("0.txt", b"x")])
    shards = read_index(_index(tmp_path / "metadata_info.json", [{"url": "b.tar", "nsamples": 3},
                                                                  {"url": "a.tar", "nsamples": 1}]))
    assert [(s.name, s.nsamples) for s in shards] == [("b", 3), ("a", 1)]  # the index's order
    assert list_shards([tmp_path]) == shards  # a directory's own index wins over its tar listing
    bad = [({"shardlist": []}, "wids_version"),
           ({"wids_version": 1, "shardlist": []}, "non-empty"),
           ({"wids_version": 1, "shardlist": [{"url": "a.tar"}]}, "nsamples"),
           ({"wids_version": 1, "shardlist": [{"url": "a.tar", "nsamples": -1}]}, "nsamples"),
           ({"wids_version": 1, "shardlist": [{"url": "c.tar", "nsamples": 1}]}, "does not exist"),
           ({"wids_version": 1, "shardlist": [{"url": "http://x/a.tar", "nsamples": 1}]}, "remote")]
    for content, match in bad:
        (tmp_path / "bad.json").write_text(json.dumps(content))
        with pytest.raises(ShardIndexError, match=match):
            read_index(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ShardIndexError, match="cannot read"):
        read_index(tmp_path / "bad.json")
    sub = tmp_path / "plain"
    for name in ("z", "y"):
        write_tar(sub / f"{name}.tar", [("0.txt", b"x")])
    assert [s.name for s in list_shards([sub])] == ["y", "z"]
    with pytest.raises(ShardReadError, match="no .tar shards"):
        list_shards([_empty(tmp_path)])
    with pytest.raises(ShardReadError, match="named y.tar"):
        list_shards([sub / "y.tar", sub / "y.tar"])


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


# ---- images ----

def test_png_round_trip_and_preprocess():
    data = png(1, h=60, w=90)
    img = images.decode_png(data)
    assert img.shape == (60, 90, 3) and img.dtype == np.uint8
    x = images.normalize(images.resize_bicubic(img, 70, 70), (0.5,) * 3, (0.5,) * 3)
    assert x.shape == (3, 70, 70) and x.dtype == np.float32 and -1 <= x.min() < x.max() <= 1
    flat = np.full((20, 30, 3), 77, np.uint8)
    np.testing.assert_array_equal(images.resize_bicubic(flat, 70, 70), 77)  # weights sum to one
    with pytest.raises(images.ImageError):
        images.decode_png(data[:40] + b"\x00" * 20 + data[60:])
    with pytest.raises(images.ImageError, match="signature"):
        images.decode_png(b"GIF89a")


def test_without_pillow(monkeypatch):
    monkeypatch.setattr(images, "pillow_available", lambda: False)
    item = image_item(WdsSample("k", {"txt": b"x", "png": png(2)}), VCFG)
    assert item.error is None and item.pixels.shape == (3, 70, 70)
    with pytest.raises(images.MissingDecoder, match="Pillow"):
        image_item(WdsSample("k", {"jpg": b"\xff\xd8\xff\xe0 jpeg bytes"}), VCFG)
    missing = image_item(WdsSample("k", {"txt": b"x", "seg.png": png(3)}), VCFG)
    assert missing.pixels is None and "no image member" in missing.error and "seg.png" in missing.error
    corrupt = image_item(WdsSample("k", {"png": png(4)[:100]}), VCFG)
    assert corrupt.pixels is None and corrupt.error.startswith("cannot decode k.png")


def test_pillow_agreement():
    pil = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    img = (np.cumsum(rng.integers(0, 40, (57, 83, 3)), axis=1) % 256).astype(np.uint8)
    for mode in ("RGB", "RGBA", "L", "P", "LA"):
        buf = io.BytesIO()
        pil.fromarray(img).convert(mode).save(buf, "PNG", optimize=True)
        want = np.asarray(pil.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        np.testing.assert_array_equal(images.decode_png(buf.getvalue()), want)
    for size in ((384, 384), (70, 70), (20, 30)):
        want = np.asarray(pil.fromarray(img).resize(size, pil.BICUBIC)).astype(int)
        assert np.abs(images.resize_bicubic(img, *size).astype(int) - want).max() <= 1
    jpg = io.BytesIO()
    pil.fromarray(img).save(jpg, "JPEG")
    ok = image_item(WdsSample("k", {"jpg": jpg.getvalue()}), VCFG)
    assert ok.error is None and ok.pixels.shape == (3, 70, 70)
    bad = image_item(WdsSample("k", {"jpg": jpg.getvalue()[:200]}), VCFG)
    assert bad.pixels is None and bad.error.startswith("cannot decode k.jpg")
