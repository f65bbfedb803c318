"""``oaq``: quantize any SR checkpoint with one command (``oaq quantize``), print a run's summary again
(``oaq report``), compare runs in one table (``oaq compare``).

Exit codes, as the BasicSR entry point of this package has them: 0 done, 2 a bad input or option (one
line, ``--debug`` for the traceback), 130/143 interrupted (SIGINT/SIGTERM), 1 an unexpected error.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..config import BACKENDS
from ..errors import exit_code_of

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line (the usage itself is one ``--help`` away)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f'{self.prog}: error: {message} (see {self.prog} --help)\n')


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog='oaq', description=(
        'Outlier-aware post-training quantization of super-resolution networks: quantize a checkpoint, '
        'validate it against its float original, and compare runs.'))
    parser.add_argument('--debug', action='store_true', help='show the traceback of an error')
    commands = parser.add_subparsers(dest='command', metavar='COMMAND', parser_class=_Parser)

    from ..config import PRESETS
    quantize = commands.add_parser(
        'quantize', help='calibrate, quantize, validate and write a results folder',
        description=('Quantize MODEL (a checkpoint spandrel recognises, e.g. SwinIR, HAT, DAT, SPAN, RealPLKSR, '
                     'RCAN, ESRGAN, Compact; a zoo name such as srvgg_x4; or a checkpoint with --network-g for a '
                     'BasicSR arch), validate the float and quantized networks on the test sets, and write '
                     'oaq_report.json, report.html, quantized.pth (and quantized.onnx with --onnx), '
                     'activation_histograms.png, crops/ and run.txt into --out. '
                     'An existing --out folder is archived with a timestamp, never overwritten.'))
    quantize.add_argument('model', metavar='MODEL', help='checkpoint file (.pth/.pt/.ckpt/.safetensors) or zoo name')
    quantize.add_argument('--calib', required=True, metavar='DIR',
                          help='folder (or BasicSR LMDB) of LR calibration images; never a test set')
    quantize.add_argument('--bits', default='w4a4', metavar='WxAy', help='weight and activation bits of the body '
                          'layers, e.g. w4a4 (default), w8a8, w4a8')
    quantize.add_argument('--test', action='append', default=[], metavar='NAME=HR_DIR:LR_DIR',
                          help='a test set (repeatable); NAME=LR_DIR measures fidelity to the float output only')
    quantize.add_argument('--out', metavar='DIR', help='results folder (default results/<model>_<bits>_<preset>)')
    quantize.add_argument('--preset', default='default', choices=list(PRESETS),
                          help="the recipe: 'default' (recommended) or 'paper' (the paper's pipeline, with its "
                               'finetuning); --set overrides any of its keys')
    quantize.add_argument('--set', action='append', default=[], dest='settings', metavar='KEY=VALUE',
                          help='any oaq option, dotted, e.g. search.enabled=false, calib.num_batches=2 or '
                               'act_quantizer=minmax (see oaq_plugin/config.py); repeatable')
    quantize.add_argument('--backend', choices=BACKENDS, help='how the quantized layers run at validation '
                          '(default auto: triton on CUDA, else reference; onnxruntime runs quantized.onnx)')
    quantize.add_argument('--onnx', action='store_true', help='also write quantized.onnx (as --set export.onnx=true)')
    quantize.add_argument('--network-g', metavar='YAML', help="a BasicSR arch for MODEL's weights, e.g. "
                          "'{type: EDSR, num_feat: 64, num_block: 16, upscale: 4}'")
    quantize.add_argument('--param-key', metavar='KEY', help='entry of the checkpoint holding the weights '
                          '(with --network-g; default: params_ema, params, ... whichever is present)')
    quantize.add_argument('--scale', type=int, help='refuse a network of another scale')
    quantize.add_argument('--resume', action='store_true', help='continue a run stopped by Ctrl-C or SIGTERM '
                          '(its state is kept beside --out, in .oaq_state/)')
    quantize.add_argument('--quiet', action='store_true', help='no progress bars')

    report = commands.add_parser('report', help="print a run's summary table again",
                                 description="Print the summary table of a results folder's oaq_report.json; "
                                             '--html rewrites its report.html.')
    report.add_argument('results', metavar='RESULTS_DIR')
    report.add_argument('--html', action='store_true', help='also (re)write report.html from the report')

    compare = commands.add_parser('compare', help='one table of several runs',
                                  description='One row per run: model, bits, preset, PSNR/SSIM/gap/ΔE per test set, '
                                              'size and quantization time.')
    compare.add_argument('results', metavar='RESULTS_DIR', nargs='+')
    compare.add_argument('--format', choices=('markdown', 'csv'), default='markdown')
    return parser


def _quantize(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .quantize import execute, prepare
    from .tables import report_summary

    command = 'oaq ' + ' '.join(shlex.quote(a) for a in argv)
    settings = args.settings + (['export.onnx=true'] if args.onnx else [])
    request = prepare(args.model, args.calib, args.bits, args.test, args.out, args.preset, settings,
                      args.backend, args.network_g, args.param_key, args.scale, not args.quiet, args.resume,
                      command)
    execute(request)
    print(report_summary(request.out))
    print(f'results in {request.out}/ (open report.html)')
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``oaq`` command line; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    def run() -> int:
        if args.command == 'quantize':
            return _quantize(args, argv)
        from .tables import compare_table, report_summary
        if args.command == 'report':
            print(report_summary(Path(args.results)))
            if args.html:
                from ..pipeline.io.html_report import write_html_report
                print(f'written {write_html_report(Path(args.results))}')
            return EXIT_OK
        print(compare_table([Path(p) for p in args.results], args.format))
        return EXIT_OK

    return exit_code_of(run, prog=f'oaq {args.command}', resume_hint='run the same command with --resume',
                        debug=args.debug)


def entry_point() -> None:
    """The ``oaq`` console script."""
    sys.exit(main())


if __name__ == '__main__':
    entry_point()
