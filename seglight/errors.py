"""Errors caused by the user's input (a config value, a data folder, a weights file).

The CLI prints these as a short message without a traceback (SEGLIGHT_DEBUG=1 shows it); any
other exception is a bug and keeps its traceback.
"""


class SeglightError(Exception):
    """Base class: bad input, explained in the message (what was wrong and where)."""


class ConfigError(SeglightError, ValueError):
    """A configuration value is invalid or inconsistent."""


class DataError(SeglightError, ValueError):
    """A dataset folder, image or mask is missing or invalid."""
