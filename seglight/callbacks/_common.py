"""Helpers shared by more than one module of seglight.callbacks."""

from __future__ import annotations

import math
from typing import Any


def _scalar(value: Any) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value
