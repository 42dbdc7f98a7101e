"""Errors caused by the user's input (a config value, a data folder, a weights file).

The CLI prints these as a short message without a traceback (SEGLIGHT_DEBUG=1 shows it); any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import re

# torch.utils.data's ExceptionWrapper.reraise: f"Caught {type} {where}.\nOriginal {traceback}"
_WORKER_ERROR = re.compile(r"Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")


def _original_message(text: str, cls: type) -> str:
    """The message of the last `cls` in a formatted traceback (the error the worker raised; a
    message of several lines is kept whole)."""
    head = f"{cls.__module__}.{cls.__qualname__}: "
    at = text.rfind(head)
    return text[at + len(head) :].rstrip("\n") if at >= 0 else text


class SeglightError(Exception):
    """Base class: bad input, explained in the message (what was wrong and where).

    A DataLoader worker's error reaches the main process re-raised by torch as the same type
    built from the worker's whole traceback as text ("Caught DataError in DataLoader worker
    process 0. Original Traceback ..."): the message is then cut back to the original one (the
    traceback is kept in `worker_traceback`), so it prints as one line, as with num_workers: 0.
    """

    def __init__(self, *args: object) -> None:
        self.worker_traceback: str | None = None
        if len(args) == 1 and isinstance(args[0], str) and _WORKER_ERROR.match(args[0]):
            self.worker_traceback = args[0]
            args = (_original_message(args[0], type(self)),)
        super().__init__(*args)


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


class DivergenceError(SeglightError, RuntimeError):
    """Training produced a non-finite loss (too high a learning rate, bad data, overflow)."""
