"""Image embeddings spliced into prefill: where they land in a packed batch, and an exact oracle on both
runners (the numpy reference and the GPU runner's numpy twin) at several precisions: a prompt whose image
positions carry embeddings E gives the same tokens as the same prompt with token ids whose embedding rows
were set to E."""

from __future__ import annotations

import numpy as np
import pytest
from vila_fixtures import llm_config, quantize_llm, write_vila

from qserve_lite.engine.batch import prepare, to_device
from qserve_lite.engine.gpu_model_runner import GPUModelRunner
from qserve_lite.engine.llm_engine import LLMEngine
from qserve_lite.engine.sequence import PromptEmbeds, Sequence
from qserve_lite.engine.vlm_engine import ImageItem, build_vlm_engine
from qserve_lite.engine.vlm_prompt import IMAGE_PLACEHOLDER_ID, apply_template, image_prompt
from qserve_lite.errors import QServeLiteError
from qserve_lite.io.loader import load_model
from qserve_lite.io.vila import load_vila
from qserve_lite.sampling_params import SamplingParams

SPARE = 300  # token ids 300.. of the tiny vocabulary (320) carry the image rows in the oracle model


def _seq(i: int, n: int, embeds: PromptEmbeds | None = None) -> Sequence:
    seq = Sequence(i, str(i), list(range(10, 10 + n)), SamplingParams(), np.random.default_rng(0))
    seq.block_table = [i]
    seq.prompt_embeds = embeds
    return seq


def test_prepare_places_embedding_rows():
    a = PromptEmbeds([1, 2, 3], np.full((3, 4), 1.0))
    c = PromptEmbeds([0, 5], np.full((2, 4), 3.0))
    batch = prepare([_seq(0, 6, a), _seq(1, 4), _seq(2, 7, c)], is_prefill=True)
    rows, values = batch.embeds
    np.testing.assert_array_equal(rows, [1, 2, 3, 10, 15])  # seq 2 starts at packed row 6 + 4
    assert [v.shape for v in values] == [(3, 4), (2, 4)]
    inputs = to_device(batch, np)
    np.testing.assert_array_equal(inputs.embed_rows, rows)
    assert inputs.embed_values.shape == (5, 4) and inputs.embed_values[3, 0] == 3.0
    assert prepare([_seq(1, 4)], is_prefill=True).embeds is None
    assert prepare([_seq(0, 6, a)], is_prefill=False).embeds is None  # decode steps never carry them
    at, vals = a.from_position(2)  # a prefill that starts at position 2 keeps positions 2 and 3
    np.testing.assert_array_equal(at, [2, 3])
    assert len(vals) == 2


def test_prompt_embeds_checked():
    with pytest.raises(QServeLiteError, match=r"expected values of shape \[2, 8\]"):
        PromptEmbeds([0, 1], np.zeros((2, 4))).check(5, 8)
    with pytest.raises(QServeLiteError, match="increase within the prompt"):
        PromptEmbeds([3, 5], np.zeros((2, 8))).check(5, 8)
    with pytest.raises(QServeLiteError, match="increase within the prompt"):
        PromptEmbeds([2, 2], np.zeros((2, 8))).check(5, 8)
    PromptEmbeds([0, 4], np.zeros((2, 8))).check(5, 8)


def test_image_prompt_tokens(tmp_path):
    loaded = load_vila(write_vila(tmp_path / "v"))
    tok = loaded.llm.tokenizer
    text = apply_template("vicuna_v1", "<image> Please describe the picture in detail.")
    assert text.startswith("A chat between a curious user") and text.endswith("detail. ASSISTANT:")
    ids, positions = image_prompt(tok, text, 9)
    before = tok.encode(text.split("<image>")[0], add_special_tokens=False)
    assert ids[0] == tok.bos_token_id and ids[1 : 1 + len(before)] == before
    np.testing.assert_array_equal(positions, np.arange(1 + len(before), 10 + len(before)))
    assert all(ids[p] == IMAGE_PLACEHOLDER_ID for p in positions)
    assert apply_template("plain", "hi").startswith("<image>\n")  # the image goes first when not placed
    with pytest.raises(QServeLiteError, match="unknown conversation template"):
        apply_template("nope", "<image>")


def _oracle_pair(llm_dir, gpu_twin: bool, embeds: np.ndarray):
    """(spliced engine, oracle engine): the second's embedding rows SPARE.. hold `embeds`."""
    plain, oracle = load_model(llm_dir), load_model(llm_dir)
    oracle.weights.embed_tokens[SPARE : SPARE + len(embeds)] = embeds
    engines = []
    for lm in (plain, oracle):
        kw = dict(max_num_seqs=4, num_pages=16)
        if gpu_twin:
            runner = GPUModelRunner(lm, max_num_batched_tokens=256, max_model_len=256, xp=np, **kw)
            engines.append(LLMEngine(lm, runner=runner, **kw))
        else:
            engines.append(LLMEngine(lm, **kw))
    return engines


@pytest.mark.parametrize("w_bit", [16, 8, 4])
@pytest.mark.parametrize("gpu_twin", [False, True])
def test_spliced_prefill_equals_embedding_rows(tmp_path, gpu_twin, w_bit):
    """Float (w16a16), W8A8KV8 and W4A8KV4 LLMs, on the reference runner and the GPU runner's twin."""
    root = write_vila(tmp_path / "v", llm=llm_config(head_dim=64, num_attention_heads=1, hidden_size=64))
    llm_dir = root / "llm" if w_bit == 16 else quantize_llm(root / "llm", tmp_path / f"w{w_bit}", w_bit)
    rng = np.random.default_rng(5)
    images = [(0.5 * rng.standard_normal((9, 64))).astype(np.float16).astype(np.float32) for _ in range(2)]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    prompts = [[7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 11, 12], [5, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 13]]
    starts = [1, 2]
    spliced, oracle = _oracle_pair(llm_dir, gpu_twin, np.concatenate(images))
    for i, (prompt, s) in enumerate(zip(prompts, starts, strict=True)):
        spliced.add_request(prompt, params, request_id=f"s{i}",
                            prompt_embeds=PromptEmbeds(np.arange(s, s + 9), images[i]))
        forced = list(prompt)
        forced[s : s + 9] = range(SPARE + 9 * i, SPARE + 9 * i + 9)
        oracle.add_request(forced, params, request_id=f"s{i}")
        spliced.add_request(prompt, params, request_id=f"p{i}")  # no embeddings: the placeholders' own
    got = {o.request_id: o.outputs[0].token_ids for o in _run(spliced)}
    want = {o.request_id: o.outputs[0].token_ids for o in _run(oracle)}
    assert got["s0"] == want["s0"] and got["s1"] == want["s1"]
    assert got["p0"] != got["s0"]  # the embeddings are what the model saw
    assert spliced.num_prompt_tokens == 4 * 12  # every image position counts as a prompt token


def _run(engine):
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.finished]
    return outs


@pytest.mark.parametrize("precision", ["w16a16", "w16a16kv8", "w16a16kv4"])
def test_vlm_engine_batch_independent(tmp_path, precision):
    """Captions of an image do not depend on which images share its batch or when it was admitted."""
    loaded = load_vila(write_vila(tmp_path / "v"), precision=precision)
    vlm = build_vlm_engine(loaded, device="cpu", max_num_seqs=3, num_pages=32)
    prompt = vlm.prompt_ids("<image> Describe.")
    rng = np.random.default_rng(0)
    pix = [rng.uniform(-1, 1, (3, 70, 70)).astype(np.float32) for _ in range(7)]
    params = SamplingParams(max_tokens=6, ignore_eos=True)

    def caption(order, refill):
        got = {}
        vlm.generate([ImageItem(str(i), pix[i]) for i in order], params, prompt,
                     lambda k, o, e: got.__setitem__(k, o.outputs[0].token_ids), refill=refill)
        return got

    a, b = caption(range(7), 1), caption([6, 2, 4, 0, 1, 5, 3], 3)
    assert a == b and len(a) == 7 and len({tuple(v) for v in a.values()}) > 1
