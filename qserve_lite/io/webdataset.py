"""WebDataset shards without the webdataset package: a streaming stdlib tarfile reader and the wids-style
shard index (metadata_info.json).

A shard is a plain tar whose members of one sample share a key: the member's path up to the first '.' of its
basename (`dir/000123.seg.png` -> key `dir/000123`, extension `seg.png`). Samples are the runs of consecutive
members with one key (webdataset's grouping); directories and other non-files are skipped, as are names
whose basename starts with '.' or has no extension. A truncated or corrupt tar raises ShardReadError after
the samples read before the damage.

metadata_info.json (wids shard index): {"wids_version": 1, "shardlist": [{"url": ..., "nsamples": N, ...}]},
optionally "base" (urls relative to it; default the index's own folder). Only local paths are read.
"""

from __future__ import annotations

import json
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from qserve_lite.errors import QServeLiteError

INDEX_NAME = "metadata_info.json"
_KEY_EXT = re.compile(r"^((?:.*/|)[^./][^./]*)\.([^/]*)$")  # webdataset's base_plus_ext, hidden files skipped


class ShardReadError(QServeLiteError):
    """A shard cannot be read (missing, not a tar, truncated, corrupt)."""


class ShardIndexError(QServeLiteError):
    """metadata_info.json is malformed or names shards that are not there."""


@dataclass
class Sample:
    key: str
    members: dict[str, bytes] = field(default_factory=dict)  # extension -> bytes (first one kept)


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    nsamples: int | None = None  # from the index, when there is one

    @property
    def name(self) -> str:
        """The shard's file name without .tar (its outputs are named after it)."""
        return self.path.name.removesuffix(".tar")


def split_name(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member name, or None when it belongs to no sample."""
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2).lower()) if m else None


def iter_samples(path: str | Path) -> Iterator[Sample]:
    """The samples of a tar shard, in order, streamed (nothing but the current sample is held). On damage,
    the complete samples before it are yielded, then ShardReadError (naming the last good key) is raised."""
    path = Path(path)
    current: Sample | None = None
    last_good = None
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                parts = split_name(member.name) if member.isfile() else None
                if parts is None:
                    continue
                key, ext = parts
                if current is not None and key != current.key:
                    last_good = current.key
                    yield current
                    current = None
                if current is None:
                    current = Sample(key)
                data = tar.extractfile(member).read()
                current.members.setdefault(ext, data)
    except FileNotFoundError:
        raise ShardReadError(f"shard {path} does not exist") from None
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        where = f"sample {last_good}" if last_good is not None else "its start"
        raise ShardReadError(f"shard {path} is truncated or corrupt after {where} ({type(e).__name__}: "
                             f"{e})") from None
    if current is not None:
        yield current


def read_index(path: str | Path) -> list[ShardInfo]:
    """The shards a wids metadata_info.json lists, validated (local files that exist)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardIndexError(f"{path}: cannot read the shard index ({e})") from None
    if not isinstance(data, dict) or data.get("wids_version") != 1:
        raise ShardIndexError(f"{path}: not a wids shard index (needs \"wids_version\": 1)")
    shards = data.get("shardlist")
    if not isinstance(shards, list) or not shards:
        raise ShardIndexError(f"{path}: \"shardlist\" must be a non-empty list")
    base = Path(data["base"]) if isinstance(data.get("base"), str) else path.parent
    out = []
    for i, entry in enumerate(shards):
        url = entry.get("url") if isinstance(entry, dict) else None
        n = entry.get("nsamples") if isinstance(entry, dict) else None
        if not isinstance(url, str) or not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ShardIndexError(f"{path}: shardlist[{i}] needs a \"url\" string and a \"nsamples\" "
                                  "integer >= 0")
        if "://" in url:
            raise ShardIndexError(f"{path}: shardlist[{i}] url {url!r} is remote; only local shards are read")
        shard = Path(url) if Path(url).is_absolute() else base / url
        if not shard.is_file():
            raise ShardIndexError(f"{path}: shardlist[{i}] names {shard}, which does not exist")
        out.append(ShardInfo(shard, n))
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise ShardIndexError(f"{path}: two shards share a file name; their outputs would collide")
    return out


def list_shards(sources: list[str | Path], index: str | Path | None = None) -> list[ShardInfo]:
    """The shards to process: those of `index` (a metadata_info.json), else of a directory's own
    metadata_info.json, else its *.tar files (sorted); tar files may also be given one by one."""
    if index is not None:
        return read_index(index)
    out: list[ShardInfo] = []
    for src in sources:
        p = Path(src).expanduser()
        if p.is_dir():
            if (p / INDEX_NAME).is_file():
                out += read_index(p / INDEX_NAME)
            else:
                out += [ShardInfo(t) for t in sorted(p.glob("*.tar"))]
        elif p.is_file():
            out.append(ShardInfo(p))
        else:
            raise ShardReadError(f"{p} does not exist (give a directory of .tar shards, .tar files, or "
                                 "--index)")
    if not out:
        raise ShardReadError(f"no .tar shards in {', '.join(map(str, sources))}")
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ShardReadError(f"two shards are named {dup}.tar; their outputs would collide")
    return out
