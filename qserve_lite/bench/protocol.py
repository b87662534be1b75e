"""The measured loop of the throughput benchmark: queue token-id requests, step the engine until every one is
done, and time each step (prefill or decode) on the host clock.

Each step ends with the sampled token ids reaching the host (the device greedy sampler copies only them),
so a step's host time covers its GPU work: no extra synchronization is added inside the loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from qserve_lite.sampling_params import SamplingParams

MODES = ("static", "ifb")


@dataclass
class StepLog:
    kinds: list[str] = field(default_factory=list)  # "prefill" | "decode", in order
    batch_sizes: list[int] = field(default_factory=list)  # sequences in each step
    seconds: list[float] = field(default_factory=list)
    wall_s: float = 0.0  # first step's start to last step's end (device synchronized at both ends)
    generated: int = 0  # tokens sampled by the steps (one per sequence per step)

    def add(self, kind: str, batch: int, seconds: float) -> None:
        self.kinds.append(kind)
        self.batch_sizes.append(batch)
        self.seconds.append(seconds)

    def total(self, kind: str) -> float:
        return float(sum(s for k, s in zip(self.kinds, self.seconds, strict=True) if k == kind))

    def count(self, kind: str) -> int:
        return self.kinds.count(kind)

    def all_admitted_before_decode(self, num_requests: int) -> bool:
        """Static batching held: no prefill after the first decode, and that decode ran every request."""
        if "decode" not in self.kinds:
            return True
        first = self.kinds.index("decode")
        return "prefill" not in self.kinds[first:] and self.batch_sizes[first] == num_requests


def random_prompts(rng: np.random.Generator, n: int, length: int, vocab_size: int) -> list[list[int]]:
    return [rng.integers(0, vocab_size, size=length).tolist() for _ in range(n)]


def generation_lengths(mode: str, n: int, gen: int, rng: np.random.Generator) -> list[int]:
    """static: every request generates `gen` tokens. ifb: uniform in [gen // 2, gen + gen // 2] (mean gen,
    seeded), so sequences finish at different steps and freed slots are refilled while others decode."""
    if mode == "static":
        return [gen] * n
    lo, hi = max(1, gen // 2), longest_generation(mode, gen)
    return rng.integers(lo, hi + 1, size=n).tolist()


def longest_generation(mode: str, gen: int) -> int:
    """The most tokens one request of `mode` generates (what its KV pages must hold)."""
    return gen if mode == "static" else max(1, gen + gen // 2)


def synchronizer(xp) -> Callable[[], None]:
    if xp is np:
        return lambda: None
    return lambda: xp.cuda.Device().synchronize()


def run_requests(engine, prompts: list[list[int]], gens: list[int], sync: Callable[[], None]) -> StepLog:
    """Queue every prompt (greedy, exactly gens[i] tokens: EOS ignored) and step the engine until all are
    done; returns the per-step timings."""
    for prompt, gen in zip(prompts, gens, strict=True):
        engine.add_request(prompt, SamplingParams(max_tokens=gen, ignore_eos=True), stream=False)
    log = StepLog()
    generated0 = engine.num_generated_tokens
    sync()
    start = time.perf_counter()
    while engine.has_unfinished():
        prompt_tokens, steps = engine.num_prompt_tokens, engine.num_steps
        t0 = time.perf_counter()
        engine.step()
        seconds = time.perf_counter() - t0
        if engine.num_steps == steps:  # only collected the tokens of the last batch: part of that step
            log.seconds[-1] += seconds
            continue
        kind = "prefill" if engine.num_prompt_tokens != prompt_tokens else "decode"
        log.add(kind, engine.last_batch_size, seconds)
    sync()
    log.wall_s = time.perf_counter() - start
    log.generated = engine.num_generated_tokens - generated0
    return log
