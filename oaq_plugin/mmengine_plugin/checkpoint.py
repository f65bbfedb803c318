"""Checkpoint loading that works under torch >= 2.6, where ``torch.load`` defaults to ``weights_only=True``.

mmengine 0.10's local loader calls ``torch.load(filename)`` with torch's default. Since torch 2.6 that
default is ``weights_only=True``, and a checkpoint that mmengine itself saved no longer loads: its
``message_hub`` holds :class:`~mmengine.logging.HistoryBuffer` objects with numpy arrays, which the
weights-only unpickler refuses. Importing :mod:`oaq_plugin.mmengine_plugin` replaces mmengine's loader
of local paths (the ``''`` scheme of :class:`~mmengine.runner.CheckpointLoader`) by
:func:`load_from_local_weights_only`, which stays weights-only and allows exactly the few types mmengine
writes, so ``Runner.load_checkpoint``/``load_from``/``resume`` work again without an environment
variable and without unpickling arbitrary code. A file holding any other object is refused with a
:class:`~oaq_plugin.errors.DataError` that names the object.
"""
from __future__ import annotations

import os
import pickle
from typing import Any, List, Optional

import numpy as np
import torch
from mmengine.logging import HistoryBuffer
from mmengine.runner import CheckpointLoader

from ..errors import DataError

_numpy_core = np._core.multiarray if hasattr(np, '_core') else np.core.multiarray


def mmengine_safe_globals() -> List[Any]:
    """What an mmengine training checkpoint pickles besides tensors and containers.

    ``getattr`` is there because a HistoryBuffer pickles its table of statistics methods as
    ``getattr(HistoryBuffer, 'mean')``; the weights-only unpickler still calls only callables on this
    list, so whatever ``getattr`` returns can be stored but never called. Object arrays stay refused.
    """
    dtype_classes = [type(np.dtype(code)) for code in np.typecodes['All'] if code != 'O']
    return [HistoryBuffer, getattr, np.ndarray, np.dtype, _numpy_core._reconstruct, _numpy_core.scalar,
            *dtype_classes]


def load_checkpoint_file(filename: str, map_location: Any = 'cpu') -> Any:
    """``torch.load`` a local file weights-only, allowing the types of mmengine checkpoints.

    Args:
        filename: The checkpoint file.
        map_location: As in :func:`torch.load`.

    Raises:
        DataError: The file is missing, corrupt, or holds objects outside the allowed types.
    """
    filename = os.path.expanduser(filename)
    if not os.path.isfile(filename):
        raise DataError(f'checkpoint {filename} does not exist')
    try:
        if not hasattr(torch.serialization, 'safe_globals'):
            # torch < 2.5 has no allow-list context manager; its default, full unpickling, is what
            # mmengine always did there.
            return torch.load(filename, map_location=map_location, weights_only=False)
        with torch.serialization.safe_globals(mmengine_safe_globals()):
            return torch.load(filename, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).split('WeightsUnpickler error:')[-1].strip().splitlines()[0].split('. Please')[0]
        raise DataError(f'checkpoint {filename} holds objects a weights-only load refuses ({reason}); '
                        'if you trust the file, load it with torch.load(..., weights_only=False) and save '
                        'its tensors as a plain state dict') from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise DataError(f'cannot read checkpoint {filename}: {type(error).__name__}: {error}') from None


def load_from_local_weights_only(filename: str, map_location: Optional[Any] = None) -> Any:
    """mmengine's loader of local paths, weights-only (see the module docstring).

    mmengine logs a loader by its name minus the ``load_from`` prefix: "by local_weights_only backend".
    """
    return load_checkpoint_file(filename, map_location)


def register_checkpoint_loader() -> None:
    """Install :func:`load_from_local_weights_only` for local paths in mmengine's CheckpointLoader (idempotent)."""
    CheckpointLoader.register_scheme(prefixes='', loader=load_from_local_weights_only, force=True)
