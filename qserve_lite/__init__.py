"""qserve-lite: PyTorch-free W4A8KV4 (QoQ) quantization and LLM serving on CuPy + numpy."""

from .errors import QServeLiteError
from .llm import LLM
from .outputs import CompletionOutput, RequestOutput
from .sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "CompletionOutput", "QServeLiteError", "RequestOutput", "SamplingParams", "__version__"]
