# Two entry points: `make demo` and `make test`. Both create .venv and install the pinned set on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.oaq-installed
PIP := $(PY) -m pip install --disable-pip-version-check -q
PINS := tools/pinned-requirements.txt

.PHONY: demo test install clean-venv

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

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

clean-venv:
	rm -rf $(VENV)
