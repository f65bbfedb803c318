"""``python -m oaq_plugin.mmengine_plugin.run CONFIG [--work-dir DIR]``: test a config with mmengine's Runner.

The config enables ``OAQHook`` (see ``options/mmengine_oaq_srvgg_x4.py``). Errors the user can fix are
printed as one line (exit code 2); ``--debug`` shows the full traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from ..errors import OAQError


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
    parser.add_argument('--debug', action='store_true', help='show full tracebacks')
    return parser.parse_args(argv)


def build_runner(config: str, work_dir: Optional[str] = None, cfg_options: Optional[dict] = None,
                 launcher: str = 'none'):
    """A Runner from a config file, with ``work_dir`` and ``cfg_options`` applied."""
    from mmengine.config import Config
    from mmengine.runner import Runner
    if not Path(config).is_file():
        raise FileNotFoundError(f'config {config} does not exist')
    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if work_dir:
        cfg.work_dir = work_dir
    elif not cfg.get('work_dir'):
        cfg.work_dir = str(Path('work_dirs') / Path(config).stem)
    cfg.launcher = launcher
    return Runner.from_cfg(cfg)


def main(argv: Optional[List[str]] = None) -> int:
    """Build the runner, run its test loop and print where the report is; returns the exit code."""
    args = parse_args(argv)
    try:
        runner = build_runner(args.config, args.work_dir, args.cfg_options, args.launcher)
        metrics = runner.test()
    except (OAQError, FileNotFoundError) as error:
        if args.debug:
            raise
        print(f'oaq_plugin: error: {error}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('oaq_plugin: interrupted', file=sys.stderr)
        return 130
    report = Path(runner.work_dir) / 'oaq_report.json'
    print(json.dumps({k: float(v) if isinstance(v, (int, float)) else str(v) for k, v in metrics.items()}))
    if report.is_file():
        print(f'report: {report}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
