"""``oaq-test -opt X.yml`` (also ``python -m oaq_plugin.test``): BasicSR's test run with the plugin registered.

Everything the run reads (the ``oaq:`` options, the calibration images, the test-set folders, the
checkpoint) is checked before BasicSR makes or archives ``results/<name>``. The current directory is
BasicSR's root: results go to ``./results/<name>``. Errors the user can fix are printed as one line (exit
code 2); ``--debug`` shows the full traceback. SIGINT/SIGTERM during calibration, search or finetuning save
the state to ``./experiments/<name>/oaq_resume_state.pth`` (exit code 130/143); ``--auto_resume`` or
``oaq.resume: true`` continues from it. The run ends with a summary and the results folder.
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path
from typing import List, Optional

from ..errors import exit_code_of

EPILOG = """\
oaq: options
  Every key of the option file's oaq: section (listed with its default and range in
  oaq_plugin/config.py) can be overridden with --force_yml, sections separated by ':':
    --force_yml oaq:w_bits=8 oaq:a_bits=8
    --force_yml oaq:finetune:enabled=true oaq:backend=reference oaq:tile:size=128

exit codes
  0 done; 2 a bad option, path or checkpoint (one line, before any folder is made or archived);
  130/143 interrupted by SIGINT/SIGTERM (the state is saved: rerun with --auto_resume); 1 anything else.
"""


def build_parser(prog: str = 'oaq-test') -> argparse.ArgumentParser:
    """The arguments of BasicSR's test entry point, described for this plugin."""
    parser = argparse.ArgumentParser(
        prog=prog, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "Run an option file through BasicSR's test pipeline with the plugin registered. With model_type "
            'OAQModel (OAQSwinIRModel for SwinIR) the run calibrates on oaq.calib, quantizes, validates the float '
            'and the quantized network on every datasets: test_* entry and writes oaq_report.json, quantized.pth, '
            'activation_histograms.png, crops/ and run.txt to results/<name>/ (an existing folder is archived with '
            'a timestamp, never overwritten).', width=100))
    parser.add_argument('-opt', required=True, metavar='FILE', help='the option file (YAML)')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm'], default='none',
                        help="'pytorch' under torchrun: the processes split the calibration batches and the "
                             'test images (gloo on a machine without a GPU)')
    parser.add_argument('--auto_resume', action='store_true',
                        help='continue an interrupted run from experiments/<name>/oaq_resume_state.pth (the same '
                             'as oaq.resume: true); without it, a saved state is left alone and the run starts afresh')
    parser.add_argument('--debug', action='store_true',
                        help='show the full traceback of an error (BasicSR also prefixes the run name with debug_)')
    parser.add_argument('--local_rank', type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument('--force_yml', nargs='+', default=None, metavar='KEYS=VALUE',
                        help='override option-file entries, sections separated by ":", e.g. oaq:w_bits=8 '
                             '(see "oaq: options" below)')
    return parser


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


def _rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def closing_summary(results_dir: Path) -> str:
    """The lines a finished run ends with: its summary table (when it wrote a report) and its folder."""
    from ..experiment import REPORT_FILE
    from .tables import report_summary
    lines = [report_summary(results_dir)] if (results_dir / REPORT_FILE).is_file() else []
    return '\n'.join(lines + [f'results in {results_dir}/'])


def main(argv: Optional[List[str]] = None, prog: str = 'oaq-test') -> int:
    """Check the option file, then run BasicSR's test pipeline on it; returns the exit code."""
    args = build_parser(prog).parse_args(sys.argv[1:] if argv is None else argv)
    # BasicSR's own parser reads sys.argv.
    sys.argv = [sys.argv[0]] + (sys.argv[1:] if argv is None else list(argv))
    from ..compat import install_basicsr_compat
    install_basicsr_compat()
    opt: dict = {}

    def run() -> int:
        from ..basicsr_plugin.preflight import check_option_file, load_option_file
        from ..basicsr_plugin.registration import register
        register()
        opt.update(load_option_file(args.opt, args.force_yml or ()))
        check_option_file(opt)
        if args.launcher == 'pytorch':
            _start_cpu_process_group()
        from basicsr.test import test_pipeline
        test_pipeline(os.getcwd())
        return 0

    code = exit_code_of(run, prog='oaq_plugin', resume_hint='rerun with --auto_resume (or oaq.resume: true)',
                        debug=args.debug)
    if code != 0:
        return code
    if _rank() == 0:
        name = opt['name'] if not args.debug or opt['name'].startswith('debug') else f"debug_{opt['name']}"
        print(closing_summary(Path('results') / name), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
