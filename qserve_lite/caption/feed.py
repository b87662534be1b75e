"""The images of one WebDataset shard for the engine: each sample's image member (jpg, jpeg or png, in that
order) decoded and preprocessed in a thread pool ahead of VLMEngine.generate (io/images.py: Pillow, or the
stdlib PNG decoder without it). A sample without an image, or with one that cannot be decoded, becomes an
item with an error (recorded, never fatal)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from qserve_lite.core.vision_config import VLMConfig
from qserve_lite.engine.vlm_engine import ImageItem
from qserve_lite.io.images import IMAGE_EXTENSIONS, ImageError, preprocess
from qserve_lite.io.webdataset import Sample, ShardReadError, iter_samples


def image_item(sample: Sample, vcfg: VLMConfig) -> ImageItem:
    """The sample's preprocessed image, or the reason it has none (ImageError / no image member)."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample.members), None)
    if ext is None:
        have = ", ".join(sorted(sample.members)) or "none"
        return ImageItem(sample.key, error=f"no image member (jpg, jpeg or png); members: {have}")
    try:
        pixels = preprocess(sample.members[ext], ext, vcfg.vision.image_size, vcfg.image_mean, vcfg.image_std)
    except ImageError as e:
        return ImageItem(sample.key, error=f"cannot decode {sample.key}.{ext}: {e}")
    return ImageItem(sample.key, pixels=pixels)


class ShardFeed:
    """The items of the tar shard at `path`: its keys in shard order, each once (a key seen again is not
    captioned twice), those not in `skip` (finished by an earlier run) decoded `ahead` at a time in the pool.
    `order`: the keys read; `samples`: the samples read. A read error ends the feed (after the samples
    before it) and is kept in `error`."""

    def __init__(self, path: Path, skip: set[str], vcfg: VLMConfig, pool: ThreadPoolExecutor, ahead: int):
        self.path, self.skip, self.vcfg, self.pool, self.ahead = path, skip, vcfg, pool, ahead
        self.error: str | None = None
        self.samples = 0
        self.order: list[str] = []
        self._seen: set[str] = set()

    def _samples(self) -> Iterator[Sample]:
        try:
            for sample in iter_samples(self.path):
                self.samples += 1
                if sample.key in self._seen:
                    continue
                self._seen.add(sample.key)
                self.order.append(sample.key)
                if sample.key not in self.skip:
                    yield sample
        except ShardReadError as e:
            self.error = str(e)

    def __iter__(self) -> Iterator[ImageItem]:
        pending: deque = deque()
        for sample in self._samples():
            pending.append(self.pool.submit(image_item, sample, self.vcfg))
            if len(pending) > self.ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
