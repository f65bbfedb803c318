"""``oaq quantize``: every input is checked first (model, calibration folder, test sets, options), then one
run of :func:`oaq_plugin.experiment.run_experiment` writes the results folder, ``report.html`` included."""
from __future__ import annotations

import contextlib
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import yaml

from ..config import OAQOptions
from ..errors import ConfigError, DataError, OAQError
from ..experiment import STATE_FILE, TestSet
from ..loading import SRModel, load_sr_model

_SCALE_SUFFIX = re.compile(r'x\d+$')


@dataclass
class QuantizeRequest:
    """Everything ``oaq quantize`` was asked, checked."""

    model: SRModel
    options: OAQOptions
    preset: str
    test_sets: List[TestSet]
    out: Path
    command: str
    progress: bool = True
    resume: bool = False

    @property
    def state_path(self) -> Path:
        """Where an interrupted run keeps its state: beside ``out``, since a rerun archives ``out`` itself."""
        return self.out.parent / '.oaq_state' / self.out.name / STATE_FILE


def parse_bits(text: str) -> Tuple[int, int]:
    """``w4a4`` / ``W8A8`` / ``w4a8`` / ``4`` -> ``(w_bits, a_bits)``."""
    match = re.fullmatch(r'[wW](\d+)[aA](\d+)|(\d+)', text.strip())
    if not match:
        raise ConfigError(f"--bits {text!r}: expected WxAy (for example w4a4 or w8a8) or one number for both")
    if match.group(3):
        return int(match.group(3)), int(match.group(3))
    return int(match.group(1)), int(match.group(2))


def parse_setting(text: str) -> Tuple[List[str], Any]:
    """``search.enabled=false`` -> ``(['search', 'enabled'], False)`` (the value read as YAML)."""
    key, sep, value = text.partition('=')
    if not sep or not key.strip():
        raise ConfigError(f'--set {text!r}: expected KEY=VALUE, for example calib.num_batches=2')
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f'--set {text!r}: the value is not valid YAML ({error.problem})') from None
    return key.strip().split('.'), parsed


def build_options(bits: Tuple[int, int], preset: str, settings: Sequence[str], calib: str,
                  backend: Optional[str]) -> OAQOptions:
    """The ``oaq:`` section the flags describe: ``--bits``, ``--calib`` and ``--set`` over the preset's recipe
    (a preset of :data:`oaq_plugin.config.PRESETS`, which fills only what is not given)."""
    section: Dict[str, Any] = {'preset': preset, 'w_bits': bits[0], 'a_bits': bits[1], 'calib': {'dataroot_lq': calib}}
    if backend is not None:
        section['backend'] = backend
    for text in settings:
        keys, value = parse_setting(text)
        target = section
        for key in keys[:-1]:
            inner = target.setdefault(key, {})
            if not isinstance(inner, dict):
                raise ConfigError(f'--set {text!r}: {key} is not a section')
            target = inner
        target[keys[-1]] = value
    return OAQOptions.from_dict(section)


def parse_test_set(text: str, scale: int) -> TestSet:
    """``NAME=HR_DIR:LR_DIR`` (or ``NAME=LR_DIR``: fidelity to the FP output only), images paired by name.

    An LR file pairs with the HR file of the same name, or of its name without an ``x<scale>`` suffix
    (``babyx4.png`` with ``baby.png``), as in BasicSR's benchmark folders.
    """
    from ..pipeline.io.images import IMAGE_SUFFIXES
    name, sep, dirs = text.partition('=')
    if not sep or not name or not dirs:
        raise ConfigError(f'--test {text!r}: expected NAME=HR_DIR:LR_DIR (or NAME=LR_DIR without ground truth)')
    hr_text, sep, lr_text = dirs.partition(':')
    hr_dir, lr_dir = (Path(hr_text), Path(lr_text)) if sep else (None, Path(hr_text))
    for what, folder in (('HR', hr_dir), ('LR', lr_dir)):
        if folder is not None and not folder.is_dir():
            raise DataError(f'--test {name}: the {what} folder {folder} does not exist')

    def images(folder: Path) -> List[Path]:
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    lr_images = images(lr_dir)
    if not lr_images:
        raise DataError(f'--test {name}: the LR folder {lr_dir} holds no image ({", ".join(IMAGE_SUFFIXES)})')
    test_set = TestSet(name, lr_dir=lr_dir, hr_dir=hr_dir)
    hr_by_stem = {p.stem: p for p in images(hr_dir)} if hr_dir is not None else {}
    for lr in lr_images:
        if hr_dir is None:
            test_set.pairs.append((lr, None))
            continue
        hr = hr_by_stem.get(lr.stem) or hr_by_stem.get(_SCALE_SUFFIX.sub('', lr.stem))
        if hr is None:
            raise DataError(f'--test {name}: no HR image in {hr_dir} for {lr.name} (expected '
                            f'{_SCALE_SUFFIX.sub("", lr.stem)}.<ext>)')
        test_set.pairs.append((lr, hr))
    if hr_dir is not None:
        _check_scale(test_set, scale)
    return test_set


def _image_size(path: Path) -> Tuple[int, int]:
    import cv2
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise DataError(f'cannot read image {path}')
    return image.shape[0], image.shape[1]


def _check_scale(test_set: TestSet, scale: int) -> None:
    lr, hr = test_set.pairs[0]
    (lh, lw), (hh, hw) = _image_size(lr), _image_size(hr)
    # BasicSR crops the HR image to LR * scale (benchmark HR sides are not always multiples of the scale).
    if not (lh * scale <= hh < (lh + 1) * scale and lw * scale <= hw < (lw + 1) * scale):
        ratio = f'x{hh / lh:.2g}' if lh else 'unknown'
        raise DataError(f'--test {test_set.name}: {hr.name} is {hw}x{hh} and its LR {lr.name} {lw}x{lh}, a '
                        f'{ratio} pair, but the network is x{scale}; give the LR folder of scale x{scale}')


def prepare(model: str, calib: str, bits: str, tests: Sequence[str], out: Optional[str], preset: str,
            settings: Sequence[str], backend: Optional[str], network: Optional[str], param_key: Optional[str],
            scale: Optional[int], progress: bool, resume: bool, command: str) -> QuantizeRequest:
    """Check every input of ``oaq quantize`` before anything is written; one clear error for the first bad one."""
    options = build_options(parse_bits(bits), preset, settings, calib, backend)
    if network is not None:
        try:
            spec = yaml.safe_load(network)
        except yaml.YAMLError as error:
            raise ConfigError(f'--network-g: not valid YAML/JSON ({error.problem})') from None
        if not isinstance(spec, dict):
            raise ConfigError(f"--network-g: expected a mapping such as {{type: EDSR, num_feat: 64}}, got {network!r}")
        loaded = load_sr_model(spec, checkpoint=model, param_key=param_key, scale=scale)
    else:
        loaded = load_sr_model(model, scale=scale)
    if loaded.input_channels not in (1, 3):
        raise OAQError(f'{loaded.source}: a {loaded.input_channels}-channel network; the CLI feeds RGB or grayscale '
                       'images')
    calib_source(options, loaded)  # fails here, before any folder is made, when the folder is empty or unreadable
    test_sets = [parse_test_set(text, loaded.scale) for text in tests]
    names = [t.name for t in test_sets]
    if len(set(names)) != len(names):
        raise ConfigError(f'--test: a name is given twice ({", ".join(names)})')
    if out is None:
        stem = Path(model).stem if network is not None or Path(model).is_file() else model.removeprefix('zoo:')
        out = str(Path('results') / f'{stem}_W{options.method.w_bits}A{options.method.a_bits}_{preset}')
    # The label reports and ``oaq compare`` show: the preset, and what --set changed in it.
    label = preset + (f" ({', '.join(settings)})" if settings else '')
    return QuantizeRequest(loaded, options, label, test_sets, Path(out), command, progress, resume)


def to_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """An RGB (3, H, W) image as the network takes it: unchanged, or its BT.601 luma for a 1-channel network."""
    if channels == 3:
        return image
    weights = image.new_tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    return (image * weights).sum(dim=0, keepdim=True)


def calib_source(options: OAQOptions, model: SRModel) -> Any:
    """The calibration pool (checked: an empty or missing folder is refused), in the network's channels."""
    from ..experiment import calibration_source
    from ..pipeline.io.patches import PatchSource
    source = calibration_source(options.method.calib)
    if model.input_channels == 3:
        return source
    loaders: List[Callable[[], torch.Tensor]] = [
        (lambda i=i: to_channels(source.image(i), model.input_channels)) for i in range(len(source))]
    return PatchSource(loaders, source.names)


def console_logger() -> logging.Logger:
    """The run's progress lines (``OAQ: ...``, as the adapters log them) on stderr."""
    logger = logging.getLogger('oaq_plugin.cli')
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter('%(message)s'))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def execute(request: QuantizeRequest) -> Dict[str, Any]:
    """The run: calibrate, quantize, validate and write the artifacts, ``report.html`` among them (see
    :func:`~oaq_plugin.experiment.run_experiment`); returns the report dict."""
    from ..experiment import run_experiment

    model, logger = request.model, console_logger()
    logger.info(f'OAQ: {model.summary()}')
    calibration = calib_source(request.options, model)
    result = run_experiment(
        model.module, calibration, request.test_sets, request.options, request.out, logger, scale=model.scale,
        window=model.size_multiple, to_input=lambda image: to_channels(image, model.input_channels),
        arch=model.network_g, origin=str(request.options.method.calib.dataroot_lq),
        report_extra={'command': request.command, 'network_g': model.network_g, 'model': {
            'architecture': model.architecture, 'scale': model.scale, 'source': model.source,
            'input_channels': model.input_channels, 'channel_layout': model.channel_layout,
            'input_range': list(model.input_range), 'tags': list(model.tags)}},
        preset=request.preset, progress=request.progress, state_path=request.state_path, resume=request.resume)
    with contextlib.suppress(OSError):  # the state folder, once the run that needed it is complete and empty
        request.state_path.parent.parent.rmdir()
    return result.report
