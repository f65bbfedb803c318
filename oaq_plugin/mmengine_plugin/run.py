"""``python -m oaq_plugin.mmengine_plugin.run CONFIG [--work-dir DIR]``: test a config with mmengine's Runner.

The config enables ``OAQHook`` (see ``options/mmengine_oaq_srvgg_x4.py``). Every ``OAQHook``'s options,
its calibration folder and the model's checkpoint are checked before the Runner makes its work folder.
Errors the user can fix are printed as one line (exit code 2); ``--debug`` shows the full traceback.
SIGINT/SIGTERM during the quantization save its state to ``<work_dir>/oaq_resume_state.pth`` (exit code
130/143); ``--auto-resume`` (or ``oaq.resume: true``) continues from it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, List, Mapping, Optional

from ..errors import DataError, exit_code_of


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(description='Quantize and test an SR network with mmengine and OAQHook.')
    parser.add_argument('config', help='mmengine config file (Python)')
    parser.add_argument('--work-dir', help='where logs and oaq_report.json go (default: the config\'s work_dir, '
                                           'else work_dirs/<config name>)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={},
                        help='override config entries, e.g. custom_hooks.0.oaq.w_bits=8')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none',
                        help="'pytorch' under torchrun: calibration batches are split across the processes")
    parser.add_argument('--auto-resume', action='store_true',
                        help='continue an interrupted quantization from <work_dir>/oaq_resume_state.pth '
                             '(sets oaq.resume of every OAQHook)')
    parser.add_argument('--debug', action='store_true', help='show full tracebacks')
    return parser.parse_args(argv)


def oaq_hooks(cfg: Any) -> List[Mapping[str, Any]]:
    """The ``OAQHook`` entries of a config's ``custom_hooks``."""
    return [hook for hook in (cfg.get('custom_hooks') or []) if isinstance(hook, Mapping)
            and hook.get('type') in ('OAQHook', 'oaq_plugin.mmengine_plugin.OAQHook')]


def check_config(cfg: Any) -> None:
    """Check what a run will need before anything is made: each ``OAQHook``'s ``oaq`` options and calibration
    folder, and the model's checkpoint (``model.pretrained``, ``load_from``).

    Raises:
        ConfigError, DataError: The first problem, named.
    """
    from ..config import OAQOptions
    from ..experiment import calibration_source
    for hook in oaq_hooks(cfg):
        options = OAQOptions.coerce(hook.get('oaq'))
        if hook.get('calib_dataloader') is None and options.method.calib.dataroot_lq:
            calibration_source(options.method.calib)
    model = cfg.get('model') or {}
    for where, path in (('model.pretrained', model.get('pretrained') if isinstance(model, Mapping) else None),
                        ('load_from', cfg.get('load_from'))):
        if path and not Path(path).is_file():
            raise DataError(f'checkpoint {path} does not exist ({where})')


def build_runner(config: str, work_dir: Optional[str] = None, cfg_options: Optional[dict] = None,
                 launcher: str = 'none', auto_resume: bool = False):
    """A Runner from a config file, with ``work_dir`` and ``cfg_options`` applied, checked first."""
    from mmengine.config import Config
    from mmengine.runner import Runner
    if not Path(config).is_file():
        raise FileNotFoundError(f'config {config} does not exist')
    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if auto_resume:
        for hook in oaq_hooks(cfg):
            hook['oaq'] = dict(hook.get('oaq') or {}, resume=True)
    if work_dir:
        cfg.work_dir = work_dir
    elif not cfg.get('work_dir'):
        cfg.work_dir = str(Path('work_dirs') / Path(config).stem)
    cfg.launcher = launcher
    check_config(cfg)
    return Runner.from_cfg(cfg)


def main(argv: Optional[List[str]] = None) -> int:
    """Build the runner, run its test loop and print where the report is; returns the exit code."""
    args = parse_args(argv)
    ran = {}

    def run() -> int:
        ran['runner'] = build_runner(args.config, args.work_dir, args.cfg_options, args.launcher, args.auto_resume)
        ran['metrics'] = ran['runner'].test()
        return 0

    code = exit_code_of(run, prog='oaq_plugin', resume_hint='rerun with --auto-resume (or oaq.resume: true)',
                        debug=args.debug)
    if code != 0:
        return code
    runner, metrics = ran['runner'], ran['metrics']
    from ..experiment import REPORT_FILE
    report = Path(runner.work_dir) / REPORT_FILE
    print(json.dumps({k: float(v) if isinstance(v, (int, float)) else str(v) for k, v in metrics.items()}))
    if report.is_file():
        print(f'report: {report}')
    print(f'results in {runner.work_dir}/')
    return 0


if __name__ == '__main__':
    sys.exit(main())
