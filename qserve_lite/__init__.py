"""qserve-lite: PyTorch-free W4A8KV4 (QoQ) quantization and LLM serving on CuPy + numpy."""

from .errors import QServeLiteError
from .sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["QServeLiteError", "SamplingParams", "__version__"]
