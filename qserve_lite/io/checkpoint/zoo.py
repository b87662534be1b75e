"""QServe model-zoo checkpoints: ``pytorch_model.bin`` (sharded with an index, or not) or ``*.pt`` files, read
without torch by io/torch_pickle.py, in the tensor layout of layout.py.

A zoo checkpoint may have no quantization_config: the granularity then comes from the tensor names
(read.py) and kv_bit defaults to 4. QServe's W4A8 runtime ignores norm weights (QoQ folds them into the
linears): for zoo W4A8 checkpoints we do the same and warn when the stored norms are not all ones.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from qserve_lite.errors import WeightsError
from qserve_lite.io.checkpoint.layout import PRODUCER
from qserve_lite.io.hf_weights import TensorIndex
from qserve_lite.io.torch_pickle import TorchCheckpoint

log = logging.getLogger(__name__)


class TorchIndex(TensorIndex):
    """TensorIndex over torch zip checkpoints (pytorch_model.bin, sharded or not, or *.pt)."""

    def __init__(self, model_dir: Path, files: list[Path]):
        self.model_dir = model_dir
        self._files: dict[str, TorchCheckpoint] = {}
        self._where: dict[str, str] = {}
        try:
            for path in files:
                ck = TorchCheckpoint(path)
                self._files[path.name] = ck
                for name in ck.keys():
                    self._where[name] = path.name
        except BaseException:
            self.close()
            raise


def open_torch_index(model_dir: Path) -> TorchIndex | None:
    """The shards named by pytorch_model.bin.index.json, else every *.bin (or *.pt) file of model_dir; None
    when there are none."""
    index = model_dir / "pytorch_model.bin.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError, AttributeError, TypeError):
            raise WeightsError(f"{index}: not a valid checkpoint index (needs a 'weight_map')") from None
        missing = [s for s in shards if not (model_dir / s).is_file()]
        if missing:
            raise WeightsError(f"{index} names shard '{missing[0]}', which is missing from {model_dir}")
        return TorchIndex(model_dir, [model_dir / s for s in shards])
    files = sorted(model_dir.glob("*.bin")) or sorted(model_dir.glob("*.pt"))
    return TorchIndex(model_dir, files) if files else None


def inferred_quant_config(w_bit: int, group_size: int) -> dict:
    """The quantization_config of a zoo checkpoint that has none, from its tensors' granularity."""
    return {"quant_method": "qoq", "w_bit": w_bit, "a_bit": 8, "group_size": group_size, "kv_bit": 4,
            "inferred": True}


class NormReader:
    """Reads the [hidden] norm weights. For W4A8 checkpoints not written by qserve-lite (QServe zoo ones) it
    returns ones, as QServe's runtime does, and records the stored norms that are not all ones (warn())."""

    def __init__(self, idx, hidden_size: int, qc: dict):
        self.idx, self.hidden_size = idx, hidden_size
        self.ignore_stored = qc["w_bit"] == 4 and qc.get("producer") != PRODUCER
        self.not_ones: list[str] = []

    def __call__(self, name: str) -> np.ndarray:
        w = self.idx.get(name, (self.hidden_size,), dtype=np.float32)
        if not self.ignore_stored:
            return w
        if not np.all(w == 1):
            self.not_ones.append(name)
        return np.ones(self.hidden_size, np.float32)

    def warn(self, model_dir: Path) -> None:
        if self.not_ones:
            log.warning(
                "%s: %d norm weight(s) are not all ones (e.g. %s); QServe's W4A8 runtime ignores norm "
                "weights (QoQ folds them into the linears), so qserve-lite uses ones as well", model_dir,
                len(self.not_ones), self.not_ones[0],
            )
