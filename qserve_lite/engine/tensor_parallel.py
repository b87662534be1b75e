"""Tensor parallelism: a model split over `tp` GPUs, one process per GPU (EngineConfig.tensor_parallel_size,
`--tp N`).

The process running the engine is rank 0: it schedules, samples, and drives the others (nano-vllm's pattern).
`TPGroup` spawns ranks 1..tp-1 (multiprocessing "spawn"; each selects GPU `rank` before touching CUDA),
has every rank build its shard of the weights (model/tp_split.py: Megatron splits of the host weights,
or random weights of the rank's shape drawn on its GPU), then connects them (core/comm.py: NCCL from a
unique id rank 0 made; on the CPU, the numpy twin over pipes). `TPModelRunner` is the engine's runner on
rank 0 (GPUModelRunner's contract): each step it sends the packed batch to the other ranks over their command
pipes and runs its own shard; every rank's forward all-reduces o_proj's and down_proj's outputs on the
compute stream, so decode steps captured as CUDA graphs hold the collectives (each rank captures the same
bucket at the same step: the commands arrive in the same order everywhere). Only rank 0 computes logits;
the tokens it chooses reach the other ranks' per-slot state with one broadcast on the device
(store_tokens), so overlapped steps never wait for the host.

Commands (rank 0 -> each worker, pickled over a pipe): run_batch(PackedBatch), store_slots(slots),
capture_decode_graphs(max_batch), release_graphs(); and, with a reply: connect(), pages(config) (the KV
pages the rank can hold: rank 0 takes the minimum, so block tables are the same on every rank),
build_runner(config). A worker that fails prints its error, replies it when asked, and exits; rank 0's
watchdog then aborts the communicator (no collective hangs on a dead rank) and the next step raises.

Scripts that start a TP engine must guard their entry point with `if __name__ == "__main__":` (spawn
re-imports the main module in each worker).
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import multiprocessing.connection
import sys
import threading
import weakref
from dataclasses import dataclass

import numpy as np

from qserve_lite.core.backend import import_cupy
from qserve_lite.core.comm import CommSpec, import_nccl, nccl_specs, pipe_specs
from qserve_lite.core.kv_layout import KVPageLayout
from qserve_lite.core.model_config import ModelConfig
from qserve_lite.core.precision import Precision
from qserve_lite.engine.batch import prepare
from qserve_lite.engine.config import EngineConfig
from qserve_lite.engine.gpu_model_runner import GPUModelRunner, choose_num_pages, slot_array
from qserve_lite.engine.sequence import Sequence
from qserve_lite.errors import DeviceError, QServeLiteError
from qserve_lite.io.checkpoint import read_quant_config
from qserve_lite.io.loader import LoadedModel, is_quantized_model, load_model, resolve_model
from qserve_lite.model.gpu_model import DeviceWeights
from qserve_lite.model.random_weights import build_random_weights, check_weights_fit, random_host_weights
from qserve_lite.model.tp_split import check_splits, quantized_kind, rank_config, shard_weights

SHUTDOWN_S = 10.0  # how long close() waits for the workers to stop before terminating them


# ---- checks, before anything is loaded ----

def check_gpus(tp: int) -> None:
    """DeviceError unless cupy sees tp GPUs and NCCL is there."""
    cp = import_cupy()
    try:
        count = cp.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 - driver / runtime problems surface in many types
        raise DeviceError(f"tensor_parallel_size {tp} needs {tp} GPUs; cupy cannot reach CUDA ({e})") \
            from None
    if count < tp:
        raise DeviceError(f"tensor_parallel_size {tp} needs {tp} GPUs, cupy sees {count}")
    import_nccl()


def check_model_splits(ref, tp: int, device: str = "gpu") -> None:
    """Before loading `ref` (a model reference the loader resolves): ConfigError (one line) if its shapes do
    not split over tp ranks, DeviceError if tp ranks cannot run here."""
    if tp == 1:
        return
    if device == "cpu":
        raise DeviceError(f"tensor_parallel_size {tp} runs on GPUs: use --device gpu (or auto)")
    path = resolve_model(ref)
    cfg = ModelConfig.from_file(path / "config.json")
    w_bits, group_size = 16, None
    if is_quantized_model(path, cfg):
        qc = read_quant_config(path)
        w_bits = int(qc["w_bit"])
        group_size = int(qc.get("group_size", 128)) if w_bits == 4 else None
    check_splits(cfg, tp, w_bits, group_size, name=str(ref))
    check_gpus(tp)


# ---- where a rank's weights come from (picklable into the workers) ----

def upload_rank(cfg: ModelConfig, weights, precision: Precision, tp: int, rank: int, xp,
                k_hadamard: bool = False) -> DeviceWeights:
    """Rank's shard of host weights (io/loader.LoadedModel.weights), uploaded to xp."""
    w_bits, group_size = quantized_kind(weights)
    check_splits(cfg, tp, w_bits, group_size)
    shard = shard_weights(weights, cfg, tp, rank)
    return DeviceWeights.from_host(rank_config(cfg, tp), shard, precision, xp, k_hadamard)


@dataclass(frozen=True)
class LoadedSource:
    """A model the loader reads (io/loader.load_model): every rank loads it and keeps its shard."""

    path: str
    precision: str

    def rank_weights(self, tp: int, rank: int, xp, loaded: LoadedModel | None = None) -> DeviceWeights:
        lm = loaded if loaded is not None else load_model(self.path, precision=self.precision)
        return upload_rank(lm.config, lm.weights, lm.precision, tp, rank, xp, lm.k_hadamard)


@dataclass(frozen=True)
class RandomSource:
    """Random weights of `config`'s shape (model/random_weights.py). same_model (default): the host weights
    of random_host_weights, split like a loaded model, so every tp runs the same model (checks of TP against
    TP=1; host memory for a few billion parameters at most). same_model False: each rank draws the weights of
    its shard's shape straight on its GPU (throughput benchmarks: the right shape and cost, not the same
    model at every tp)."""

    config: ModelConfig
    precision: str = "w4a8kv4"
    group_size: int = 128
    seed: int = 0
    same_model: bool = True

    def rank_weights(self, tp: int, rank: int, xp, loaded=None) -> DeviceWeights:
        p = Precision.parse(self.precision)
        if self.same_model:
            weights = random_host_weights(self.config, p, self.group_size, self.seed)
            return upload_rank(self.config, weights, p, tp, rank, xp)
        check_splits(self.config, tp, p.w_bits, self.group_size if p.w_bits == 4 else None)
        cfg = rank_config(self.config, tp)
        check_weights_fit(cfg, p, self.group_size, xp, name=f"rank {rank} of {tp}")
        weights = build_random_weights(cfg, p, self.group_size, xp=xp, seed=self.seed)
        if xp is not np:
            xp.cuda.Device().synchronize()
        return weights


# ---- the worker processes ----

class _Rank:
    """What a worker process holds: its weights, its communicator and its current runner."""

    REPLIES = frozenset({"connect", "pages", "build_runner"})

    def __init__(self, weights: DeviceWeights, xp, spec: CommSpec):
        self.weights, self.xp, self.spec = weights, xp, spec
        self.comm = self.runner = None

    def connect(self) -> None:
        self.comm = self.spec.connect()

    def _drop_runner(self) -> None:
        if self.runner is not None:
            self.runner.release_graphs()
        self.runner = None
        gc.collect()
        if self.xp is not np:
            self.xp.get_default_memory_pool().free_all_blocks()

    def pages(self, config: EngineConfig) -> int:
        """The KV pages this rank can hold under config (a new runner is coming: the old one goes first)."""
        self._drop_runner()
        cfg = self.weights.config
        layout = KVPageLayout(self.weights.kv_bits, cfg.num_kv_heads, cfg.head_dim)
        return choose_num_pages(cfg, layout, config, self.xp)

    def build_runner(self, config: EngineConfig) -> None:
        self._drop_runner()
        self.runner = GPUModelRunner(self.weights, config, xp=self.xp, comm=self.comm, with_logits=False)

    def run_batch(self, batch) -> None:
        self.runner.run_batch(batch)

    def store_slots(self, slots: np.ndarray) -> None:
        ids = self.xp.empty(len(slots), dtype=self.xp.int32)
        self.comm.broadcast(ids)
        self.runner.store_slots(slots, ids)

    def capture_decode_graphs(self, max_batch: int | None) -> None:
        self.runner.capture_decode_graphs(max_batch)

    def release_graphs(self) -> None:
        if self.runner is not None:
            self.runner.release_graphs()


def _rank_module(device: str, rank: int):
    if device == "cpu":
        return np
    cp = import_cupy()
    cp.cuda.Device(rank).use()  # before anything touches CUDA in this process
    return cp


def _describe(e: BaseException) -> str:
    return str(e) if isinstance(e, QServeLiteError) else f"{type(e).__name__}: {e}"


def worker_main(rank: int, tp: int, spec: CommSpec, source, device: str, conn) -> None:
    """A worker process: build the rank's weights, then execute rank 0's commands until 'stop'."""
    try:
        xp = _rank_module(device, rank)
        state = _Rank(source.rank_weights(tp, rank, xp), xp, spec)
        conn.send(("ok", state.weights.nbytes()))
        while True:
            method, args = conn.recv()
            if method == "stop":
                return
            result = getattr(state, method)(*args)
            if method in _Rank.REPLIES:
                conn.send(("ok", result))
    except (EOFError, KeyboardInterrupt, BrokenPipeError):  # rank 0 went away
        return
    except BaseException as e:  # noqa: BLE001 - reported to rank 0, then this process exits
        message = f"tensor-parallel rank {rank}: {_describe(e)}"
        print(f"qserve-lite: error: {message}", file=sys.stderr, flush=True)
        try:
            conn.send(("error", message))
        except OSError:
            pass
        sys.exit(1)


# ---- rank 0's handle on the group ----

def _shutdown(procs: list, conns: list) -> None:
    for conn in conns:
        try:
            conn.send(("stop", ()))
        except OSError:
            pass
    for p in procs:
        p.join(SHUTDOWN_S)
        if p.is_alive():
            p.terminate()
            p.join(SHUTDOWN_S)


class TPGroup:
    """The tp ranks of one model: rank 0 here (its weights in `weights`, its communicator in `comm`), the
    others in spawned processes. device: 'gpu' (rank r on GPU r, NCCL; tp = 1 runs the same code with an
    NCCL communicator of one rank) or 'cpu' (the numpy twin, pipes). Where bench takes DeviceWeights it
    takes a TPGroup: `config`, `kv_bits`, `layers`, `nbytes()` are rank 0's (one GPU's share)."""

    def __init__(self, source, tp: int, device: str = "gpu", *, loaded: LoadedModel | None = None):
        if not isinstance(tp, int) or tp < 1:
            raise QServeLiteError(f"tensor_parallel_size must be an integer >= 1, got {tp!r}")
        if device == "gpu":
            check_gpus(tp)
        self.tp, self.device = tp, device
        self.xp = _rank_module(device, 0)
        ctx = mp.get_context("spawn")
        specs = nccl_specs(tp) if device == "gpu" else pipe_specs(tp, ctx)
        self.procs, self.conns, self.failure = [], [], None
        self._lock, self._closing = threading.Lock(), False
        for rank in range(1, tp):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(rank, tp, specs[rank], source, device, theirs),
                               daemon=True, name=f"qserve-lite-tp{rank}")
            proc.start()
            theirs.close()
            self.procs.append(proc)
            self.conns.append(ours)
        self._finalizer = weakref.finalize(self, _shutdown, self.procs, self.conns)
        try:
            self.weights = source.rank_weights(tp, 0, self.xp, loaded)
            self.worker_bytes = self._gather("building its weights")
            self.send("connect")
            self.comm = specs[0].connect()  # NCCL: collective with the workers' connect
            self._gather("connecting")
        except BaseException:
            self.close()
            raise
        self.model_config = getattr(source, "config", None) or (loaded.config if loaded else None)
        if len(self.procs):
            threading.Thread(target=self._watch, daemon=True, name="qserve-lite-tp-watchdog").start()

    # DeviceWeights' face, for bench (rank 0's share)
    @property
    def config(self) -> ModelConfig:
        return self.weights.config

    @property
    def kv_bits(self) -> int:
        return self.weights.kv_bits

    @property
    def layers(self) -> list:
        return self.weights.layers

    def nbytes(self) -> int:
        return self.weights.nbytes()

    # commands
    def send(self, method: str, *args) -> None:
        """A command to every worker (no reply)."""
        for conn in self.conns:
            conn.send((method, args))

    def request(self, method: str, *args) -> list:
        """A command to every worker, and their replies in rank order."""
        self.send(method, *args)
        return self._gather(method)

    def _gather(self, doing: str) -> list:
        replies = []
        for rank, (conn, proc) in enumerate(zip(self.conns, self.procs, strict=True), start=1):
            with self._lock:
                try:
                    status, value = conn.recv()
                except (EOFError, OSError):
                    proc.join(1.0)
                    raise DeviceError(f"tensor-parallel rank {rank} exited (code {proc.exitcode}) while "
                                      f"{doing}") from None
            if status != "ok":
                raise QServeLiteError(value)
            replies.append(value)
        return replies

    def raise_if_failed(self, wait_s: float = 0.0) -> None:
        """DeviceError if a worker died (waiting up to wait_s for the first dying one to be seen)."""
        ready = []
        if wait_s > 0 and self.failure is None:
            ready = mp.connection.wait([p.sentinel for p in self.procs], timeout=wait_s)
        for rank, proc in enumerate(self.procs, start=1):
            gone = proc.sentinel in ready
            if gone:  # exiting: its status follows the closing of its sentinel shortly
                proc.join(5.0)
            # a closed sentinel means the process is gone even when its exit status reads None here (the
            # watchdog thread may have reaped it first: then this thread's waitpid finds no child)
            if self.failure is None and (gone or proc.exitcode is not None):
                self.failure = f"tensor-parallel rank {rank} exited (code {proc.exitcode})"
        if self.failure is not None:
            raise DeviceError(self.failure)

    def _watch(self) -> None:
        """Abort the communicator when a worker dies, so rank 0 fails instead of waiting in a collective."""
        sentinels = {p.sentinel: (rank, p) for rank, p in enumerate(self.procs, start=1)}
        done = mp.connection.wait(list(sentinels))
        if self._closing:
            return
        rank, proc = sentinels[done[0]]
        message = f"tensor-parallel rank {rank} exited (code {proc.exitcode})"
        conn = self.conns[rank - 1]
        if self._lock.acquire(timeout=1.0):
            try:
                if conn.poll():
                    status, value = conn.recv()
                    message = value if status == "error" else message
            except (EOFError, OSError):
                pass
            finally:
                self._lock.release()
        self.failure = message
        print(f"qserve-lite: error: {message}; stopping the tensor-parallel group", file=sys.stderr,
              flush=True)
        comm = getattr(self, "comm", None)
        if comm is not None:
            comm.abort()

    def close(self) -> None:
        """Stop the workers (also at exit, and when the group is garbage-collected)."""
        self._closing = True
        self._finalizer()


class TPModelRunner:
    """The engine's runner over a TPGroup (GPUModelRunner's contract, on rank 0). `cfg` is the whole model's
    config; each rank's runner holds its shard, its KV pages (the same page count on every rank) and its
    decode graphs."""

    def __init__(self, group: TPGroup, config: EngineConfig | None = None, **overrides):
        config = (config or EngineConfig()).replace(**overrides)
        if config.max_num_batched_tokens is None or config.max_model_len is None:
            raise QServeLiteError("TPModelRunner needs max_num_batched_tokens and max_model_len")
        group.raise_if_failed()
        self.group, self.xp = group, group.xp
        w = group.weights
        layout = KVPageLayout(w.kv_bits, w.config.num_kv_heads, w.config.head_dim)
        pages = min([choose_num_pages(w.config, layout, config, self.xp), *group.request("pages", config)])
        config = config.replace(num_pages=pages)
        group.request("build_runner", config)
        self.local = GPUModelRunner(w, config, xp=self.xp, comm=group.comm)
        self.engine_config = config
        self.cfg = group.model_config or w.config
        self.num_pages = pages
        self.cuda_graphs = self.local.cuda_graphs
        self.k_hadamard = self.local.k_hadamard

    @property
    def graphs(self) -> dict:
        return self.local.graphs

    def _everywhere(self, method: str, args: tuple, here):
        """Send the command to the workers and run `here()` on this rank; a dead worker surfaces as one
        DeviceError (the watchdog aborted the collective this rank was waiting in)."""
        self.group.raise_if_failed()
        try:
            self.group.send(method, *args)
            return here()
        except Exception as e:
            # a collective or command broken by a dying worker: name the worker (its death may take a moment
            # to be seen), or say the group broke
            broken = isinstance(e, (EOFError, OSError))
            self.group.raise_if_failed(wait_s=10.0 if broken else 1.0)
            if broken:
                raise DeviceError(f"tensor-parallel group broke: {type(e).__name__}: {e}") from e
            raise

    def run(self, seqs: list[Sequence], is_prefill: bool):
        """Next-token logits [len(seqs), vocab] fp32 on rank 0's device (every rank runs the step)."""
        batch = prepare(seqs, is_prefill, slots_for_decode_tokens=True)
        return self._everywhere("run_batch", (batch,), lambda: self.local.run_batch(batch))

    def store_tokens(self, seqs: list[Sequence], token_ids) -> None:
        """Every rank's last_tokens[slot] = the chosen tokens (one broadcast from rank 0, on the device)."""
        slots = slot_array(seqs)

        def here():
            ids = self.xp.ascontiguousarray(self.xp.asarray(token_ids, dtype=self.xp.int32))
            self.group.comm.broadcast(ids)
            self.local.store_slots(slots, ids)

        self._everywhere("store_slots", (slots,), here)

    def capture_decode_graphs(self, max_batch: int | None = None) -> list[int]:
        return self._everywhere("capture_decode_graphs", (max_batch,),
                                lambda: self.local.capture_decode_graphs(max_batch))

    def release_graphs(self) -> None:
        self._everywhere("release_graphs", (), self.local.release_graphs)


def tp_runner(loaded: LoadedModel, config: EngineConfig) -> TPModelRunner:
    """The TP runner of a loaded model on config.tensor_parallel_size GPUs (rank 0 shards `loaded`, the
    workers load the model themselves)."""
    source = LoadedSource(str(loaded.path), loaded.precision.name)
    group = TPGroup(source, config.tensor_parallel_size, "gpu", loaded=loaded)
    return TPModelRunner(group, config)


def make_runner(weights, config: EngineConfig, xp):
    """A runner over DeviceWeights (GPUModelRunner) or a TPGroup (TPModelRunner)."""
    if isinstance(weights, TPGroup):
        return TPModelRunner(weights, config)
    return GPUModelRunner(weights, config, xp=xp)
