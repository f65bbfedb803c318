"""Interrupt and resume: a run stopped at a safe point (by code or by a real signal) and resumed ends with
exactly the parameters of an uninterrupted run; mismatched resumes are refused; the CLI exits 130/143."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from oaq_plugin import ConfigError, DataError, Interrupted, OAQConfig, OAQOptions, run_pipeline
from oaq_plugin.pipeline.io.patches import PatchSource
from oaq_plugin.pipeline.resume import StopRequest, load_state, stop_on_signals
from oaq_plugin.quant.activation import activation_quantizers
from tiny_sr import TinyResSR, tiny_images, single_thread  # noqa: F401 (autouse fixture)

OPTIONS = {
    'calib': {'num_batches': 3, 'batch_size': 4, 'patch_size': 12},
    'search': {'grid_size': 4, 'refine_rounds': 0, 'num_samples': 2, 'window': 8},
    'reconstruction': {'enabled': False}, 'distillation': {'enabled': False},
    'finetune': {'enabled': True, 'epochs': 3, 'iters_per_epoch': 4, 'batch_size': 2, 'patch_size': 12,
                 'tap_samples': 4, 'lr': 1e-2},
}
# Finetuning draws ceil(tap_samples / batch_size) crops for the tap statistics before its first iteration.
TAP_STAT_DRAWS = 2


class CountingSource(PatchSource):
    """A calibration pool that calls ``action`` when its ``at``-th finetuning batch is drawn."""

    def __init__(self, images, at, action):
        super().__init__(images)
        self.draws, self.at, self.action = 0, at, action

    def batch(self, *args, **kwargs):
        self.draws += 1
        if self.draws == self.at:
            self.action()
        return super().batch(*args, **kwargs)


class StopAtCheck(StopRequest):
    """A stop request that sets itself at its ``at``-th reading, i.e. at the ``at``-th safe point."""

    def __init__(self, at):
        super().__init__()
        self.reads, self.at = 0, at

    def is_set(self):
        self.reads += 1
        if self.reads == self.at:
            self.set(signal.SIGTERM)
        return super().is_set()


def world(options=OPTIONS):
    torch.manual_seed(0)
    model = TinyResSR().eval()
    images = tiny_images()
    batches = PatchSource(images).batches(3, 4, 12, seed=1)
    return model, images, batches, OAQConfig.from_dict(options)


def assert_same_result(a, b):
    params_a, params_b = dict(a.model.named_parameters()), dict(b.model.named_parameters())
    assert list(params_a) == list(params_b)
    for key in params_a:
        assert torch.equal(params_a[key], params_b[key]), key
    buffers_a, buffers_b = dict(a.model.named_buffers()), dict(b.model.named_buffers())
    assert list(buffers_a) == list(buffers_b)
    for key in buffers_a:
        # Some buffers hold NaN for "not set", which torch.equal never calls equal.
        torch.testing.assert_close(buffers_a[key], buffers_b[key], rtol=0, atol=0, equal_nan=True)
    observed_a = {name: q.observed for name, q in activation_quantizers(a.model)}
    assert observed_a == {name: q.observed for name, q in activation_quantizers(b.model)}
    if 'search' in a.reports:
        assert [layer.searched for layer in a.reports['search'].layers] == [layer.searched
                                                                           for layer in b.reports['search'].layers]
    if 'finetune' in a.reports:
        assert [(e.group, e.lr, e.loss) for e in a.reports['finetune'].epochs] == [
            (e.group, e.lr, e.loss) for e in b.reports['finetune'].epochs]


@pytest.fixture(scope='module')
def uninterrupted():
    # Module-scoped fixtures start before the single-thread one, and the thread count can change the last
    # bit of a float sum: the reference runs with the same single thread as the tests.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, images, batches, config = world()
        return run_pipeline(model, batches, config, finetune_source=PatchSource(images))
    finally:
        torch.set_num_threads(threads)


def test_finetuning_stopped_by_code_resumes_to_identical_parameters(uninterrupted, tmp_path):
    model, images, batches, config = world()
    path = tmp_path / 'state.pth'
    stop = StopRequest()
    # Asked for while iteration 5 draws its batch: the run stops at the next safe point, before iteration 6.
    source = CountingSource(images, TAP_STAT_DRAWS + 6, lambda: stop.set(signal.SIGTERM))
    with pytest.raises(Interrupted) as info:
        run_pipeline(model, batches, config, finetune_source=source, state_path=path, stop=stop)
    assert info.value.state_path == str(path) and info.value.exit_code == 128 + signal.SIGTERM
    state = load_state(path)
    assert state['stage'] == 'finetune'
    assert (state['progress']['epoch'], state['progress']['iteration']) == (1, 2)
    resumed = run_pipeline(model, batches, config, finetune_source=PatchSource(images), state_path=path, resume=True)
    assert_same_result(resumed, uninterrupted)
    assert not path.exists(), 'the state file is deleted once the run is complete'


def test_real_sigint_during_finetuning_saves_and_resumes(uninterrupted, tmp_path):
    model, images, batches, config = world()
    path = tmp_path / 'state.pth'
    before = signal.getsignal(signal.SIGINT)
    source = CountingSource(images, TAP_STAT_DRAWS + 3, lambda: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(Interrupted) as info:
        run_pipeline(model, batches, config, finetune_source=source, state_path=path)
    assert info.value.signum == signal.SIGINT and info.value.exit_code == 130
    assert signal.getsignal(signal.SIGINT) is before, 'the previous SIGINT handler is back'
    assert load_state(path)['progress']['iteration'] == 3
    resumed = run_pipeline(model, batches, config, finetune_source=PatchSource(images), state_path=path, resume=True)
    assert_same_result(resumed, uninterrupted)


@pytest.mark.parametrize('at,stage', [(2, 'calibrate'), (5, 'search')])
def test_calibration_or_search_stopped_resumes_to_identical_parameters(uninterrupted, tmp_path, at, stage):
    model, images, batches, config = world()
    path = tmp_path / 'state.pth'
    # Safe points: after each of the 3 calibration batches, then before each searched layer.
    with pytest.raises(Interrupted):
        run_pipeline(model, batches, config, finetune_source=PatchSource(images), state_path=path,
                     stop=StopAtCheck(at))
    state = load_state(path)
    assert state['stage'] == stage
    if stage == 'calibrate':
        assert state['progress'] == {'batches_done': 2}
    else:
        assert len(state['progress']['report']['layers']) == 1
    resumed = run_pipeline(model, batches, config, finetune_source=PatchSource(images), state_path=path, resume=True)
    assert_same_result(resumed, uninterrupted)


def test_sequential_search_stopped_resumes_to_identical_parameters(tmp_path):
    # Sequential search: each layer is searched on the inputs of the already searched layers before it.
    options = {**OPTIONS, 'search': {**OPTIONS['search'], 'sequential': True},
               'finetune': {**OPTIONS['finetune'], 'enabled': False}}
    model, images, batches, config = world(options)
    reference = run_pipeline(model, batches, config)
    path = tmp_path / 'state.pth'
    with pytest.raises(Interrupted):
        run_pipeline(model, batches, config, state_path=path, stop=StopAtCheck(3 + 4))
    assert len(load_state(path)['progress']['report']['layers']) == 3
    assert_same_result(run_pipeline(model, batches, config, state_path=path, resume=True), reference)


def test_resume_is_refused_when_the_result_would_differ(tmp_path):
    options = {**OPTIONS, 'finetune': {**OPTIONS['finetune'], 'enabled': False}}
    model, images, batches, config = world(options)
    path = tmp_path / 'state.pth'
    with pytest.raises(Interrupted):
        run_pipeline(model, batches, config, state_path=path, stop=StopAtCheck(1))
    changed = config.replace(w_bits=3)
    with pytest.raises(ConfigError, match=r'oaq\.w_bits was 4, is 3'):
        run_pipeline(model, batches, changed, state_path=path, resume=True)
    with pytest.raises(DataError, match='calibration batches differ'):
        run_pipeline(model, [b + 0.01 for b in batches], config, state_path=path, resume=True)
    with torch.no_grad():
        other = TinyResSR().eval()
    with pytest.raises(DataError, match='float weights differ'):
        run_pipeline(other, batches, config, state_path=path, resume=True)
    # The run's options (backend, tiles, analyses) are not part of the method's config the state is checked
    # against: with the same method config, resuming is fine.
    run_pipeline(model, batches, config, state_path=path, resume=True)
    assert not path.exists()


def test_second_signal_stops_at_once_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with stop_on_signals() as request:
            os.kill(os.getpid(), signal.SIGTERM)
            assert request.signum == signal.SIGTERM
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler raises before this ends
    assert signal.getsignal(signal.SIGTERM) is before


# -- the CLI ---------------------------------------------------------------------------------------------
def tiny_basicsr_world(root: Path) -> Path:
    """A BasicSR run small enough for seconds: a 2-conv SRVGG x2, one 16x16 test image, 2 calibration images."""
    cv2 = pytest.importorskip('cv2')
    from basicsr.archs.srvgg_arch import SRVGGNetCompact
    rng = np.random.default_rng(0)
    for folder, size in (('test/HR', 32), ('test/LR', 16), ('calib', 24)):
        (root / folder).mkdir(parents=True)
    hr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    cv2.imwrite(str(root / 'test/HR/a.png'), hr)
    cv2.imwrite(str(root / 'test/LR/a.png'), cv2.resize(hr, (16, 16), interpolation=cv2.INTER_AREA))
    for index in range(2):
        cv2.imwrite(str(root / f'calib/{index}.png'), rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
    network = {'type': 'SRVGGNetCompact', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 8, 'num_conv': 2,
               'upscale': 2, 'act_type': 'prelu'}
    torch.manual_seed(0)
    arch = SRVGGNetCompact(**{k: v for k, v in network.items() if k != 'type'})
    torch.save({'params': arch.state_dict()}, root / 'tiny.pth')
    oaq = OAQOptions.from_dict({
        'backend': 'fake',
        'calib': {'dataroot_lq': str(root / 'calib'), 'num_batches': 2, 'batch_size': 2, 'patch_size': 12},
        'search': {'enabled': False},
        'finetune': {'enabled': True, 'epochs': 3, 'iters_per_epoch': 200, 'batch_size': 1, 'patch_size': 12,
                     'tap_samples': 1}}).to_dict()
    options = {
        'name': 'tiny_resume', 'model_type': 'OAQModel', 'scale': 2, 'num_gpu': 0, 'manual_seed': 0,
        'datasets': {'test_1': {'name': 'tiny', 'type': 'PairedImageDataset', 'dataroot_gt': str(root / 'test/HR'),
                                'dataroot_lq': str(root / 'test/LR'), 'io_backend': {'type': 'disk'}}},
        'network_g': network,
        'path': {'pretrain_network_g': str(root / 'tiny.pth'), 'strict_load_g': True, 'param_key_g': 'params'},
        'val': {'save_img': False, 'pbar': False,
                'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 2, 'test_y_channel': True}}},
        'oaq': oaq,
    }
    path = root / 'tiny_resume.yml'
    path.write_text('oaq_register: !!python/name:oaq_plugin.register\n' + yaml.safe_dump(options, sort_keys=False))
    return path


def test_cli_sigterm_exits_143_with_one_line_and_auto_resume_completes(tmp_path):
    option_file = tiny_basicsr_world(tmp_path)
    command = [sys.executable, '-m', 'oaq_plugin.test', '-opt', str(option_file)]
    # One thread: a tiny network gains nothing from more, and on a busy machine spinning threads cost a lot.
    env = dict(os.environ, OMP_NUM_THREADS='1')
    log = tmp_path / 'first.err'
    with open(log, 'w') as stderr:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        # The finetuning progress bar appears once the handlers are installed and the work is under way.
        deadline = time.monotonic() + 60
        while 'finetune (sensitivity)' not in log.read_text() and process.poll() is None:
            assert time.monotonic() < deadline, 'finetuning did not start'
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    text = log.read_text()
    state = tmp_path / 'experiments/tiny_resume/oaq_resume_state.pth'
    assert code == 143, text[-2000:]
    assert 'Traceback' not in text
    assert text.splitlines()[-1] == (f'oaq_plugin: interrupted; state saved to {state}; rerun with --auto_resume '
                                     '(or oaq.resume: true) to continue')
    assert load_state(state)['stage'] == 'finetune'

    result = subprocess.run(command + ['--auto_resume'], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f'OAQ: resuming from {state}' in result.stderr
    assert (tmp_path / 'results/tiny_resume/quantized.pth').is_file()
    assert not state.exists() and not state.parent.exists()
