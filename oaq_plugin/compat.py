"""Compatibility shims applied before third-party packages are imported (one place for each)."""
from __future__ import annotations

import importlib
import sys


def install_basicsr_compat() -> None:
    """Let basicsr 1.4.2 import on current torchvision.

    basicsr 1.4.2 imports ``torchvision.transforms.functional_tensor``, a module torchvision removed;
    its functions live in ``torchvision.transforms.functional``. BasicSR master no longer needs this.
    Safe to call any number of times, and a no-op where the old module still exists.
    """
    name = 'torchvision.transforms.functional_tensor'
    if name in sys.modules:
        return
    try:
        importlib.import_module(name)
    except ImportError:
        sys.modules[name] = importlib.import_module('torchvision.transforms.functional')
