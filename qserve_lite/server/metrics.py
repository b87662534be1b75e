"""Serving metrics in the Prometheus text exposition format (version 0.0.4), written by hand so the server
needs no prometheus_client.

The engine thread records tokens and latencies as they happen; gauges (running / waiting requests, KV cache
usage) are read from the engine when /metrics is scraped. One lock guards the counters and histograms.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Sequence

PREFIX = "qserve_lite"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
ITL_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0)


def _fmt(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Histogram:
    """Cumulative-bucket histogram; `observe` is O(log buckets)."""

    def __init__(self, name: str, help_text: str, buckets: Sequence[float]):
        self.name, self.help = name, help_text
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += times
        self.sum += value * times
        self.count += times

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cum = 0
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            cum += n
            lines.append(f'{self.name}_bucket{{le="{_fmt(bound)}"}} {cum}')
        lines += [f"{self.name}_sum {_fmt(self.sum)}", f"{self.name}_count {self.count}"]
        return lines


class ServerMetrics:
    """What /metrics reports. `gauges` is called at scrape time and returns (running, waiting, kv usage)."""

    def __init__(self, gauges: Callable[[], tuple[int, int, float]] | None = None):
        self._lock = threading.Lock()
        self.gauges = gauges or (lambda: (0, 0, 0.0))
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: dict[str, int] = {}  # finish reason -> requests
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Time from arrival to the first generated token.",
            TTFT_BUCKETS,
        )
        self.itl = Histogram(
            f"{PREFIX}_inter_token_latency_seconds",
            "Time between two generated tokens of one request.",
            ITL_BUCKETS,
        )
        self.e2e = Histogram(
            f"{PREFIX}_e2e_request_latency_seconds", "Time from arrival to the end of a request.", E2E_BUCKETS
        )

    def on_admit(self, num_prompt_tokens: int) -> None:
        with self._lock:
            self.prompt_tokens += num_prompt_tokens

    def on_tokens(self, n: int, ttft: float | None, itl: float | None) -> None:
        """n new tokens of one request: ttft set for its first token, itl (per token) for later ones."""
        with self._lock:
            self.generation_tokens += n
            if ttft is not None:
                self.ttft.observe(ttft)
                n -= 1
            if itl is not None and n > 0:
                self.itl.observe(itl, n)

    def on_finish(self, reason: str, e2e: float) -> None:
        with self._lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1
            self.e2e.observe(e2e)

    def render(self) -> str:
        running, waiting, kv_usage = self.gauges()
        p = PREFIX
        lines = [
            f"# HELP {p}_num_requests_running Requests in the running batch (holding KV pages).",
            f"# TYPE {p}_num_requests_running gauge",
            f"{p}_num_requests_running {running}",
            f"# HELP {p}_num_requests_waiting Requests queued for admission (new or preempted).",
            f"# TYPE {p}_num_requests_waiting gauge",
            f"{p}_num_requests_waiting {waiting}",
            f"# HELP {p}_kv_cache_usage_perc Fraction of KV cache pages in use (0..1).",
            f"# TYPE {p}_kv_cache_usage_perc gauge",
            f"{p}_kv_cache_usage_perc {_fmt(kv_usage)}",
        ]
        with self._lock:
            lines += [
                f"# HELP {p}_prompt_tokens_total Prompt tokens of admitted requests.",
                f"# TYPE {p}_prompt_tokens_total counter",
                f"{p}_prompt_tokens_total {self.prompt_tokens}",
                f"# HELP {p}_generation_tokens_total Generated tokens.",
                f"# TYPE {p}_generation_tokens_total counter",
                f"{p}_generation_tokens_total {self.generation_tokens}",
                f"# HELP {p}_request_finished_total Finished requests by finish reason.",
                f"# TYPE {p}_request_finished_total counter",
            ]
            for reason in sorted(self.finished):
                lines.append(
                    f'{p}_request_finished_total{{finished_reason="{reason}"}} {self.finished[reason]}'
                )
            for hist in (self.ttft, self.itl, self.e2e):
                lines += hist.render()
        return "\n".join(lines) + "\n"
