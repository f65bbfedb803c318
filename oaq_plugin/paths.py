"""Where the shared benchmark data and checkpoints live: one setting, ``OAQ_SHARED``."""
from __future__ import annotations

import os
from pathlib import Path

SHARED_ENV = 'OAQ_SHARED'


def shared_root() -> Path:
    """The shared data folder: ``$OAQ_SHARED``, else ``../shared`` beside this checkout."""
    value = os.environ.get(SHARED_ENV)
    if value:
        return Path(value).expanduser().resolve()
    return (Path(__file__).resolve().parents[1].parent / 'shared').resolve()


def shared_path(*parts: str) -> Path:
    """A path inside the shared folder (it may not exist: callers check and explain)."""
    return shared_root().joinpath(*parts)
