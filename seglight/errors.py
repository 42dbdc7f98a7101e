"""Errors caused by the user's input (a config value, a data folder, a weights file).

The CLI prints these as a short message without a traceback (SEGLIGHT_DEBUG=1 shows it); any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class SeglightError(Exception):
    """Base class: bad input, explained in the message (what was wrong and where)."""


class ConfigError(SeglightError, ValueError):
    """A configuration value is invalid or inconsistent."""


class DataError(SeglightError, ValueError):
    """A dataset folder, image or mask is missing or invalid."""


class CheckpointError(ConfigError):
    """A checkpoint or weights file is missing, truncated, corrupt, foreign or unsafe to load."""


def find_cause(exc: BaseException | None, types: type | tuple[type, ...]) -> BaseException | None:
    """The first exception of `types` in the chain behind `exc` (its causes and contexts)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, types):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def user_error(exc: BaseException | None) -> SeglightError | None:
    """The SeglightError behind `exc`, if any (jsonargparse re-raises errors from constructors as
    ValueErrors chained to the original)."""
    return find_cause(exc, SeglightError)
