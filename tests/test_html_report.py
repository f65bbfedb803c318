"""``report.html``: its content from a report dict, and the real page of a CLI run in headless Chromium
(no console error, the layer table sorts, a screenshot shows the table and a figure)."""
from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Dict, List

import cv2
import numpy as np
import pytest

from spandrel_tiny import save_random_instance, write_image_world
from tiny_sr import single_thread  # noqa: F401 - autouse: one torch thread, as on a busy machine

from oaq_plugin.cli.main import main
from oaq_plugin.pipeline.io.html_report import render_html, summary_rows, write_html_report


def _report(**extra: Any) -> Dict[str, Any]:
    layers = [{'name': f'body.{i}', 'kind': 'Conv2d', 'role': 'body', 'w_bits': 4, 'a_bits': 4,
               'quantizer': 'DualRegionQuantizer', 'lower': -1.0 - i, 'upper': 2.0 + i, 'breakpoint': 0.5 * (3 - i),
               'outlier_fraction': 0.01 * i, 'w_clip': 0.3, 'backend': 'reference'} for i in range(3)]
    layers.append({'name': '<script>alert(1)</script>', 'kind': 'matmul', 'role': 'body', 'w_bits': None,
                   'a_bits': 4, 'quantizer': 'DualRegionQuantizer', 'lower': 0.0, 'upper': 1.0, 'breakpoint': None,
                   'outlier_fraction': None, 'w_clip': None, 'backend': 'fake'})
    return {'name': 'run_a', 'config': {'w_bits': 4, 'a_bits': 4, 'act_quantizer': 'dual_region', 'levels': 'paper',
                                        'protocol': 'full'},
            'model': {'architecture': 'RCAN', 'scale': 2, 'source': 'rcan.pth'}, 'layers': layers,
            'datasets': {'Set5': {'fp': {'psnr': 30.0, 'ssim': 0.9}, 'quant': {'psnr': 29.25, 'ssim': 0.88},
                                  'fidelity_psnr': 38.5, 'delta_e': 0.7, 'num_images': 2,
                                  'per_image': {'baby': {'fp_psnr': 31.0, 'quant_psnr': 30.0}}}},
            'timings': {'calibrate_s': 1.5, 'search_s': 2.0, 'validate_s': 3.0},
            'sizes_bytes': {'fp': 40960, 'quant': 6144, 'quantized_pth': 8192}, **extra}


def test_summary_rows_give_each_metric_for_both_networks_and_the_gap():
    header, rows = summary_rows(_report())
    assert header == ['dataset', 'images', 'FP PSNR', 'quantized PSNR', 'gap (dB)', 'FP SSIM', 'quantized SSIM',
                      'fidelity PSNR', 'ΔE']
    assert rows[0][:5] == ['Set5', 2, 30.0, 29.25, -0.75]


def test_page_is_self_contained_and_escaped(tmp_path):
    (tmp_path / 'crops' / 'Set5').mkdir(parents=True)
    ok, png = cv2.imencode('.png', np.full((8, 8, 3), 200, np.uint8))
    (tmp_path / 'crops' / 'Set5' / 'baby.png').write_bytes(png.tobytes())
    (tmp_path / 'activation_histograms.png').write_bytes(png.tobytes())
    report = _report(float_ops=[{'name': 'body.norm', 'kind': 'layer_norm', 'macs': 100,
                                 'reason': 'normalisation: not a quantized op type'}],
                     layer_sensitivity={'layers': [{'name': 'body.0', 'role': 'first', 'w_bits': 4, 'a_bits': 4,
                                                    'psnr': 40.0, 'drop': 0.5},
                                                   {'name': 'body.1', 'role': 'body', 'w_bits': 4, 'a_bits': 4,
                                                    'psnr': 41.0, 'drop': 0.1}]})
    page = render_html(report, tmp_path)
    assert 'Content-Security-Policy' in page and "default-src 'none'" in page
    assert 'http://' not in page and 'https://' not in page and 'src="data:image/png;base64,' in page
    assert page.count('data:image/png;base64,') == 2  # the histograms and the one crop
    assert '<script>alert(1)</script>' not in page and '&lt;script&gt;alert(1)&lt;/script&gt;' in page
    assert page.count('<tr><td class="text">body.') >= 3
    assert 'normalisation: not a quantized op type' in page and 'Left in float' in page
    assert 'Layer sensitivity' in page and 'width:320.0px' in page  # the largest drop gets the full bar
    assert 'baby: fp psnr 31.00, quant psnr 30.00' in page
    path = write_html_report(tmp_path, report)
    assert path == tmp_path / 'report.html' and path.read_text().startswith('<!DOCTYPE html>')
    (tmp_path / 'oaq_report.json').write_text(json.dumps(report))
    assert write_html_report(tmp_path).read_text().count('<section>') == page.count('<section>')


def test_sections_without_data_are_left_out(tmp_path):
    report = _report()
    report.pop('datasets')
    page = render_html(report, tmp_path)
    assert 'No test set was validated' in page
    for title in ('Activation histograms', 'Layer sensitivity', 'Crops', 'Left in float'):
        assert f'<h2>{title}</h2>' not in page


# -- the page in a real browser ------------------------------------------------------------------------------
CHROMIUM = next((shutil.which(name) for name in ('chromium', 'chromium-browser', 'google-chrome')
                 if shutil.which(name)), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason='no Chromium here (Debian: apt-get install chromium)')


class DevTools:
    """A minimal Chrome DevTools Protocol client over a WebSocket (RFC 6455 text frames, client-masked)."""

    def __init__(self, ws_url: str, timeout: float = 30.0) -> None:
        host_port, _, path = ws_url[len('ws://'):].partition('/')
        host, _, port = host_port.partition(':')
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f'GET /{path} HTTP/1.1\r\nHost: {host_port}\r\nUpgrade: websocket\r\n'
                           f'Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n'
                           ).encode())
        response = b''
        while b'\r\n\r\n' not in response:
            response += self.sock.recv(4096)
        assert response.startswith(b'HTTP/1.1 101'), response[:200]
        self.buffer = response.split(b'\r\n\r\n', 1)[1]
        self.next_id = 0
        self.events: List[Dict[str, Any]] = []

    def _read(self, count: int) -> bytes:
        while len(self.buffer) < count:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError('DevTools closed the connection')
            self.buffer += chunk
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def _send_text(self, text: str) -> None:
        payload = text.encode()
        header = bytes([0x81])
        if len(payload) < 126:
            header += bytes([0x80 | len(payload)])
        elif len(payload) < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack('>H', len(payload))
        else:
            header += bytes([0x80 | 127]) + struct.pack('>Q', len(payload))
        mask = os.urandom(4)
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def _receive(self) -> Dict[str, Any]:
        message = b''
        while True:
            first, second = self._read(2)
            length = second & 0x7F
            if length == 126:
                length = struct.unpack('>H', self._read(2))[0]
            elif length == 127:
                length = struct.unpack('>Q', self._read(8))[0]
            payload = self._read(length)
            opcode = first & 0x0F
            if opcode == 0x8:
                raise ConnectionError('DevTools closed the connection')
            if opcode in (0x9, 0xA):  # ping / pong: not part of a message
                continue
            message += payload
            if first & 0x80:
                return json.loads(message)

    def call(self, method: str, **params: Any) -> Dict[str, Any]:
        self.next_id += 1
        self._send_text(json.dumps({'id': self.next_id, 'method': method, 'params': params}))
        while True:
            message = self._receive()
            if message.get('id') == self.next_id:
                if 'error' in message:
                    raise RuntimeError(f'{method}: {message["error"]}')
                return message.get('result', {})
            self.events.append(message)

    def wait_for(self, event: str, timeout: float = 30.0) -> Dict[str, Any]:
        deadline = time.monotonic() + timeout
        for message in self.events:
            if message.get('method') == event:
                return message
        while time.monotonic() < deadline:
            message = self._receive()
            self.events.append(message)
            if message.get('method') == event:
                return message
        raise TimeoutError(f'no {event} within {timeout} s')

    def evaluate(self, expression: str) -> Any:
        result = self.call('Runtime.evaluate', expression=expression, returnByValue=True, awaitPromise=True)
        if 'exceptionDetails' in result:
            raise RuntimeError(f'{expression}: {result["exceptionDetails"]}')
        return result['result'].get('value')

    def console_errors(self) -> List[str]:
        """Uncaught exceptions, console.error/assert calls and browser log errors (blocked loads, CSP)."""
        errors = []
        for message in self.events:
            method, params = message.get('method'), message.get('params', {})
            if method == 'Runtime.exceptionThrown':
                details = params['exceptionDetails']
                errors.append(f"{details.get('text', '')} {details.get('exception', {}).get('description', '')}")
            elif method == 'Runtime.consoleAPICalled' and params.get('type') in ('error', 'assert'):
                errors.append(' '.join(str(a.get('value', a.get('description'))) for a in params.get('args', [])))
            elif method == 'Log.entryAdded' and params['entry'].get('level') == 'error':
                errors.append(params['entry'].get('text', ''))
        return errors

    def close(self) -> None:
        self.sock.close()


class Browser:
    """Headless Chromium with remote debugging on a free loopback port, and one page to drive."""

    def __init__(self, profile: Path, width: int = 1280, height: int = 1600) -> None:
        self.process = subprocess.Popen(
            [CHROMIUM, '--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-extensions',
             '--remote-debugging-address=127.0.0.1', '--remote-debugging-port=0', f'--user-data-dir={profile}',
             f'--window-size={width},{height}', 'about:blank'],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / 'DevToolsActivePort'
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.quit()
                raise RuntimeError('Chromium did not start its DevTools endpoint')
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f'http://127.0.0.1:{port}/json/list', timeout=30) as response:
            targets = json.loads(response.read())
        page = next(t for t in targets if t.get('type') == 'page')
        self.page = DevTools(page['webSocketDebuggerUrl'])
        for domain in ('Runtime', 'Log', 'Page'):
            self.page.call(f'{domain}.enable')

    def open(self, url: str) -> None:
        self.page.events = [m for m in self.page.events if m.get('method') != 'Page.loadEventFired']
        self.page.call('Page.navigate', url=url)
        self.page.wait_for('Page.loadEventFired')

    def screenshot(self) -> np.ndarray:
        data = self.page.call('Page.captureScreenshot', format='png', captureBeyondViewport=True)['data']
        return cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_COLOR)

    def quit(self) -> None:
        if getattr(self, 'page', None) is not None:
            self.page.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope='module')
def browser(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip('no Chromium here (Debian: apt-get install chromium)')
    instance = Browser(tmp_path_factory.mktemp('chromium_profile'))
    yield instance
    instance.quit()


@pytest.fixture(scope='module')
def cli_run(tmp_path_factory):
    """A real ``oaq quantize`` results folder: a small random RCAN, two test images."""
    root = tmp_path_factory.mktemp('html_world')
    world = write_image_world(root)
    checkpoint = save_random_instance('rcan', root)
    out = root / 'results' / 'rcan_w4a4'
    code = main(['quantize', str(checkpoint), '--calib', str(world['calib']), '--bits', 'w4a4', '--quiet',
                 '--test', f"Tiny={world['hr']}:{world['lr']}", '--out', str(out), '--set', 'search.enabled=false',
                 '--set', 'calib.num_batches=2', '--set', 'calib.batch_size=2', '--set', 'calib.patch_size=24',
                 '--backend', 'fake'])
    assert code == 0
    return out


def _content_box(browser: Browser, selector: str) -> tuple:
    box = browser.page.evaluate(f"(() => {{ const r = document.querySelector('{selector}').getBoundingClientRect();"
                                " return [r.left + scrollX, r.top + scrollY, r.width, r.height]; })()")
    return tuple(int(round(v)) for v in box)


def _drawn(image: np.ndarray, box: tuple) -> float:
    """Fraction of the pixels inside ``box`` that are not background white."""
    left, top, width, height = box
    region = image[top:top + height, left:left + width]
    assert region.size, f'box {box} is outside the screenshot {image.shape}'
    return float((region.min(axis=-1) < 235).mean())


@needs_chromium
def test_report_loads_without_console_error_and_shows_table_and_figure(browser, cli_run):
    page = cli_run / 'report.html'
    assert page.is_file()
    browser.open(page.as_uri())
    assert browser.page.console_errors() == []
    rows = browser.page.evaluate("document.querySelectorAll('table.layers tbody tr').length")
    assert rows == len(json.loads((cli_run / 'oaq_report.json').read_text())['layers'])
    images = browser.page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
    assert len(images) >= 3 and all(complete and width > 0 for complete, width in images)  # histograms + 2 crops

    screenshot = browser.screenshot()
    table, figure = _content_box(browser, 'table.summary'), _content_box(browser, 'figure img')
    assert table[2] > 100 and figure[2] > 100
    # Text and cell borders in the table, plotted pixels in the figure, blank page margin elsewhere.
    assert _drawn(screenshot, table) > 0.03
    assert _drawn(screenshot, figure) > 0.05
    assert _drawn(screenshot, (0, screenshot.shape[0] - 40, 12, 40)) == 0.0
    cv2.imwrite(str(cli_run / 'report_screenshot.png'), screenshot)


@needs_chromium
def test_layer_table_sorts_by_clicked_column(browser, cli_run):
    browser.open((cli_run / 'report.html').as_uri())
    column = browser.page.evaluate("Array.from(document.querySelectorAll('table.layers th'))"
                                   ".findIndex(h => h.textContent.startsWith('outlier fraction'))")
    read = (f"Array.from(document.querySelectorAll('table.layers tbody tr'))"
            f".map(r => r.cells[{column}].getAttribute('data-value'))")
    for clicks, expected_order in ((1, 1), (2, -1)):
        browser.page.evaluate(f"document.querySelectorAll('table.layers th')[{column}].click()")
        values = [float(v) for v in browser.page.evaluate(read) if v]
        assert len(values) >= 3 and values == sorted(values, reverse=expected_order < 0), clicks
    assert browser.page.console_errors() == []


@needs_chromium
def test_console_errors_are_caught(browser, tmp_path):
    """The check itself: a page with a script error and a blocked network load is reported as failing."""
    page = tmp_path / 'broken.html'
    page.write_text(render_html(_report(), tmp_path).replace(
        '</body>', '<img src="https://example.invalid/x.png"><script>undefinedFunction();</script></body>'))
    browser.open(page.as_uri())
    time.sleep(0.5)
    errors = browser.page.console_errors()
    assert any('undefinedFunction' in e for e in errors)
    assert any('Content Security Policy' in e or 'example.invalid' in e for e in errors)
