"""kiln: a training engine for text-to-image diffusion transformers.

Subpackages: ``kiln.kernels`` (ops and their backends), ``kiln.model`` (nn.Modules),
``kiln.engine`` (config, training loop, data, CLI), ``kiln.benchmarks``.
"""

__version__ = "0.1.0"


class ConfigError(ValueError):
    """An invalid configuration value; the message names the field and what is allowed."""


class KilnError(RuntimeError):
    """A user-facing failure (missing file, corrupt checkpoint) reported as one line."""
