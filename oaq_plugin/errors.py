"""Errors a user can act on. Adapters print these as one line (no traceback unless --debug)."""
from __future__ import annotations

import difflib
from typing import Iterable


class OAQError(Exception):
    """Base class: a problem the user can fix (bad option, missing file, unsupported layer)."""


class ConfigError(OAQError, ValueError):
    """An invalid ``oaq`` option: unknown key, wrong type, value out of range."""


class DataError(OAQError):
    """Calibration or checkpoint data that is missing, corrupt or unusable."""


class NumericalError(OAQError):
    """NaN/Inf met during calibration or finetuning; names the layer where it appeared."""


class UnsupportedLayerError(OAQError):
    """A layer the requested backend or conversion cannot handle."""


def closest(name: str, candidates: Iterable[str]) -> str:
    """A ' (did you mean X?)' suffix for the closest candidate, or '' when none is close."""
    match = difflib.get_close_matches(str(name), list(candidates), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ''
