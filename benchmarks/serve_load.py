"""Load generator for `qserve-lite serve` (or any OpenAI-compatible server): Poisson arrivals over a prompts
file, streamed requests, throughput and latency percentiles.

    qserve-lite serve --model smollm2-135m --no-access-log &
    python benchmarks/serve_load.py --rates 0.5 1 2 --num-requests 40 --max-tokens 32 --label cpu-2core

For each request rate: requests arrive as a Poisson process (exponential gaps, seeded), each one a prompt
from the file (cycled) sent with stream: true; at most --num-requests are sent and none after --duration
seconds; what is still running --drain seconds later is cancelled and counted as failed.
Per request the client records the time to the first token (TTFT: the first chunk that carries a generated
token; chat's opening role chunk does not count), the gaps between later token chunks (inter-token latency,
ITL: the server sends one chunk per engine step, i.e. per token) and the end-to-end time.
Reported per rate: request and output-token throughput over the run's wall time, TTFT / ITL / end-to-end
p50 and p99. Results: a table on stdout and JSON lines appended to
benchmarks/results/<date>-<label>-serve_load.jsonl (date, gpu = --label, git_sha, the workload, the numbers).
The client shares the machine with the server when both run on one host: say so in the label.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from qserve_lite.bench.results import git_sha  # noqa: E402  (the checkout's commit, +dirty)


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    start: float = 0.0
    ttft: float | None = None  # seconds from send to the first token chunk
    itls: list[float] = field(default_factory=list)  # gaps between token chunks
    e2e: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0


def read_prompts(path: Path) -> list[str]:
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        sys.exit(f"{path}: no prompts (one per line)")
    return prompts


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _token_chunk(res: RequestResult, chunk: dict, chat: bool) -> bool:
    """Whether a streamed chunk carries a generated token; its usage counts, if any, go into res."""
    if chunk.get("usage"):
        res.prompt_tokens = chunk["usage"]["prompt_tokens"]
        res.output_tokens = chunk["usage"]["completion_tokens"]
    if not chunk.get("choices"):
        return False
    if chat and "role" in (chunk["choices"][0].get("delta") or {}):
        return False  # the opening chunk, sent before any token
    return True


async def one_request(client, url: str, body: dict, chat: bool) -> RequestResult:
    res = RequestResult(start=time.perf_counter())
    last = None
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = str(chunk["error"].get("message"))[:200]
                    return res
                if not _token_chunk(res, chunk, chat):
                    continue
                now = time.perf_counter()
                if last is None:
                    res.ttft = now - res.start
                else:
                    res.itls.append(now - last)
                last = now
        res.e2e = time.perf_counter() - res.start
        res.ok = res.ttft is not None
        if not res.ok:
            res.error = "no token received"
    except asyncio.CancelledError:
        res.error = "cancelled (past --drain)"
    except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash of the run
        res.error = f"{type(e).__name__}: {e}"[:200]
    return res


async def run_rate(args, model: str, prompts: list[str], rate: float) -> tuple[list[RequestResult], float]:
    import httpx

    rng = np.random.default_rng(args.seed)
    chat = args.endpoint == "chat"
    url = args.url.rstrip("/") + ("/v1/chat/completions" if chat else "/v1/completions")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(None, connect=10.0)
    tasks: list[asyncio.Task] = []
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as client:
        t0 = time.perf_counter()
        next_at = t0
        for i in range(args.num_requests):
            if rate != math.inf:
                next_at += rng.exponential(1.0 / rate)
            if next_at - t0 > args.duration:
                break
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            prompt = prompts[i % len(prompts)]
            body = {
                "model": model,
                "max_tokens": args.max_tokens,
                "temperature": args.temperature,
                "ignore_eos": args.ignore_eos,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            body |= {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
            tasks.append(asyncio.create_task(one_request(client, url, body, chat)))
        done, pending = await asyncio.wait(tasks, timeout=args.drain) if tasks else (set(), set())
        for t in pending:
            t.cancel()
        results = [await t for t in tasks]
        wall = max((r.start + (r.e2e or 0.0) for r in results if r.ok), default=t0) - t0
    return results, wall


def summarize(results: list[RequestResult], wall: float) -> dict:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft * 1e3 for r in ok]
    itl = [g * 1e3 for r in ok for g in r.itls]
    e2e = [r.e2e * 1e3 for r in ok]
    out_tokens = sum(r.output_tokens for r in ok)
    wall = max(wall, 1e-9)
    return dict(
        requests=len(results),
        completed=len(ok),
        failed=len(results) - len(ok),
        errors=sorted({r.error for r in results if not r.ok})[:5],
        wall_s=round(wall, 3),
        request_throughput=len(ok) / wall,
        output_token_throughput=out_tokens / wall,
        total_token_throughput=(out_tokens + sum(r.prompt_tokens for r in ok)) / wall,
        prompt_tokens=sum(r.prompt_tokens for r in ok),
        output_tokens=out_tokens,
        ttft_ms_p50=percentile(ttft, 50),
        ttft_ms_p99=percentile(ttft, 99),
        ttft_ms_mean=float(np.mean(ttft)) if ttft else None,
        itl_ms_p50=percentile(itl, 50),
        itl_ms_p99=percentile(itl, 99),
        itl_ms_mean=float(np.mean(itl)) if itl else None,
        e2e_ms_p50=percentile(e2e, 50),
        e2e_ms_p99=percentile(e2e, 99),
    )


def fmt(x, digits=1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default: %(default)s)")
    ap.add_argument("--model", default=None, help="model name to request (default: the server's first)")
    ap.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    ap.add_argument("--prompts", type=Path, default=ROOT / "examples" / "prompts.txt", help="one per line")
    ap.add_argument("--rates", type=float, nargs="+", default=[1.0], help="requests/s (inf = all at once)")
    ap.add_argument("--num-requests", type=int, default=50, help="most requests sent per rate")
    ap.add_argument("--duration", type=float, default=120.0, help="no request is sent after this (s)")
    ap.add_argument("--drain", type=float, default=300.0, help="wait this long for the last ones (s)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="generate exactly --max-tokens per request (default: on)",
    )
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0, help="seeds the arrival times")
    ap.add_argument("--warmup", type=int, default=2, help="sequential requests before measuring")
    ap.add_argument("--api-key", default=None)
    ap.add_argument(
        "--label",
        default="unknown",
        help="where it ran, for the results file and the 'gpu' field (e.g. h100, cpu-2core)",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--no-save", action="store_true", help="print only")
    args = ap.parse_args(argv)

    import httpx

    prompts = read_prompts(args.prompts)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    models = httpx.get(args.url.rstrip("/") + "/v1/models", headers=headers, timeout=30).json()["data"]
    model = args.model or models[0]["id"]
    date, sha = dt.date.today().isoformat(), git_sha(ROOT)
    print(
        f"{args.url} model {model}, {args.endpoint}, max_tokens {args.max_tokens}, "
        f"{len(prompts)} prompts, label {args.label}, git {sha}, {date}",
        flush=True,
    )

    one = argparse.Namespace(**{**vars(args), "num_requests": 1, "duration": math.inf})
    for _ in range(args.warmup):  # one at a time, not measured
        asyncio.run(run_rate(one, model, prompts, math.inf))

    rows = []
    for rate in args.rates:
        results, wall = asyncio.run(run_rate(args, model, prompts, rate))
        row = summarize(results, wall)
        rows.append((rate, row))
        if not args.no_save:
            args.out.mkdir(parents=True, exist_ok=True)
            slug = args.label.lower().replace(" ", "-").replace("/", "-")
            obj = dict(
                date=date,
                gpu=args.label,
                git_sha=sha,
                bench="serve_load",
                url=args.url,
                model=model,
                endpoint=args.endpoint,
                rate=rate,
                num_requests=args.num_requests,
                max_tokens=args.max_tokens,
                ignore_eos=args.ignore_eos,
                temperature=args.temperature,
                prompts=str(args.prompts),
                seed=args.seed,
                **row,
            )
            with open(args.out / f"{date}-{slug}-serve_load.jsonl", "a") as f:
                f.write(json.dumps(obj) + "\n")
        if row["failed"]:
            print(f"rate {rate}: {row['failed']} failed: {row['errors']}", file=sys.stderr, flush=True)

    head = (
        f"{'rate/s':>7} {'done':>5} {'req/s':>6} {'out tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} "
        f"{'ITL p50':>8} {'ITL p99':>8} {'E2E p50':>8} {'E2E p99':>8}   (ms)"
    )
    print(head)
    print("-" * len(head))
    for rate, r in rows:
        print(
            f"{rate:>7g} {r['completed']:>2}/{r['requests']:<2} {r['request_throughput']:>6.2f} "
            f"{r['output_token_throughput']:>9.1f} {fmt(r['ttft_ms_p50']):>9} {fmt(r['ttft_ms_p99']):>9} "
            f"{fmt(r['itl_ms_p50']):>8} {fmt(r['itl_ms_p99']):>8} {fmt(r['e2e_ms_p50'], 0):>8} "
            f"{fmt(r['e2e_ms_p99'], 0):>8}"
        )
    return 0 if all(r["failed"] == 0 for _, r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
