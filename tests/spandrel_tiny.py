"""Small random instances of spandrel's own architecture classes and a tiny image world to run them on,
from ``tools/spandrel_generality.py`` (the benchmark that measures the same instances)."""
from __future__ import annotations

import pytest

from tiny_sr import load_tool

pytest.importorskip('spandrel', reason='spandrel is not installed (pip install spandrel==0.4.2)')

_generality = load_tool('spandrel_generality')
CASES = _generality.CASES
SCALE = _generality.SCALE
save_random_instance = _generality.save_random_instance
write_image_world = _generality.write_image_world
