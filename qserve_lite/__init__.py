"""qserve-lite: PyTorch-free W4A8KV4 (QoQ) quantization and LLM serving on CuPy + numpy."""

from qserve_lite._version import __version__
from qserve_lite.errors import QServeLiteError
from qserve_lite.llm import LLM
from qserve_lite.outputs import CompletionOutput, RequestOutput
from qserve_lite.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "QServeLiteError", "RequestOutput", "SamplingParams", "__version__"]
