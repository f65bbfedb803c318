"""Checks of a BasicSR option file before a run makes or archives any folder: the ``oaq:`` options, the
calibration images, the test sets' folders and the pretrained checkpoint, each refused with one line."""
from __future__ import annotations

import os
from typing import Any, Mapping, MutableMapping, Sequence

from ..config import OAQOptions
from ..errors import ConfigError, DataError

OAQ_MODEL_TYPES = ('OAQModel', 'OAQSwinIRModel')


def load_option_file(path: str, force_yml: Sequence[str] = ()) -> MutableMapping[str, Any]:
    """The option file as BasicSR reads it (ordered mappings), with ``--force_yml`` overrides applied.

    An override is ``key:key:...=value``; the value is read as BasicSR reads it (``~``/``none``, booleans,
    numbers, lists, else a string).

    Raises:
        FileNotFoundError: No such option file.
        ConfigError: An override that is not ``keys=value`` or names a section that does not exist.
    """
    import yaml
    from basicsr.utils.options import _postprocess_yml_value, ordered_yaml
    if not os.path.isfile(path):
        raise FileNotFoundError(f'option file {path} does not exist')
    with open(path) as stream:
        opt = yaml.load(stream, Loader=ordered_yaml()[0])
    for entry in force_yml:
        keys, sep, value = entry.partition('=')
        if not sep or not keys.strip():
            raise ConfigError(f'--force_yml {entry!r}: expected keys=value, for example oaq:w_bits=8')
        *parents, leaf = [key.strip() for key in keys.split(':')]
        target = opt
        for depth, key in enumerate(parents):
            if not isinstance(target, MutableMapping) or key not in target:
                where = ':'.join(parents[:depth + 1])
                raise ConfigError(f'--force_yml {entry!r}: the option file has no section {where}')
            target = target[key]
        target[leaf] = _postprocess_yml_value(value.strip())
    return opt


def check_option_file(opt: Mapping[str, Any]) -> None:
    """Check what an ``OAQModel`` run will read, before BasicSR archives ``results/<name>``.

    Raises:
        ConfigError: A bad or missing ``oaq:`` option.
        DataError: A missing or unusable calibration folder, test-set folder or checkpoint.
    """
    if opt.get('model_type') not in OAQ_MODEL_TYPES:
        return
    if 'oaq' not in opt:
        raise ConfigError("the option file has no 'oaq:' section; OAQModel needs at least oaq.calib.dataroot_lq")
    from ..experiment import calibration_source
    options = OAQOptions.from_dict(opt['oaq'])
    calibration_source(options.method.calib)
    for key, dataset in (opt.get('datasets') or {}).items():
        io_backend = (dataset.get('io_backend') or {}).get('type', 'disk') if isinstance(dataset, Mapping) else 'disk'
        for root in ('dataroot_gt', 'dataroot_lq'):
            folder = dataset.get(root) if isinstance(dataset, Mapping) else None
            if folder and not os.path.exists(os.path.expanduser(folder)):
                raise DataError(f'datasets.{key}.{root}: {folder} does not exist')
            if folder and io_backend == 'disk' and not os.path.isdir(os.path.expanduser(folder)):
                raise DataError(f'datasets.{key}.{root}: {folder} is not a folder')
    _check_checkpoint(opt)


def _check_checkpoint(opt: Mapping[str, Any]) -> None:
    paths = opt.get('path') or {}
    load_path = paths.get('pretrain_network_g')
    if not load_path:
        return
    load_path = os.path.expanduser(load_path)
    if not os.path.isfile(load_path):
        raise DataError(f'pretrained checkpoint {load_path} does not exist (path.pretrain_network_g)')
    from basicsr.utils.registry import ARCH_REGISTRY

    from .oaq_model import check_checkpoint
    from .registration import register
    from .spandrel_arch import loaded_from, network_options
    register()
    arguments = dict(network_options(opt))
    kind = arguments.pop('type', None)
    # Built from the registry, not with BasicSR's build_network: that one logs through BasicSR's root
    # logger, and a first use before the run sets it up leaves the run without its log file.
    try:
        network = ARCH_REGISTRY.get(kind)(**arguments)
    except (KeyError, TypeError) as error:
        raise ConfigError(f'network_g: cannot build {kind!r}: {error}') from None
    if not loaded_from(network, load_path):
        check_checkpoint(network, load_path, paths.get('strict_load_g', True), paths.get('param_key_g', 'params'))
