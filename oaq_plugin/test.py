"""``python -m oaq_plugin.test -opt X.yml``: BasicSR's test entry point with the plugin registered.

The current directory is BasicSR's root: results go to ``./results/<name>``. Errors the user can fix
are printed as one line (exit code 2); ``--debug`` shows the full traceback. SIGINT/SIGTERM during
calibration, search or finetuning save the state to ``./experiments/<name>/oaq_resume_state.pth``
(exit code 130/143); ``--auto_resume`` or ``oaq.resume: true`` continues from it.
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional

from .compat import install_basicsr_compat
from .errors import Interrupted, OAQError


def _launcher(argv: List[str]) -> str:
    for position, arg in enumerate(argv):
        if arg == '--launcher' and position + 1 < len(argv):
            return argv[position + 1]
        if arg.startswith('--launcher='):
            return arg.split('=', 1)[1]
    return 'none'


def _start_cpu_process_group() -> None:
    """Under ``--launcher pytorch`` without CUDA, start the process group with gloo.

    BasicSR's pytorch launcher selects a CUDA device per rank and uses nccl, which fails on a machine
    without a GPU; with the group already started here, BasicSR's own start is skipped.
    """
    import torch
    import torch.distributed as dist
    if torch.cuda.is_available() or dist.is_initialized():
        return
    dist.init_process_group('gloo')
    import basicsr.utils.options as basicsr_options
    basicsr_options.init_dist = lambda *args, **kwargs: None


def main(argv: Optional[List[str]] = None) -> int:
    """Run BasicSR's test pipeline on an option file; returns the exit code."""
    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    debug = '--debug' in sys.argv
    install_basicsr_compat()
    try:
        from .basicsr_plugin.registration import register
        register()
        if _launcher(sys.argv) == 'pytorch':
            _start_cpu_process_group()
        from basicsr.test import test_pipeline
        test_pipeline(os.getcwd())
    except Interrupted as stop:
        print(f'oaq_plugin: interrupted; state saved to {stop.state_path}; rerun with --auto_resume '
              '(or oaq.resume: true) to continue', file=sys.stderr)
        return stop.exit_code
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
