"""The VLM's CuPy paths against their numpy twins (pytest -m gpu): the vision encoder at the real
SigLIP-so400m widths (head_dim 72, MLP 4304; fewer layers) in fp16 and W8A8, image embeddings spliced into
the GPU runner's prefill (exact oracle, as on the CPU), and `qserve-lite caption` / `bench --vlm` end to end
on the device."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import cupy_or_skip
from test_caption import make_shards, results
from test_splice import SPARE, _run
from vila_fixtures import VISION, llm_config, quantize_llm, vila_config, write_vila

from qserve_lite.cli import main
from qserve_lite.core.vision_config import VisionConfig, VLMConfig
from qserve_lite.engine.gpu_model_runner import GPUModelRunner
from qserve_lite.engine.llm_engine import LLMEngine
from qserve_lite.engine.sequence import PromptEmbeds
from qserve_lite.io.loader import load_model
from qserve_lite.model.random_vision import build_random_vision
from qserve_lite.model.vision import VisionEncoder, VisionLinear, VisionWeights
from qserve_lite.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu


def _to_numpy(weights: VisionWeights) -> VisionWeights:
    """The same weights as numpy arrays (the twin)."""
    def lin(x: VisionLinear):
        return VisionLinear(x.mode, *(None if a is None else a.get() for a in (x.weight, x.bias, x.scales)))

    layers = [type(ly)(ln1=tuple(a.get() for a in ly.ln1), qkv=lin(ly.qkv), out=lin(ly.out),
                       ln2=tuple(a.get() for a in ly.ln2), fc1=lin(ly.fc1), fc2=lin(ly.fc2))
              for ly in weights.layers]
    p = weights.projector
    projector = type(p)(ln=tuple(a.get() for a in p.ln), fc1=lin(p.fc1), fc2=lin(p.fc2))
    return VisionWeights(weights.config, weights.mode, lin(weights.patch), weights.position.get(), layers,
                         projector)


@pytest.mark.parametrize("mode,tol", [("f16", 1e-2), ("w8", 3e-2)])
def test_vision_encoder_matches_twin(mode, tol):
    cp = cupy_or_skip()
    vision = VisionConfig(num_layers=3)  # SigLIP-so400m widths: 1152 / 16 heads of 72 / 4304, 384 px
    cfg = VLMConfig(vision, llm_hidden=5120)
    weights = build_random_vision(cfg, mode, xp=cp, seed=0)
    pixels = np.random.default_rng(0).uniform(-1, 1, (3, 3, 384, 384)).astype(np.float32)
    got = VisionEncoder(weights, cp, max_images=2).encode(pixels).get().astype(np.float64)
    want = VisionEncoder(_to_numpy(weights), np).encode(pixels).astype(np.float64)
    assert got.shape == want.shape == (3, 196, 5120) and np.isfinite(got).all()
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < tol, err


@pytest.mark.parametrize("w_bit", [16, 8, 4])
def test_gpu_spliced_prefill_equals_embedding_rows(tmp_path, w_bit):
    cp = cupy_or_skip()
    root = write_vila(tmp_path / "v", llm=llm_config(head_dim=64, num_attention_heads=1, hidden_size=64))
    llm_dir = root / "llm" if w_bit == 16 else quantize_llm(root / "llm", tmp_path / f"w{w_bit}", w_bit)
    rng = np.random.default_rng(5)
    image = (0.5 * rng.standard_normal((9, 64))).astype(np.float16)
    engines = []
    for rows in (None, image):
        lm = load_model(llm_dir)
        if rows is not None:
            lm.weights.embed_tokens[SPARE : SPARE + 9] = rows.astype(np.float32)
        kw = dict(max_num_seqs=4, num_pages=16)
        runner = GPUModelRunner(lm, max_num_batched_tokens=256, max_model_len=256, xp=cp, **kw)
        engines.append(LLMEngine(lm, runner=runner, **kw))
    spliced, oracle = engines
    prompt = [7, *([0] * 9), 11, 12]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    spliced.add_request(prompt, params, request_id="s", prompt_embeds=PromptEmbeds(np.arange(1, 10),
                                                                                    cp.asarray(image)))
    oracle.add_request([7, *range(SPARE, SPARE + 9), 11, 12], params, request_id="s")
    got, want = _run(spliced), _run(oracle)
    assert got[0].outputs[0].token_ids == want[0].outputs[0].token_ids


def test_caption_and_bench_on_gpu(tmp_path):
    cupy_or_skip()
    vila = write_vila(tmp_path / "VILA1.5-tiny", llm=llm_config(head_dim=64, num_attention_heads=1))
    make_shards(tmp_path / "in")
    for vision in ("w16a16", "w8a8"):
        out = tmp_path / f"out-{vision}"
        assert main(["caption", "--model", str(vila), "--shards", str(tmp_path / "in"), "--out", str(out),
                     "--device", "gpu", "--max-new-tokens", "6", "--max-num-seqs", "3", "--no-progress",
                     "--vision-precision", vision]) == 0
        got = results(out)["shard-000.json"]
        assert len(got) == 12 and sum("error" in v for v in got.values()) == 2
    shape = tmp_path / "tiny-vila.json"
    shape.write_text(json.dumps(vila_config(llm_config(head_dim=64, num_attention_heads=1), VISION)))
    rc = main(["bench", "--vlm", str(shape), "--device", "gpu", "--batch", "4", "--num-requests", "9",
               "--gen", "5", "--json-out", str(tmp_path / "vlm.jsonl")])
    assert rc == 0
    row = json.loads((tmp_path / "vlm.jsonl").read_text().splitlines()[0])
    assert row["generated_tokens"] == 45 and row["images_per_s"] > 0
