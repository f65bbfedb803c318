"""Shared test fixtures: the basicsr compatibility alias and the shared-data location."""
from __future__ import annotations

import os

# Triton kernels run in the interpreter on machines without a GPU; this must be set before they import.
os.environ.setdefault('TRITON_INTERPRET', '1')

import pytest  # noqa: E402
import torch  # noqa: E402

from oaq_plugin.compat import install_basicsr_compat  # noqa: E402
from oaq_plugin.paths import shared_root  # noqa: E402

install_basicsr_compat()
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope='session')
def shared():
    """The shared data folder, or a skip naming where it was looked for."""
    root = shared_root()
    if not (root / 'weights').is_dir() or not (root / 'data').is_dir():
        pytest.skip(f'shared data not found at {root}; set OAQ_SHARED to the folder holding weights/ and data/')
    return root
