"""The CUDA half of the kernel layer: the `.cu` / `.cuh` sources, their NVRTC loader (jit.py) and one
launcher module per kernel family over CuPy arrays (rows.py, gemm.py, gemm_skinny.py, cublas.py,
kv_writer.py, attention.py), with the shared device properties (device.py), split-K workspaces
(workspace.py) and argument checks (args.py). The family table is in qserve_lite/kernels/__init__.py.

Callers normally go through the spec modules of qserve_lite/kernels (numpy twin or launcher by array type).
Every module here imports without CuPy: CuPy is imported when a launcher runs.
"""
