"""LLM: the offline front. `generate` a batch of prompts, `chat` over conversations, `stream` one answer.

    from qserve_lite import LLM, SamplingParams
    llm = LLM("smollm2-135m")
    out = llm.generate(["The capital of France is", "1, 2, 3,"], SamplingParams(max_tokens=16))
    print(out[0].text)

Every call goes through the same in-flight batching engine (engine/llm_engine.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np

from qserve_lite.core.backend import resolve_device
from qserve_lite.engine.config import EngineConfig
from qserve_lite.engine.llm_engine import LLMEngine
from qserve_lite.engine.tensor_parallel import check_model_splits
from qserve_lite.errors import QServeLiteError
from qserve_lite.io.default_models import DEFAULT_MODEL
from qserve_lite.io.loader import load_model
from qserve_lite.outputs import RequestOutput
from qserve_lite.sampling_params import SamplingParams

log = logging.getLogger(__name__)

Prompt = str | list[int]
Conversation = list[dict]


def _is_token_ids(p) -> bool:
    if isinstance(p, np.ndarray):
        return p.ndim == 1 and np.issubdtype(p.dtype, np.integer)
    return isinstance(p, (list, tuple)) and all(isinstance(t, (int, np.integer)) for t in p)


def _as_prompt_list(prompts) -> list[Prompt]:
    """One prompt (text or token ids) or a list of them -> a list of prompts."""
    if isinstance(prompts, str) or (_is_token_ids(prompts) and len(prompts)):
        return [prompts if isinstance(prompts, str) else [int(t) for t in prompts]]
    prompts = list(prompts)
    for p in prompts:
        if not isinstance(p, str) and not _is_token_ids(p):
            raise QServeLiteError(
                f"a prompt is a string or a list of token ids, got {type(p).__name__}: {p!r:.80}"
            )
    return [p if isinstance(p, str) else [int(t) for t in p] for p in prompts]


def _as_params_list(params, n: int) -> list[SamplingParams]:
    if params is None or isinstance(params, SamplingParams):
        return [params or SamplingParams()] * n
    params = list(params)
    if len(params) != n:
        raise QServeLiteError(
            f"got {len(params)} SamplingParams for {n} prompts; give one, or one per prompt"
        )
    return params


class LLM:
    """Load a model and serve it through the engine.

    model: built-in alias, model directory, .gguf file or hub id. precision: see core/precision.py
    (None = the model's own). config: an EngineConfig (engine/config.py); its fields may also be given as
    keywords, which override it: max_num_seqs (sequences in flight at once), max_num_batched_tokens (tokens
    per prefill step), num_pages (64-token KV pages; default: what 2 GiB holds on the CPU), max_model_len
    (prompt + output tokens per sequence; default: the model's context, capped to what fits), seed (seeds
    requests that have no seed of their own), gpu_memory_utilization, cuda_graphs, tensor_parallel_size (GPUs
    the model is split over, one process each: a script must guard its entry point with
    `if __name__ == "__main__":`), and device: 'cpu'
    (numpy), 'gpu' (CuPy; the KV pool takes gpu_memory_utilization of the device's memory unless num_pages
    or NUM_GPU_PAGE_BLOCKS is set) or 'auto' (the GPU when cupy sees one and its kernels can run the model,
    else the CPU).
    """

    def __init__(self, model: str = DEFAULT_MODEL, precision: str | None = None, *,
                 config: EngineConfig | None = None, **engine_options):
        config = (config or EngineConfig()).replace(**engine_options)
        self.device = resolve_device(config.device)  # before loading: a missing GPU fails fast
        check_model_splits(model, config.tensor_parallel_size, self.device)  # shapes that cannot split, too
        self.loaded = load_model(model, precision=precision)
        self.tokenizer = self.loaded.tokenizer
        self.precision = self.loaded.precision
        try:
            self.engine = LLMEngine(self.loaded, config.replace(device=self.device))
        except QServeLiteError as e:
            if config.device != "auto" or self.device != "gpu" or config.tensor_parallel_size > 1:
                raise
            # auto: a model the GPU kernels cannot run (head_dim, channel counts) runs on the CPU instead
            log.warning("device auto: the GPU runner cannot take this model (%s); running on the CPU", e)
            self.device = "cpu"
            self.engine = LLMEngine(self.loaded, config.replace(device="cpu"))

    @classmethod
    def from_engine(cls, engine: LLMEngine, precision=None) -> LLM:
        """An LLM over an engine built elsewhere (random weights: engine/random_engine.py)."""
        llm = cls.__new__(cls)
        llm.engine, llm.loaded, llm.tokenizer = engine, None, engine.tokenizer
        llm.precision = precision
        llm.device = "cpu" if getattr(engine.runner, "xp", np) is np else "gpu"
        return llm

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Complete every prompt (text or token ids); outputs in prompt order."""
        prompts = _as_prompt_list(prompts)
        return self._run(prompts, _as_params_list(params, len(prompts)), use_tqdm)

    def chat(
        self,
        conversations: Conversation | Sequence[Conversation],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Answer each conversation ([{"role": ..., "content": ...}, ...]) with the model's chat template."""
        convs = list(conversations)
        if convs and isinstance(convs[0], dict):
            convs = [convs]
        prompts = [self.tokenizer.encode_chat(c) for c in convs]
        return self._run(prompts, _as_params_list(params, len(prompts)), use_tqdm)

    def stream(self, prompt: Prompt | Conversation, params: SamplingParams | None = None) -> TextStream:
        """Iterator of text pieces as they are generated; a conversation (list of messages) is rendered with
        the chat template. After the loop, `.output` holds the final RequestOutput."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            prompt = self.tokenizer.encode_chat(prompt)
        return TextStream(self.engine, self.engine.add_request(prompt, params))

    def _run(
        self, prompts: list[Prompt], params: list[SamplingParams], use_tqdm: bool
    ) -> list[RequestOutput]:
        from tqdm.auto import tqdm

        engine = self.engine
        ids: list[str] = []
        try:
            for prompt, p in zip(prompts, params, strict=True):
                ids.append(engine.add_request(prompt, p, stream=False))
            done: dict[str, RequestOutput] = {}
            wanted = set(ids)
            generated0 = engine.num_generated_tokens
            with tqdm(total=len(ids), desc="generate", unit="req", disable=not use_tqdm) as bar:
                while len(done) < len(ids):
                    for out in engine.step():
                        if out.finished and out.request_id in wanted:
                            done[out.request_id] = out
                            bar.update(1)
                    generated = engine.num_generated_tokens - generated0
                    bar.set_postfix(
                        tok_s=f"{generated / max(bar.format_dict['elapsed'], 1e-9):.1f}", refresh=False
                    )
            return [done[i] for i in ids]
        finally:
            for i in ids:  # on an error or interrupt, nothing of this call stays in flight
                engine.abort(i)


class TextStream:
    """Text deltas of one request; steps the shared engine (other requests in flight progress too).
    Leaving the loop early aborts the request."""

    def __init__(self, engine: LLMEngine, request_id: str):
        self.engine = engine
        self.request_id = request_id
        self.output: RequestOutput | None = None
        self._gen = self._pieces()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()

    def _pieces(self) -> Iterator[str]:
        sent = 0
        try:
            while self.output is None or not self.output.finished:
                if self.request_id not in self.engine.seqs:
                    raise QServeLiteError(f"request {self.request_id} was aborted")
                for out in self.engine.step():
                    if out.request_id != self.request_id:
                        continue
                    self.output = out
                    text = out.outputs[0].text
                    if len(text) > sent:
                        yield text[sent:]
                        sent = len(text)
        finally:
            self.engine.abort(self.request_id)
