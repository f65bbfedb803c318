"""``python -m oaq_plugin.test -opt X.yml``: BasicSR's test entry point with the plugin registered.

The current directory is BasicSR's root: results go to ``./results/<name>``. Errors the user can fix
are printed as one line (exit code 2); ``--debug`` shows the full traceback.
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional

from .compat import install_basicsr_compat
from .errors import OAQError


def main(argv: Optional[List[str]] = None) -> int:
    """Run BasicSR's test pipeline on an option file; returns the exit code."""
    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    debug = '--debug' in sys.argv
    install_basicsr_compat()
    try:
        from .basicsr_plugin.registration import register
        register()
        from basicsr.test import test_pipeline
        test_pipeline(os.getcwd())
    except (OAQError, FileNotFoundError) as error:
        if debug:
            raise
        print(f'oaq_plugin: error: {error}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('oaq_plugin: interrupted', file=sys.stderr)
        return 130
    return 0


if __name__ == '__main__':
    sys.exit(main())
