"""``python -m oaq_plugin.test -opt X.yml``: the BasicSR test entry point, kept at its old name.

The command lives in :mod:`oaq_plugin.cli.basicsr_test` (installed as ``oaq-test``).
"""
from __future__ import annotations

import sys

from .cli.basicsr_test import main

__all__ = ['main']

if __name__ == '__main__':
    sys.exit(main(prog='python -m oaq_plugin.test'))
