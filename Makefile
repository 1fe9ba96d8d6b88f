# The two commands of the README:
#   make demo   the whole tutorial on this machine (no Azure account, no internet beyond PyPI)
#   make test   the test suite (make test-fast: the fast loop, without the tests marked slow)
# Both create .venv and install the pinned requirements first (once; again when requirements change).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
PROMPTFLOW_PORT ?= 8080
# make studio's port (MLflow's own default, 5000, is taken by AirPlay on macOS)
STUDIO_PORT ?= 5050

# No telemetry, no background services: Prompt flow keeps its settings in a project folder (.pf/), whose
# pf.yaml (written below, as `pf config set telemetry.enabled=false trace.destination=none` would, but
# without the telemetry event that command sends first) turns telemetry and its trace service off.
export PF_HOME_DIRECTORY ?= $(CURDIR)/.pf
export MLFLOW_DISABLE_TELEMETRY := true
export APPLICATIONINSIGHTS_CONTROLPLANE_DISABLED := true
export HF_HUB_DISABLE_TELEMETRY := 1
export HF_HUB_DISABLE_PROGRESS_BARS := 1
export HF_DATASETS_DISABLE_PROGRESS_BARS := 1
export DO_NOT_TRACK := 1

.PHONY: venv venv-gpu pf-config demo test test-fast chat studio eval bench clean

venv: $(STAMP) pf-config

$(STAMP): requirements.txt constraints.txt requirements-pretrained.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt -c constraints.txt
	$(PY) -m pip install --disable-pip-version-check -q --no-deps -r requirements-pretrained.txt
	touch $(STAMP)

# Your own NVIDIA GPU (docs/own-gpu.md): the same .venv with CUDA torch and bitsandbytes (QLoRA).
venv-gpu: $(STAMP) pf-config
	$(PY) -m pip install --disable-pip-version-check -q -r requirements-gpu.txt -c constraints.txt
	$(PY) -c "import torch; print('CUDA', torch.version.cuda, 'GPU:', torch.cuda.is_available() and torch.cuda.get_device_name(0))"

# Checked on every target (not only at install), so a removed .pf/ never turns telemetry back on.
pf-config:
	@mkdir -p "$(PF_HOME_DIRECTORY)" && test -f "$(PF_HOME_DIRECTORY)/pf.yaml" || printf "telemetry:\n  enabled: 'false'\ntrace:\n  destination: none\n" > "$(PF_HOME_DIRECTORY)/pf.yaml"

demo: venv
	$(PY) download_dataset.py
	$(PY) setup_ml.py
	$(PY) deploy_model.py
	$(PY) integrate_with_promptflow.py

test: venv
	$(PY) -m pytest

# The fast loop, for while you work (< 90 s on 2 cores): every module's logic, without the tests marked slow
# (the demo, servers, browsers, environment venvs, real training runs; pytest.ini). CI runs `make test`.
test-fast: venv
	$(PY) -m pytest -m "not slow"

# The chat page of step 4 (Prompt flow 1.18.5's default flask engine serves a broken page; fastapi works).
chat: venv
	$(VENV)/bin/pf flow serve --source ./ --port $(PROMPTFLOW_PORT) --host localhost --engine fastapi

# The local studio: MLflow's UI on the local store (mlflow.db), on this machine only. Runs with their live loss
# curves, the registered model versions (alias "serving": the one the local endpoint serves), evaluations.
studio: venv
	$(VENV)/bin/mlflow server --backend-store-uri "$$($(PY) -c 'import config; print(config.MLFLOW_TRACKING_URI)')" \
		--host 127.0.0.1 --port $(STUDIO_PORT)

# Base model vs fine-tuned, on the test split, through the flow.
eval: venv
	$(PY) evaluate_flow.py --compare-base

# The CPU benchmarks of docs/benchmarks.md (~60 minutes on 2 idle cores). The first run adds 7-10 minutes: the
# decode benchmark builds llama.cpp, its CPU peer, from PyPI's llama-cpp-python sdist into models/.llama.cpp/
# once (cmake, ninja and a C++ compiler needed); its rows wait while other processes keep the CPU busy.
# The endpoint benchmark serves the model of the last `make demo` with both runtimes; the real-model comparison
# scores the held-out chats that `make demo` wrote (data/), and bench/real_model.py runs steps 1-3 and the
# evaluation on SmolLM2 in a throwaway project (~23 minutes).
# On a GPU machine (after make venv-gpu):
#   python bench/train_throughput.py --size mini --profiles tutorial,lora,qlora --serving
bench: venv
	$(PY) bench/train_throughput.py --size tiny
	$(PY) bench/endpoint_load.py --runtimes transformers,onnxruntime-genai
	$(PY) bench/decode_runtimes.py
	$(PY) -m stand_ins.pretrained_model
	$(PY) bench/decode_runtimes.py --model models/smollm2-135m-instruct
	$(PY) bench/real_model.py
	$(PY) bench/pipeline.py

clean: venv
	$(PY) cleanup.py
	rm -rf data models outputs mlflow.db .promptflow .pf/.runs
