# Two entry points: `make demo` and `make test`. Both create .venv and install the pinned set on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.oaq-installed
PIP := $(PY) -m pip install --disable-pip-version-check -q
PINS := tools/pinned-requirements.txt

.PHONY: demo test install browser clean-venv

install: $(STAMP)

# basicsr 1.4.2 is a source package whose setup.py imports torch: torch first, then basicsr without
# build isolation, with the pins as constraints so nothing swaps torch.
$(STAMP): setup.cfg $(PINS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.14.1 torchvision==0.29.1
	$(PIP) --no-build-isolation -c $(PINS) basicsr==1.4.2
	$(PIP) -c $(PINS) -r $(PINS)
	$(PIP) --no-build-isolation --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m oaq_plugin.demo

# tests/test_html_report.py opens report.html in headless Chromium (Debian's package). Installed here when
# missing and this is root on Debian (CI); anywhere else the test skips and says why, and make test goes on.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo 'chromium not installed: the report.html browser test will be skipped'

test: $(STAMP) browser
	$(PY) -m pytest -q -p no:cacheprovider tests

clean-venv:
	rm -rf $(VENV)
