"""LLMEngine: requests in, one batch per step(), outputs back.

add_request tokenizes and queues; step() asks the scheduler for a batch, has the runner compute the next
logits, samples, then appends each token, detokenizes, checks the stop conditions and frees what
finished. The runner is the only device-specific part (numpy here, CuPy on the GPU).

Overlapped steps (EngineConfig.async_scheduling, on by default): the GPU runner reads each decode input
token from its per-slot state on the device, and the sampler can choose tokens there. A decode batch whose
rows need nothing from the host is then left in flight: its tokens are written to that state and copied to
the host behind the step, and the next step() schedules and queues the following batch before it waits for
them. Meanwhile the host appends, detokenizes and checks the stops of the batch before. Each sequence holds
the tokens still in flight as `num_pending`: its length (positions, pages) counts them. A sequence that
stopped on a token is found one step late and runs one extra step, whose token is discarded; one that ends
by length (max_tokens, max_model_len) is never scheduled past its end. Admission and preemption (which need
every token on the host), penalties and logprobs wait for the batch in flight first.

A model without a tokenizer (LLMEngine(None, runner=...) over random device weights, bench/) takes token-id
prompts only; its outputs carry token ids and no text, and EOS comes from the config. Given a tokenizer
(LLMEngine(None, runner=..., tokenizer=...): random weights served with a real vocabulary,
engine/random_engine.py), it takes text and detokenizes as a loaded model does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qserve_lite.core.backend import HostCopy
from qserve_lite.core.kv_layout import PAGE_SIZE
from qserve_lite.core.threads import BlasThreads
from qserve_lite.engine.block_manager import BlockManager
from qserve_lite.engine.config import EngineConfig
from qserve_lite.engine.gpu_model_runner import GPUModelRunner
from qserve_lite.engine.model_runner import ModelRunner, default_num_pages
from qserve_lite.engine.sampler import Sampler, SamplerOutput
from qserve_lite.engine.scheduler import Scheduler
from qserve_lite.engine.sequence import PromptEmbeds, Sequence, SequenceStatus
from qserve_lite.engine.tensor_parallel import tp_runner
from qserve_lite.errors import QServeLiteError, SamplingError
from qserve_lite.io.loader import LoadedModel
from qserve_lite.model.tokenizer import IncrementalDetokenizer
from qserve_lite.outputs import CompletionOutput, RequestOutput
from qserve_lite.sampling_params import SamplingParams


def check_max_tokens(max_tokens: int | None, max_model_len: int) -> None:
    """The rule every front applies to a request's max_tokens (the server's 400, the CLI's error): at most
    max_model_len, which counts prompt + output, so more could never be generated. None (not given) passes;
    the engine itself only caps generation at max_model_len. SamplingError otherwise."""
    if max_tokens is not None and max_tokens > max_model_len:
        raise SamplingError(
            f"max_tokens is {max_tokens}, but this model's maximum context length is {max_model_len} tokens "
            "(prompt + output)"
        )


@dataclass
class _Launched:
    """A batch queued on the runner: its tokens on their way to the host (host_tokens), or already chosen
    there (sampled)."""

    seqs: list[Sequence]
    host_tokens: HostCopy | None
    sampled: SamplerOutput | None


class LLMEngine:
    """One engine over one model. `config` (an EngineConfig, plus field overrides as keywords) says how it
    runs; max_model_len (prompt + output tokens per sequence) defaults to the model's context, capped to
    what the page pool and one prefill step can hold; given explicitly, it must fit both. The resolved
    settings are `engine_config`; `config` is the model's ModelConfig.

    loaded: the model (config, weights, tokenizer, precision), or None with a prebuilt `runner` (which then
    provides the config as `runner.cfg`, and its page count as `runner.num_pages` unless num_pages is given),
    and optionally a `tokenizer` whose ids fit the runner's vocabulary."""

    def __init__(self, loaded: LoadedModel | None, config: EngineConfig | None = None, *, runner=None,
                 tokenizer=None, **overrides):
        config = (config or EngineConfig()).replace(**overrides)
        if loaded is None and runner is None:
            raise QServeLiteError("LLMEngine needs a loaded model, or a runner built from device weights")
        cfg = loaded.config if loaded is not None else runner.cfg
        if loaded is not None:
            tokenizer = loaded.tokenizer
        elif tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
            raise QServeLiteError(
                f"the tokenizer has {tokenizer.vocab_size} tokens, more than the model's vocabulary "
                f"({cfg.vocab_size}): build the weights with vocab_size = the tokenizer's"
            )
        if config.max_model_len is not None and config.max_model_len > cfg.max_position_embeddings:
            raise QServeLiteError(
                f"max_model_len must be in 2..{cfg.max_position_embeddings} (the model's context), "
                f"got {config.max_model_len}"
            )
        limit = config.max_model_len or cfg.max_position_embeddings
        config = config.replace(max_num_batched_tokens=config.batched_tokens_for(limit))
        if runner is None:
            runner = self._build_runner(loaded, config, limit)
        num_pages = config.num_pages if config.num_pages is not None else getattr(runner, "num_pages", None)
        if num_pages is None:
            raise QServeLiteError("give num_pages along with a custom runner")
        fits = min(num_pages * PAGE_SIZE, config.max_num_batched_tokens)
        if config.max_model_len is not None and config.max_model_len > fits:
            raise QServeLiteError(
                f"max_model_len {config.max_model_len} does not fit: {num_pages} pages hold "
                f"{num_pages * PAGE_SIZE} tokens and max_num_batched_tokens is "
                f"{config.max_num_batched_tokens}. A preempted sequence is prefilled again whole, so both "
                "must hold max_model_len tokens: raise num_pages and max_num_batched_tokens, or lower "
                "max_model_len"
            )
        self.max_model_len = min(limit, fits)
        self.engine_config = config.replace(num_pages=num_pages, max_model_len=self.max_model_len)
        self.loaded = loaded
        self.config = cfg
        self.tokenizer = tokenizer
        self.vocab_size = cfg.vocab_size
        self.block_manager = BlockManager(num_pages, PAGE_SIZE, config.watermark)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.max_model_len)
        self.runner = runner
        on_cpu = getattr(runner, "xp", np) is np
        # numpy's BLAS threads on the CPU: the cores other processes leave free, unless the user set them
        self.blas_threads = BlasThreads.for_cpu_engine() if on_cpu else BlasThreads.off()
        self.sampler = Sampler(getattr(self.runner, "xp", np))
        self.rng = np.random.default_rng(config.seed)  # seeds the generators of requests without a seed
        self.seqs: dict[str, Sequence] = {}  # unfinished requests by id
        self._next_seq_id = 0
        self.num_steps = self.num_prompt_tokens = self.num_generated_tokens = 0
        self._in_flight: _Launched | None = None  # a batch whose tokens are still on the device
        self.last_batch_size = 0  # sequences in the batch the last step() queued

    @staticmethod
    def _build_runner(loaded: LoadedModel, config: EngineConfig, limit: int):
        """The runner of config.device ('cpu' or 'gpu'; 'auto' is resolved by the caller)."""
        if config.tensor_parallel_size > 1:
            if config.device != "gpu":
                raise QServeLiteError(f"tensor_parallel_size {config.tensor_parallel_size} runs on GPUs: use "
                                      "device 'gpu'")
            return tp_runner(loaded, config.replace(max_model_len=limit))
        if config.device == "gpu":  # the CuPy runner sizes its page pool from free GPU memory
            return GPUModelRunner(loaded, config.replace(max_model_len=limit))
        if config.device != "cpu":
            raise QServeLiteError(f"LLMEngine device must be 'cpu' or 'gpu', got {config.device!r}")
        kv_bits = loaded.precision.kv_bits
        num_pages = config.num_pages
        if num_pages is None:
            num_pages = default_num_pages(loaded.model, kv_bits, config.max_num_seqs, limit)
        return ModelRunner(loaded.model, num_pages, kv_bits)

    # ---- requests ----

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        stream: bool = True,
        prompt_embeds: PromptEmbeds | None = None,
    ) -> str:
        """Queue a prompt (text, or token ids); returns its request id. stream: step() reports this request
        after every token (False: only when it finishes). prompt_embeds: embeddings that replace the token
        embeddings at some prompt positions (a VLM's image tokens; arrays of the runner's module)."""
        params = params or SamplingParams()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise QServeLiteError("this model has no tokenizer: give the prompt as a list of token ids")
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise QServeLiteError(
                    f"prompt token ids {bad[:5]} are outside the vocabulary (0..{self.vocab_size - 1})"
                )
        if not ids:
            raise QServeLiteError("the prompt is empty: give at least one token")
        if len(ids) >= self.max_model_len:
            raise QServeLiteError(self._prompt_too_long(len(ids)))
        if prompt_embeds is not None:
            prompt_embeds.check(len(ids), self.config.hidden_size)
        request_id = str(self._next_seq_id) if request_id is None else str(request_id)
        if request_id in self.seqs:
            raise QServeLiteError(f"request id {request_id!r} is already in use")
        seed = params.seed if params.seed is not None else int(self.rng.integers(2**63))
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            eos = self.tokenizer.eos_token_ids if self.tokenizer is not None else self.config.eos_token_ids
            stop_ids |= set(eos)
        seq = Sequence(
            self._next_seq_id,
            request_id,
            ids,
            params,
            np.random.default_rng(seed),
            prompt=text,
            detokenizer=IncrementalDetokenizer(self.tokenizer) if self.tokenizer is not None else None,
            stop_ids=frozenset(stop_ids),
        )
        seq.stream = stream
        seq.prompt_embeds = prompt_embeds
        self._next_seq_id += 1
        self.seqs[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def _prompt_too_long(self, n: int) -> str:
        """What to do about a prompt of n >= max_model_len tokens (names the settings and their CLI flags)."""
        context = self.config.max_position_embeddings
        if self.max_model_len >= context:
            return (f"the prompt has {n} tokens; at most {self.max_model_len - 1} fit (max_model_len "
                    f"{self.max_model_len}, the model's context, counts prompt + output). Shorten it")
        return (f"the prompt has {n} tokens; at most {self.max_model_len - 1} fit (max_model_len "
                f"{self.max_model_len} counts prompt + output). Shorten it, or raise max_model_len "
                f"(--max-model-len, up to the model's context of {context} tokens) and, if the KV cache "
                "cannot hold that, num_pages (--num-pages)")

    def abort(self, request_id: str) -> bool:
        """Stop a request now (waiting or running) and free its pages; False if it is not in flight."""
        seq = self.seqs.pop(str(request_id), None)
        if seq is None:
            return False
        self.scheduler.finish(seq, "abort")
        return True

    def abort_all(self) -> None:
        """Abort every request and start again from an empty page pool with every slot free. Unlike abort(),
        this is safe after a step() that was interrupted (KeyboardInterrupt) halfway through its bookkeeping:
        nothing of the old pool's or scheduler's state is reused."""
        for seq in self.seqs.values():
            seq.status, seq.finish_reason = SequenceStatus.FINISHED, "abort"
            seq.block_table, seq.slot, seq.num_pending, seq.num_cached_tokens = [], None, 0, 0
        self.seqs.clear()
        self._in_flight = None
        config, preemptions = self.engine_config, self.scheduler.num_preemptions
        self.block_manager = BlockManager(self.block_manager.num_pages, PAGE_SIZE, config.watermark)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.max_model_len)
        self.scheduler.num_preemptions = preemptions

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    # ---- the step ----

    def step(self) -> list[RequestOutput]:
        """Queue one batch on the runner and collect the tokens of the batch before it; returns the state of
        every streamed request that got a token and of every request that finished.

        Overlapped (module docstring): a decode batch whose tokens can be chosen on the device is left in
        flight, and the next step() schedules and queues the following batch before it waits for these
        tokens, so the device never waits for the host's bookkeeping. Anything that needs every token on
        the host (admission, preemption, penalties, logprobs, a custom sampler) waits for the batch in
        flight first."""
        outputs = []
        previous, self._in_flight = self._in_flight, None
        if previous is not None and self.scheduler.needs_host_state():
            outputs += self._collect(previous)
            previous = None
        batch = self.scheduler.schedule()
        overlap = batch is not None and self._overlappable(batch)
        if previous is not None and not overlap:  # this batch needs the tokens in flight on the host
            outputs += self._collect(previous)
            previous = None
        launched = self._launch(batch, overlap) if batch is not None else None
        if previous is not None:
            outputs += self._collect(previous)
        if launched is not None and overlap:
            self._in_flight = launched
        elif launched is not None:
            outputs += self._collect(launched)
        return outputs

    def _overlappable(self, batch) -> bool:
        """The batch's tokens can be chosen and fed to the next step on the device: a decode step, on a
        runner that reads its decode inputs from the device, with the built-in sampler and rows that need
        nothing from the host (no penalties, no logprobs)."""
        return (
            self.engine_config.async_scheduling
            and not batch.is_prefill
            and hasattr(self.runner, "store_tokens")
            and type(self.sampler) is Sampler
            and Sampler.on_device(batch.seqs)
        )

    def _launch(self, batch, overlap: bool) -> _Launched | None:
        """Run the batch and choose its tokens: on the device and left in flight when `overlap`, else on
        the host (sampled)."""
        seqs = [s for s in batch.seqs if not s.is_finished]  # a token just collected may have ended one
        if not seqs:
            return None
        self.blas_threads.before_step()
        logits = self.runner.run(seqs, batch.is_prefill)
        self.num_steps += 1
        self.last_batch_size = len(seqs)
        if batch.is_prefill:
            self.num_prompt_tokens += batch.num_tokens
        device_tokens = hasattr(self.runner, "store_tokens")
        if overlap:
            token_ids = self.sampler.choose(logits, seqs)
            self.runner.store_tokens(seqs, token_ids)
            launched = _Launched(seqs, HostCopy(token_ids), None)
        else:
            sampled = self.sampler(logits, seqs)
            if device_tokens:
                self.runner.store_tokens(seqs, sampled.token_ids)
            launched = _Launched(seqs, None, sampled)
        for seq in seqs:
            seq.num_cached_tokens = len(seq)  # the runner wrote K/V of every token so far
            seq.num_pending += 1
        return launched

    def _collect(self, launched: _Launched) -> list[RequestOutput]:
        """Append the batch's tokens (waiting for them if they are still on the device), check the stop
        conditions; the outputs of streamed and finished requests."""
        if launched.sampled is not None:
            token_ids, logprobs = launched.sampled.token_ids, launched.sampled.logprobs
        else:
            token_ids, logprobs = launched.host_tokens.wait().tolist(), [None] * len(launched.seqs)
        outputs = []
        for seq, token, lp in zip(launched.seqs, token_ids, logprobs, strict=True):
            if seq.is_finished:  # aborted, or stopped by the token before: this one is discarded
                continue
            seq.num_pending -= 1
            self._append(seq, token, lp)
            self.num_generated_tokens += 1
            if seq.is_finished:
                self.seqs.pop(seq.request_id, None)
                outputs.append(self.output_of(seq))
            elif seq.stream:
                outputs.append(self.output_of(seq))
        return outputs

    def _append(self, seq: Sequence, token: int, logprobs: dict[int, float] | None) -> None:
        params = seq.params
        if token in seq.stop_ids:
            self._finish(seq, "stop", token)
            return
        old_len = len(seq.text)
        seq.append_token(token, logprobs)
        if params.stop:
            start = max(0, old_len - max(len(s) for s in params.stop) + 1)
            hits = [(i, s) for s in params.stop if (i := seq.text.find(s, start)) >= 0]
            if hits:
                i, s = min(hits)
                seq.text = seq.text[:i]
                self.scheduler.finish(seq, "stop", s)
                return
        if seq.num_output_tokens >= params.max_tokens or len(seq.token_ids) >= self.max_model_len:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | None = None) -> None:
        self.scheduler.finish(seq, reason, stop_reason)
        if self.tokenizer is None:
            return
        # the incremental text holds back incomplete characters; the final text is the full decode
        full = self.tokenizer.decode(seq.output_token_ids)
        if full.startswith(seq.text):
            seq.text = full

    @staticmethod
    def output_of(seq: Sequence) -> RequestOutput:
        completion = CompletionOutput(
            index=0,
            text=seq.visible_text(),
            token_ids=seq.output_token_ids,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
        )
        return RequestOutput(
            seq.request_id,
            seq.prompt,
            seq.token_ids[: seq.num_prompt_tokens],
            [completion],
            finished=seq.is_finished,
            num_preemptions=seq.num_preemptions,
        )
