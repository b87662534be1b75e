"""CUDA sources of qserve-lite's kernels and their NVRTC loader (see loader.py)."""
