"""Launcher of cuda/gemm_sm90.cu, the Hopper W4A8 / W8A8 GEMM (TMA + warp-specialized int8 wgmma,
persistent), with its tile and split-K heuristics. Reached through gemm.gemm, which checks the arguments and
routes int8 modes here on sm_90 when `sm90_supported` holds (16-byte aligned rows and operands).

The TMA descriptors are built with the driver (driver.tensor_map_2d) and passed by value; the launch goes
through driver.launch on CuPy's current stream (graph capture included).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from qserve_lite.kernels.cuda.device import sm_count
from qserve_lite.kernels.cuda.driver import (
    SWIZZLE_128B,
    SWIZZLE_NONE,
    TMA_U8,
    TMA_U64,
    launch,
    max_active_clusters,
    tensor_map_2d,
)
from qserve_lite.kernels.cuda.jit import get_sized_kernel
from qserve_lite.kernels.cuda.workspace import gemm_workspace

BK = 128  # bytes of K per pipeline stage (one g128 group)


SMEM_MAX = 227 * 1024  # dynamic shared memory a Hopper block may opt into
SMEM_SM = 228 * 1024  # shared memory of an SM (1 KB of it reserved per resident block)


@dataclass(frozen=True)
class Sm90Config:
    """One configuration of cuda/gemm_sm90.cu: bm tokens x 128 * nwg / kwg channels per tile, up to `stages`
    deep (fewer where a mode's stages would not fit in shared memory); kwg 2: the two consumer warpgroups
    share the tile's channels and take alternate K stages; minb 2: two blocks per SM (nwg 1); cluster 2:
    clusters of two blocks on adjacent channel tiles multicast the shared activation tile (kwg 1, minb 1);
    epi: token rows per pass of the epilogue through the staging tiles (0: all bm; fewer leaves shared memory
    for more stages; kwg 1); diag: timing experiments only (cuda/gemm_sm90.cu's QS_DIAG, wrong results)."""

    bm: int = 128
    nwg: int = 2
    stages: int = 4
    kwg: int = 1
    minb: int = 1
    diag: int = 0
    cluster: int = 1
    epi: int = 0

    @property
    def epi_rows(self) -> int:
        return self.epi or self.bm

    @property
    def bn(self) -> int:
        return 128 * self.nwg // self.kwg

    @property
    def threads(self) -> int:
        return 128 * (self.nwg + 1)

    def smem_bytes(self, mode: int, stages: int) -> int:
        """The kernel's SMEM_BYTES: 1024-aligned stages, the epilogue staging tiles, the barriers."""
        w = self.bn * BK // 2 if mode in (0, 1) else self.bn * BK
        stage = -(-(self.bm * BK + w + (2 * self.bn if mode == 1 else 0)) // 1024) * 1024
        return 1024 + stages * stage + self.nwg * self.epi_rows * 136 * 2 + 16 * stages + 16

    @property
    def smem_limit(self) -> int:
        """Dynamic shared memory one block may use with `minb` blocks resident per SM."""
        return SMEM_MAX if self.minb == 1 else SMEM_SM // self.minb - 1024

    def stages_for(self, mode: int) -> int:
        stages = self.stages
        while stages > 2 and self.smem_bytes(mode, stages) > self.smem_limit:
            stages -= 1
        return stages

    def defines(self, mode: int) -> dict[str, int]:
        defines = {"QS_MODE": mode, "QS_BM": self.bm, "QS_NWG": self.nwg, "QS_STAGES": self.stages_for(mode),
                   "QS_KWG": self.kwg, "QS_MINB": self.minb, "QS_CLUSTER": self.cluster}
        if self.diag:
            defines["QS_DIAG"] = self.diag
        if self.epi and self.epi != self.bm:
            defines["QS_EPI_ROWS"] = self.epi
        return defines


SM90_CONFIGS = {
    "h128x256": Sm90Config(128, 2, 4),
    "h128x128": Sm90Config(128, 1, 6),
    "h64x256": Sm90Config(64, 2, 6),
    "h64x128": Sm90Config(64, 1, 8),
    "h32x256": Sm90Config(32, 2, 8),
    "h32x128": Sm90Config(32, 1, 10),
    "h16x256": Sm90Config(16, 2, 10),
    "h16x128": Sm90Config(16, 1, 12),
    # both warpgroups on one 128-channel tile, alternate K stages
    "k128x128": Sm90Config(128, 2, 6, kwg=2),
    "k64x128": Sm90Config(64, 2, 8, kwg=2),
    # two blocks per SM, one consumer warpgroup each
    "b128x128": Sm90Config(128, 1, 4, minb=2),
    "b64x128": Sm90Config(64, 1, 6, minb=2),
    "b32x128": Sm90Config(32, 1, 8, minb=2),
    "b16x128": Sm90Config(16, 1, 10, minb=2),
    # clusters of two channel tiles sharing (multicasting) the activation tile (not yet measured: not chosen
    # by default)
    "c128x256": Sm90Config(128, 2, 4, cluster=2),
    "c64x256": Sm90Config(64, 2, 6, cluster=2),
    "c64x128": Sm90Config(64, 1, 8, cluster=2),
    "c16x256": Sm90Config(16, 2, 10, cluster=2),
    # the epilogue in passes of 32 token rows: the staging tiles shrink by 3/4, so more stages fit in shared
    # memory (128 x 256: 4 -> 6; two blocks of 128 x 128 per SM: 3 -> 4; 64 x 256: 6 -> 8). Not chosen by
    # default until measured.
    "e128x256": Sm90Config(128, 2, 6, epi=32),
    "eb128x128": Sm90Config(128, 1, 4, minb=2, epi=32),
    "e64x256": Sm90Config(64, 2, 8, epi=32),
}


def sm90_supported(mode_id: int, m: int, n: int, lda: int, x_ptr: int, w_ptr: int, ldw: int) -> bool:
    """The Hopper kernel's layout needs: an int8 mode, 16-byte aligned operands and row strides (TMA), and
    N a multiple of 32."""
    if mode_id not in (0, 1, 2) or n % 32:
        return False
    if x_ptr % 16 or w_ptr % 16 or (m > 1 and lda % 16):
        return False
    return mode_id != 2 or (ldw % 16 == 0 and n > 0)


def choose_sm90(mode_id: int, m: int, n: int, kw_bytes: int) -> Sm90Config:
    """Tile by token count and width, from benchmarks/kernels.py --tune and scratch sweeps on an H200
    (2026-12-02, Llama-3-8B shapes): the shortest token tile that covers M up to 64 tokens; at 65-256 tokens,
    both warpgroups on one 128 x 128 tile with alternate K stages for N >= 6144 or long K (qkv 23.4 -> 21.9
    us, down 43.4 -> 36.1 us at 256 tokens), 64 x 128 for the rest (more tiles for narrow layers); above
    256 tokens 128 x 256, except wide layers (N >= 16384), where two 128 x 128 blocks per SM overlap one's
    epilogue with the other's main loop (gate_up at 4096 tokens 834 -> 756 us)."""
    del mode_id
    wide = n >= 16384
    if m <= 16:
        return SM90_CONFIGS["h16x256" if wide else "h16x128"]
    if m <= 64:
        return SM90_CONFIGS["h64x256" if wide else "h64x128"]
    if m <= 256 and not wide:
        return SM90_CONFIGS["k128x128" if n >= 6144 or kw_bytes >= 8192 else "h64x128"]
    return SM90_CONFIGS["b128x128" if wide and m > 256 else "h128x256"]


def sm90_splits(cfg: Sm90Config, m: int, n: int, kw_bytes: int) -> int:
    """Split K so that the work units fill the SMs in whole rounds, in units of one stage's time: minimise
    rounds x (stages per unit + 2 for the unit's fixed cost) plus, when split, each unit's write of its int32
    partial tile and the last unit's read of all of them (a partial tile costs `red` stages: its bytes over
    a stage's input bytes)."""
    sms = sm_count() * cfg.minb  # resident blocks
    tiles = -(-n // cfg.bn) * -(-m // cfg.bm)
    stages = -(-kw_bytes // BK)
    red = cfg.bm * cfg.bn * 4 / (cfg.bm * BK + cfg.bn * BK // 2)
    best, best_cost = 1, None
    for ns in range(1, min(16, stages) + 1):
        per = -(-stages // ns)
        ns_eff = -(-stages // per)
        rounds = -(-tiles * ns_eff // sms)
        cost = rounds * (per + 2)
        if ns_eff > 1:
            cost += rounds * red + ns_eff * red
        if best_cost is None or cost < best_cost - 1e-9:
            best, best_cost = ns_eff, cost
    return best


def _kernel(mode_id: int, cfg: Sm90Config):
    """(kernel, dynamic shared memory bytes) of one configuration; the module states its own smem size."""
    return get_sized_kernel("gemm_sm90.cu", "qs_gemm_sm90", cfg.defines(mode_id), cfg.threads)


def _maps(mode_id: int, cfg: Sm90Config, q_x, lda: int, w, ldw: int, m: int, n: int, kx_bytes: int, kw: int,
          s2_scales, s2_zeros):
    """(tx, tw, ts, tz): the activation, weight and g128 parameter descriptors (unused ones repeat tx)."""
    tx = tensor_map_2d(TMA_U8, q_x.data.ptr, (kx_bytes, m), lda if m > 1 else -(-kx_bytes // 16) * 16,
                       (BK, cfg.bm // cfg.cluster), SWIZZLE_128B)  # a cluster's blocks load a share each
    if mode_id in (0, 1):
        tiles_k = kw // 32
        tw = tensor_map_2d(TMA_U64, w.data.ptr, (tiles_k * 64, n // 32), tiles_k * 512,
                           (BK // 32 * 64, cfg.bn // 32), SWIZZLE_NONE)
    else:
        tw = tensor_map_2d(TMA_U8, w.data.ptr, (kw, n), ldw, (BK, cfg.bn), SWIZZLE_128B)
    if mode_id == 1:
        groups = kw // 128
        ts = tensor_map_2d(TMA_U8, s2_scales.data.ptr, (n, groups), n, (cfg.bn, 1), SWIZZLE_NONE)
        tz = tensor_map_2d(TMA_U8, s2_zeros.data.ptr, (n, groups), n, (cfg.bn, 1), SWIZZLE_NONE)
    else:
        ts = tz = tx
    return tx, tw, ts, tz


def _ptr(a) -> ctypes.c_uint64:
    return ctypes.c_uint64(0 if a is None else a.data.ptr)


def gemm_sm90(mode_id: int, q_x, lda: int, w, ldw: int, n: int, kw: int, kx_bytes: int, out, cfg: Sm90Config,
              splits: int | None, s2_scales, s2_zeros, w_scales, w_szeros, x_scales, x_sums, bias):
    """Y = epilogue(q_x . W^T) into `out` [M, n] fp16 (arguments already checked by gemm.gemm)."""
    m = q_x.shape[0]
    kw_bytes = kw  # int8 modes: one byte per K element (W4: K_pad)
    total_stages = -(-kw_bytes // BK)
    nsplit = splits if splits is not None else sm90_splits(cfg, m, n, kw_bytes)
    per_split = -(-total_stages // max(1, nsplit))
    nsplit = -(-total_stages // per_split)
    m_tiles, n_tiles = -(-m // cfg.bm), -(-n // cfg.bn)
    n_tiles = -(-n_tiles // cfg.cluster) * cfg.cluster  # whole clusters (a tile past N computes zeros)
    units = m_tiles * n_tiles * nsplit
    kern, smem = _kernel(mode_id, cfg)
    if nsplit > 1:
        ws, counters = gemm_workspace.get(units * cfg.bm * cfg.bn, m_tiles * n_tiles)
    else:
        ws, counters = None, None
    tx, tw, ts, tz = _maps(mode_id, cfg, q_x, lda, w, ldw, m, n, kx_bytes, kw, s2_scales, s2_zeros)
    ldy = out.strides[0] // out.itemsize if m > 1 else n
    i32 = ctypes.c_int32
    params = [tx, tw, ts, tz, _ptr(w_scales), _ptr(w_szeros), _ptr(x_scales), _ptr(x_sums), _ptr(bias),
              _ptr(out), ctypes.c_int64(ldy), i32(m), i32(n), i32(total_stages), i32(per_split), i32(m_tiles),
              i32(n_tiles), i32(nsplit), _ptr(ws), _ptr(counters)]
    if cfg.cluster > 1:
        clusters = max_active_clusters(kern, cfg.threads, smem, cfg.cluster, sm_count() // cfg.cluster)
        grid = (min(units // cfg.cluster, clusters) * cfg.cluster, 1, 1)
    else:
        grid = (min(units, cfg.minb * sm_count()), 1, 1)
    launch(kern, grid, cfg.threads, smem, params, cluster=cfg.cluster)
    return out
