"""Where a decode step's time goes, with CUDA graphs on and off (benchmarks/decode_step_split.py).

A batch of sequences is prefilled once; then decode steps run through the real engine (scheduler, input
preparation, runner, device greedy sampler), alternating graph replay and eager launches step by step so
both modes see the same context lengths. Per step:

- wall: engine.step() start to end on the host clock (the step ends with the sampled ids on the host, so
  its GPU work is included);
- host: engine.step() start until GPUModelRunner.run returns, i.e. the scheduler, input preparation and
  the launches (graph launch, or every kernel launch in eager mode) on the host thread's clock;
- gpu: CUDA events recorded on the current stream just before and just after runner.run; in eager mode
  this includes the GPU waiting for launches still being issued (None on numpy).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from qserve_lite.sampling_params import SamplingParams


@dataclass
class StepTimes:
    wall_ms: list[float] = field(default_factory=list)
    host_ms: list[float] = field(default_factory=list)
    gpu_ms: list[float | None] = field(default_factory=list)

    def summary(self) -> dict:
        def stats(values, name):
            vals = [v for v in values if v is not None]
            if not vals:
                return {f"{name}_ms_median": None, f"{name}_ms_mean": None}
            return {f"{name}_ms_median": round(float(np.median(vals)), 4),
                    f"{name}_ms_mean": round(float(np.mean(vals)), 4)}

        return stats(self.wall_ms, "wall") | stats(self.host_ms, "host") | stats(self.gpu_ms, "gpu")


class _TimedRun:
    """Replaces runner.run: records CUDA events around it and the host time at which it returns."""

    def __init__(self, runner):
        self.runner, self.run = runner, runner.run
        self.on_device = runner.xp is not np
        self.returned_at = 0.0
        self.events = None

    def __call__(self, seqs, is_prefill):
        if self.on_device:
            start, end = self.runner.xp.cuda.Event(), self.runner.xp.cuda.Event()
            start.record()
        logits = self.run(seqs, is_prefill)
        if self.on_device:
            end.record()
            self.events = (start, end)
        self.returned_at = time.perf_counter()
        return logits

    def gpu_ms(self) -> float | None:
        if self.events is None:
            return None
        start, end = self.events
        end.synchronize()
        return float(self.runner.xp.cuda.get_elapsed_time(start, end))


def prefill_batch(engine, batch: int, prompt_len: int, max_tokens: int, seed: int = 0) -> None:
    """Queue `batch` random prompts (each to generate max_tokens, EOS ignored) and run every prefill step."""
    rng = np.random.default_rng(seed)
    vocab = engine.vocab_size
    for _ in range(batch):
        engine.add_request(rng.integers(0, vocab, size=prompt_len).tolist(),
                           SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    while engine.scheduler.waiting:
        engine.step()


def measure_decode_steps(engine, runner, steps: int, warmup: int = 3) -> dict[bool, StepTimes]:
    """Alternate graph and eager decode steps (`warmup` of each untimed first, which captures the graph);
    returns {cuda_graphs: StepTimes}. On numpy (no graphs) only eager steps run."""
    timed, had_own_run = _TimedRun(runner), "run" in vars(runner)
    runner.run = timed
    modes = [True, False] if runner.graph_stream is not None else [False]
    times = {mode: StepTimes() for mode in modes}
    try:
        for i in range(warmup + steps):
            for mode in modes:
                runner.cuda_graphs = mode
                prompt_tokens = engine.num_prompt_tokens
                t0 = time.perf_counter()
                engine.step()
                wall = time.perf_counter() - t0
                assert engine.num_prompt_tokens == prompt_tokens, "a prefill step ran inside the decode steps"
                if i >= warmup:
                    times[mode].wall_ms.append(1e3 * wall)
                    times[mode].host_ms.append(1e3 * (timed.returned_at - t0))
                    times[mode].gpu_ms.append(timed.gpu_ms())
    finally:
        if had_own_run:
            runner.run = timed.run
        else:
            del runner.run
        runner.cuda_graphs = runner.graph_stream is not None
    return times
