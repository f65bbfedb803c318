"""The ``oaq`` command: ``quantize`` writes a results folder, ``report`` prints it again, ``compare`` tabulates
runs; every bad input is one line with exit code 2, before anything is written."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spandrel_tiny import save_random_instance, write_image_world
from tiny_sr import single_thread  # noqa: F401 - autouse: one torch thread, as on a busy machine

import oaq_plugin
from oaq_plugin.cli.main import main
from oaq_plugin.errors import Interrupted

QUICK = ['--set', 'search.enabled=false', '--set', 'reconstruction.enabled=false',
         '--set', 'distillation.enabled=false', '--set', 'calib.num_batches=2',
         '--set', 'calib.batch_size=2',
         '--set', 'calib.patch_size=24', '--backend', 'reference']


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp('cli_world')
    folders = write_image_world(root)
    folders['checkpoint'] = save_random_instance('compact', root)
    folders['root'] = root
    folders['test'] = f"Tiny={folders['hr']}:{folders['lr']}"
    return folders


def _quantize(world, out: Path, *extra: str) -> int:
    return main(['quantize', str(world['checkpoint']), '--calib', str(world['calib']), '--test', world['test'],
                 '--out', str(out), '--quiet', *QUICK, *extra])


@pytest.fixture(scope='module')
def runs(world):
    """A W8A8 run in this process and a W4A4 run as a user types it (``python -m oaq_plugin.cli``, progress bars)."""
    results = world['root'] / 'results'
    assert _quantize(world, results / 'compact_w8a8', '--bits', 'w8a8') == 0
    command = [sys.executable, '-m', 'oaq_plugin.cli', 'quantize', str(world['checkpoint']), '--calib',
               str(world['calib']), '--bits', 'w4a4', '--test', world['test'], '--out',
               str(results / 'compact_w4a4'), *QUICK]
    child = subprocess.run(command, capture_output=True, text=True, timeout=600,
                           env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert child.returncode == 0, child.stderr[-3000:]
    return results / 'compact_w8a8', results / 'compact_w4a4', child


def test_quantize_writes_the_results_folder(runs, world):
    w8a8, w4a4, child = runs
    for name in ('oaq_report.json', 'report.html', 'quantized.pth', 'activation_histograms.png', 'run.txt'):
        assert (w8a8 / name).is_file(), name
    assert sorted(p.name for p in (w8a8 / 'crops' / 'Tiny').iterdir()) == ['img0x2.png', 'img1x2.png']
    report = json.loads((w8a8 / 'oaq_report.json').read_text())
    assert report['command'].startswith('oaq quantize ') and '--bits w8a8' in report['command']
    assert report['model']['architecture'] == 'Compact' and report['network_g']['type'] == 'Spandrel'
    assert (report['config']['w_bits'], report['config']['a_bits']) == (8, 8)
    assert report['preset'].startswith('default (search.enabled=false')
    tiny = report['datasets']['Tiny']
    assert tiny['num_images'] == 2 and set(tiny['fp']) == {'psnr', 'ssim'}
    # As a user runs it: progress bars on stderr, then the summary table and where the results are.
    assert 'calibrate' in child.stderr and 'validate Tiny' in child.stderr
    assert 'quantized PSNR' in child.stdout and f'results in {w4a4}/' in child.stdout


def test_quantized_checkpoint_rebuilds_from_the_spandrel_checkpoint(runs, world):
    qmodel = oaq_plugin.to_backend(oaq_plugin.load_quantized(runs[0] / 'quantized.pth'), 'reference')
    float_model = oaq_plugin.load_sr_model(world['checkpoint']).module
    x = torch.rand(1, 3, 12, 12)
    with torch.no_grad():
        difference = (qmodel(x) - float_model(x)).abs().max().item()
    assert 0 < difference < 0.05


def test_report_prints_the_summary_again(runs, capsys):
    assert main(['report', str(runs[0])]) == 0
    printed = capsys.readouterr().out
    assert 'Compact x2, W8A8' in printed and 'quantized PSNR' in printed and 'Tiny' in printed
    (runs[0] / 'report.html').unlink()
    assert main(['report', str(runs[0]), '--html']) == 0
    assert (runs[0] / 'report.html').read_text().startswith('<!DOCTYPE html>')


def test_compare_markdown_and_csv(runs, capsys):
    w8a8, w4a4, _ = runs
    assert main(['compare', str(w8a8), str(w4a4)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith('| run | model | bits | preset | Tiny PSNR | Tiny SSIM | Tiny gap | Tiny ΔE |')
    assert len(lines) == 4 and lines[2].startswith('| compact_w8a8 | Compact x2 | W8A8 |')
    assert main(['compare', str(w8a8), str(w4a4), '--format', 'csv']) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    header, first = rows[0], dict(zip(rows[0], rows[1]))
    assert header[-2:] == ['size KiB', 'time s'] and len(rows) == 3
    tiny = json.loads((w8a8 / 'oaq_report.json').read_text())['datasets']['Tiny']
    assert first['Tiny PSNR'] == f"{tiny['quant']['psnr']:.2f}"
    assert first['Tiny gap'] == f"{tiny['quant']['psnr'] - tiny['fp']['psnr']:.2f}"
    assert first['Tiny ΔE'] == f"{tiny['delta_e']:.2f}"


def test_rerun_archives_the_previous_folder(world):
    out = world['root'] / 'results' / 'again'
    assert _quantize(world, out, '--bits', 'w8a8') == 0
    first = (out / 'run.txt').read_text()
    assert _quantize(world, out, '--bits', 'w6a6') == 0
    archived = [p for p in out.parent.iterdir() if p.name.startswith('again_archived_')]
    assert len(archived) == 1 and (archived[0] / 'run.txt').read_text() == first
    assert 'W6A6' in (out / 'run.txt').read_text()


def _broken_inputs(world, tmp_path):
    junk = tmp_path / 'junk.pth'
    junk.write_bytes(os.urandom(2048))
    unknown = tmp_path / 'unknown.pth'
    torch.save({'my_conv.weight': torch.zeros(4, 3, 3, 3)}, unknown)
    empty = tmp_path / 'empty_calib'
    empty.mkdir()
    model, calib = str(world['checkpoint']), str(world['calib'])
    return {
        'not a checkpoint': ([str(junk), '--calib', calib], 'is not a checkpoint'),
        'unknown architecture': ([str(unknown), '--calib', calib], 'spandrel 0.4.2 does not recognise'),
        'empty calibration folder': ([model, '--calib', str(empty)], 'holds no image'),
        'missing calibration folder': ([model, '--calib', str(tmp_path / 'nowhere')], 'does not exist'),
        'wrong scale': ([model, '--calib', calib, '--test', f"Tiny={world['hr']}:{world['hr']}"],
                        'a x1 pair, but the network is x2'),
        'asked scale': ([model, '--calib', calib, '--scale', '4'], 'is a x2 network'),
        'bad bits': ([model, '--calib', calib, '--bits', 'w4'], '--bits'),
        'bits out of range': ([model, '--calib', calib, '--bits', 'w9a4'], 'w_bits'),
        'misspelt option': ([model, '--calib', calib, '--set', 'search.enabld=false'], "did you mean 'enabled'"),
    }


@pytest.mark.parametrize('case', ['not a checkpoint', 'unknown architecture', 'empty calibration folder',
                                  'missing calibration folder', 'wrong scale', 'asked scale', 'bad bits',
                                  'bits out of range', 'misspelt option'])
def test_bad_input_is_one_line_and_touches_nothing(world, tmp_path, capsys, case):
    arguments, expected = _broken_inputs(world, tmp_path)[case]
    out = tmp_path / 'results' / 'run'
    out.mkdir(parents=True)
    (out / 'previous.txt').write_text('an earlier result')
    assert main(['quantize', *arguments, '--out', str(out), '--quiet']) == 2
    error = capsys.readouterr().err.strip()
    assert expected in error and '\n' not in error and error.startswith('oaq quantize: error: ')
    assert sorted(p.name for p in out.parent.iterdir()) == ['run']  # not archived, nothing new
    assert (out / 'previous.txt').read_text() == 'an earlier result'


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as caught:
        main(['quantize', 'model.pth'])
    assert caught.value.code == 2
    error = capsys.readouterr().err.strip()
    assert '--calib' in error and '\n' not in error and 'oaq quantize --help' in error
    with pytest.raises(SystemExit) as caught:
        main(['--help'])
    assert caught.value.code == 0
    text = capsys.readouterr().out
    assert all(command in text for command in ('quantize', 'report', 'compare'))


def test_report_and_compare_refuse_a_folder_without_report(tmp_path, capsys):
    assert main(['report', str(tmp_path)]) == 2
    assert 'holds no oaq_report.json' in capsys.readouterr().err
    assert main(['compare', str(tmp_path / 'missing')]) == 2
    assert 'no results folder' in capsys.readouterr().err


def test_basicsr_arch_by_name(world, tmp_path):
    """``--network-g`` puts a checkpoint into a BasicSR arch; quantized.pth rebuilds through the same arch."""
    spec = {'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 8, 'num_block': 1, 'upscale': 2}
    model = oaq_plugin.load_sr_model(spec).module
    torch.save({'params': model.state_dict()}, tmp_path / 'edsr.pth')
    out = tmp_path / 'edsr'
    code = main(['quantize', str(tmp_path / 'edsr.pth'), '--network-g', json.dumps(spec), '--calib',
                 str(world['calib']), '--out', str(out), '--quiet', *QUICK])
    assert code == 0
    report = json.loads((out / 'oaq_report.json').read_text())
    assert report['network_g'] == spec and report['model']['architecture'] == 'EDSR'
    oaq_plugin.load_quantized(out / 'quantized.pth')


def test_interrupted_run_names_the_state_and_exits_130(world, tmp_path, monkeypatch, capsys):
    def stop(request):
        raise Interrupted(request.state_path, 2)

    monkeypatch.setattr('oaq_plugin.cli.quantize.execute', stop)
    assert _quantize(world, tmp_path / 'stopped', '--bits', 'w8a8') == 130
    error = capsys.readouterr().err.strip()
    assert '.oaq_state' in error and '--resume' in error and '\n' not in error


def test_compare_reads_reports_of_other_entry_points(runs, tmp_path, capsys):
    """A BasicSR run's report (no ``model`` entry: the arch is its network_g) compares with a CLI run's."""
    report = json.loads((runs[0] / 'oaq_report.json').read_text())
    for key in ('model', 'preset', 'command'):
        report.pop(key)
    report['name'] = 'oaq_rcan_x2'
    report['network_g'] = {'type': 'Spandrel', 'checkpoint': '/models/4x_rcan.pth', 'scale': 2}
    (tmp_path / 'basicsr_run').mkdir()
    (tmp_path / 'basicsr_run' / 'oaq_report.json').write_text(json.dumps(report))
    assert main(['compare', str(runs[0]), str(tmp_path / 'basicsr_run')]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[3].startswith('| oaq_rcan_x2 | Spandrel 4x_rcan.pth x2 | W8A8 | default |')
