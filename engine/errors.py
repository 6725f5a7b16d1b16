"""User-facing errors, reported by the CLI as one line ``kiln: error: ...`` (exit status 2).

A leaf module with no imports, shared by every layer (model validation raises ConfigError too).
"""


class ConfigError(ValueError):
    """An invalid configuration value; the message names the field and what is allowed."""


class KilnError(RuntimeError):
    """A failure the user can fix (missing file, corrupt checkpoint, existing run directory)."""
