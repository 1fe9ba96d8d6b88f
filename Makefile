# The two commands of the README:
#   make demo   the whole tutorial on this machine (no Azure account, no internet beyond PyPI)
#   make test   the test suite
# Both create .venv and install the pinned requirements first (once; again when requirements change).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed

# No telemetry, no background services: Prompt flow keeps its settings in a project folder (.pf/), whose
# pf.yaml (written below, as `pf config set telemetry.enabled=false trace.destination=none` would, but
# without the telemetry event that command sends first) turns telemetry and its trace service off.
export PF_HOME_DIRECTORY := $(CURDIR)/.pf
export MLFLOW_DISABLE_TELEMETRY := true
export APPLICATIONINSIGHTS_CONTROLPLANE_DISABLED := true
export HF_HUB_DISABLE_TELEMETRY := 1
export HF_HUB_DISABLE_PROGRESS_BARS := 1
export DO_NOT_TRACK := 1

.PHONY: venv demo test chat bench clean

venv: $(STAMP)

$(STAMP): requirements.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt -c constraints.txt
	mkdir -p .pf && test -f .pf/pf.yaml || printf "telemetry:\n  enabled: 'false'\ntrace:\n  destination: none\n" > .pf/pf.yaml
	touch $(STAMP)

demo: venv
	$(PY) download_dataset.py
	$(PY) setup_ml.py
	$(PY) deploy_model.py

test: venv
	$(PY) -m pytest

clean: venv
	$(PY) cleanup.py
	rm -rf data models outputs mlflow.db .promptflow
