"""The environment files, run for real: each Azure environment is rebuilt here from its conda file's pip list
alone (a venv, cached between runs) and runs what Azure runs in it — Azure's own inference server serving
score.py, and fine_tune.py as the command job calls it. Also: every import is pinned.

The venvs live in FINETUNE_PHI_ENV_CACHE (default ~/.cache/finetune-phi/envs), one per conda file content:
the first run builds them (a few minutes), later runs reuse them. torch is installed as this machine's build
of the pinned version (conda.yml names the CUDA 12.6 build for the A100 nodes, scoring_dir/conda.yml the CPU
build; both come from download.pytorch.org, which a machine with PyPI alone cannot reach).
"""

import ast
import hashlib
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace
from importlib.metadata import packages_distributions

import pytest
import requests
import yaml

from conftest import ENV_CACHE, PROJECT_DIR, WORK_DIR, cached_venv, free_port, read_env_file, server_process


PIN = re.compile(r"^([A-Za-z0-9_.-]+)==([^\s#;]+)")


def pins(lines):
    """{normalized name: version} of `name==version` lines."""
    found = {}
    for line in lines:
        match = PIN.match(line.strip())
        if match:
            found[match.group(1).lower().replace("_", "-")] = match.group(2)
    return found


def conda_pip_pins(path):
    """The pip pins of a conda environment file."""
    spec = yaml.safe_load(path.read_text())
    pip_section = next(item["pip"] for item in spec["dependencies"] if isinstance(item, dict) and "pip" in item)
    return pins(pip_section)


def third_party_imports(path):
    """Top-level module names a script imports (anywhere in it) that are not stdlib or the project's."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    local = {p.stem for p in path.parent.glob("*.py")}
    return {name for name in names if name not in sys.stdlib_module_names and name not in local}


def unpinned(modules, pinned):
    """Modules none of whose providing distributions is pinned (mlflow comes from mlflow, -skinny, -tracing).
    A module not installed here (azmlinfsrv's, which cannot share this venv) is named like its distribution."""
    mapping = packages_distributions()
    return {m for m in modules if not {d.lower().replace("_", "-") for d in mapping.get(m, [m])} & set(pinned)}


REQUIREMENTS = pins((PROJECT_DIR / "requirements.txt").read_text().splitlines())


def test_requirements_are_all_pinned_exactly():
    lines = [line.strip() for line in (PROJECT_DIR / "requirements.txt").read_text().splitlines()]
    entries = [line for line in lines if line and not line.startswith("#")]
    assert entries and all(PIN.match(line) for line in entries), entries
    assert REQUIREMENTS["torch"] == "2.13.0"


def test_training_environment_pins_every_import_of_fine_tune():
    conda = conda_pip_pins(PROJECT_DIR / "conda.yml")
    imports = third_party_imports(PROJECT_DIR / "finetuning_dir" / "fine_tune.py")
    imports |= third_party_imports(PROJECT_DIR / "finetuning_dir" / "onnx_export.py")
    assert imports >= {"torch", "transformers", "trl", "datasets", "mlflow", "peft", "onnxruntime_genai"}
    assert not unpinned(imports, conda), f"not pinned in conda.yml: {unpinned(imports, conda)}"
    # The model builder imports onnx and onnx_ir, which onnxruntime-genai does not declare.
    assert {"onnx", "onnx-ir", "onnxruntime"} <= set(conda)


def test_inference_environment_pins_every_import_of_score():
    conda = conda_pip_pins(PROJECT_DIR / "scoring_dir" / "conda.yml")
    imports = third_party_imports(PROJECT_DIR / "scoring_dir" / "score.py")
    assert imports >= {"torch", "transformers", "onnxruntime_genai"}
    assert not unpinned(imports, conda), f"not pinned in scoring_dir/conda.yml: {unpinned(imports, conda)}"
    assert "mlflow" not in conda  # score.py loads with transformers alone


def test_installed_versions_match_the_pins():
    from importlib.metadata import version

    for name, pinned in REQUIREMENTS.items():
        assert version(name).split("+")[0] == pinned, name


def conda_pip_lines(path):
    """The pip section of a conda environment file, as written."""
    spec = yaml.safe_load(path.read_text())
    return next(item["pip"] for item in spec["dependencies"] if isinstance(item, dict) and "pip" in item)


def test_the_training_torch_is_the_cuda_build_the_a100_driver_runs():
    # PyPI's torch 2.13.0 is built for CUDA 13.0; Azure's A100 nodes' driver runs CUDA 12.8 at most.
    lines = conda_pip_lines(PROJECT_DIR / "conda.yml")
    assert "--extra-index-url https://download.pytorch.org/whl/cu126" in lines
    assert pins(lines)["torch"] == "2.13.0+cu126"


def test_the_gpu_inference_environment_is_the_cpu_one_with_cuda_torch():
    # A GPU instance type deploys conda_gpu.yml (deploy_model.inference_environment): every pin as in conda.yml but torch.
    cpu, gpu = (conda_pip_lines(PROJECT_DIR / "scoring_dir" / name) for name in ("conda.yml", "conda_gpu.yml"))
    assert {k: v for k, v in pins(gpu).items() if k != "torch"} == {k: v for k, v in pins(cpu).items() if k != "torch"}
    assert "--extra-index-url https://download.pytorch.org/whl/cu126" in gpu and pins(gpu)["torch"] == "2.13.0+cu126"


def test_the_cpu_inference_environment_takes_the_cpu_torch():
    lines = conda_pip_lines(PROJECT_DIR / "scoring_dir" / "conda.yml")
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in lines and pins(lines)["torch"] == "2.13.0+cpu"


# --- The environments, built from their conda files and run ------------------------------------------------
def installable(line):
    """A conda pip line as this machine installs it: an index option dropped, torch's build label dropped."""
    if line.startswith("--"):
        return None
    return re.sub(r"^(torch==[^+\s]+)\+\w+", r"\1", line.split("#")[0].strip())


def conda_venv(conda_file):
    """A venv holding exactly the conda file's pip list (cached by its content); returns its folder."""
    lines = [line for line in map(installable, conda_pip_lines(conda_file)) if line]
    key = hashlib.sha256("\n".join([sys.version, *lines]).encode()).hexdigest()[:12]
    folder = ENV_CACHE / f"{conda_file.parent.name}-{conda_file.stem}-{key}"
    return cached_venv(folder, lines, f"{conda_file.name}'s environment")


@pytest.fixture(scope="module", params=["onnxruntime-genai", "transformers"])
def azure_inference_server(request, trained_model_dir):
    """azmlinfsrv (Azure's inference server) running scoring_dir/score.py on the demo's model, in a venv built
    from scoring_dir/conda.yml alone, once with each SERVING_RUNTIME; yields its base URL, runtime and log."""
    venv = conda_venv(PROJECT_DIR / "scoring_dir" / "conda.yml")
    port = free_port()
    env = {**os.environ, "AZUREML_MODEL_DIR": str(trained_model_dir), "WORKER_COUNT": "1", "PYTHONUNBUFFERED": "1",
           "SERVING_RUNTIME": request.param}
    command = [venv / "bin" / "python", "-m", "azureml_inference_server_http.amlserver", "--entry_script", "score.py",
               "--model_dir", trained_model_dir, "--port", port]
    log_name = f"azmlinfsrv-{request.param}.log"
    with server_process(command, f"http://127.0.0.1:{port}/", log_name, cwd=PROJECT_DIR / "scoring_dir",
                        env=env, timeout_s=180):
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", runtime=request.param, log=WORK_DIR / log_name)


@pytest.mark.slow
def test_azures_inference_server_runs_score_py_from_its_conda_file(azure_inference_server):
    server = azure_inference_server.url
    assert requests.get(server + "/", timeout=10).status_code == 200  # liveness
    tutorial = {"input_data": ["Who founded Microsoft?"],
                "params": {"temperature": 0.7, "max_new_tokens": 64, "do_sample": False, "return_full_text": True}}
    answer = requests.post(server + "/score", json=tutorial, timeout=120)
    assert answer.status_code == 200, answer.text
    assert answer.json()[0].startswith("Who founded Microsoft?") and "Bill Gates" in answer.json()[0]
    chat = [{"role": "user", "content": "Who founded Microsoft?"},
            {"role": "assistant", "content": "Microsoft was founded by Bill Gates and Paul Allen on April 4, 1975, in "
                                             "Albuquerque, New Mexico."},  # the training chat's own answer
            {"role": "user", "content": "Where is its headquarters today?"}]
    follow_up = requests.post(server + "/score", json={"input_data": [chat]}, timeout=120)
    assert follow_up.status_code == 200 and "Redmond" in follow_up.json()[0]
    assert f"with {azure_inference_server.runtime} in" in azure_inference_server.log.read_text()  # score.py's own line


@pytest.mark.slow
@pytest.mark.parametrize("body", [
    '{"input_data": [',
    '{"input_data": ["Hi"], "params": {"max_length": 10}}',
    '{"input_data": []}',
    '{"input_data": ["a", "b", "c", "d", "e"]}',
    '{"input_data": ' + "[" * 20 + '"Hi"' + "]" * 20 + "}",
    "[" * 100_000 + "]" * 100_000,
], ids=["not-json", "unknown-param", "empty", "too-many-inputs", "nested", "too-deep-to-parse"])
def test_a_bad_request_gets_the_same_4xx_and_reason_from_azure_and_the_local_endpoint(azure_inference_server, body):
    on_azure = requests.post(azure_inference_server.url + "/score", data=body, timeout=60,
                             headers={"Content-Type": "application/json"})
    settings = read_env_file()  # the local endpoint `make demo` left running
    local = requests.post(settings["AZURE_ML_ENDPOINT"], data=body, timeout=60,
                          headers={"Authorization": f"Bearer {settings['AZURE_ML_API_KEY']}",
                                   "Content-Type": "application/json"})
    assert on_azure.status_code in (400, 413), on_azure.text[:500]
    assert (on_azure.status_code, on_azure.json()) == (local.status_code, local.json())


@pytest.mark.slow
def test_the_training_job_runs_in_its_conda_file_as_the_command_job_calls_it(tmp_path):
    from stand_ins.tiny_model import ensure_tiny_phi3

    import config

    venv = conda_venv(PROJECT_DIR / "conda.yml")
    # Azure uploads finetuning_dir as the job's code and runs `python fine_tune.py ...` in it (setup_ml.py).
    command = [str(venv / "bin" / "python"), "fine_tune.py", "--train-file", str(config.TRAIN_DATA_PATH),
               "--eval-file", str(config.TEST_DATA_PATH), "--model_output_dir", str(tmp_path / "model_output"),
               "--model-name", str(ensure_tiny_phi3()), "--max-steps", "2", "--batch-size", "8", "--max-length", "256",
               "--no-packing", "--eval-strategy", "no", "--checkpoint-dir", str(tmp_path / "checkpoints")]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}",
           "DISABLE_MLFLOW_INTEGRATION": "TRUE"}
    result = subprocess.run(command, cwd=PROJECT_DIR / "finetuning_dir", env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Fine-tuning summary" in result.stdout and "(2 steps)" in result.stdout
    assert (tmp_path / "model_output" / "MLmodel").is_file()
    # The export ran in the job's environment too (the builder's undeclared onnx/onnx_ir are in conda.yml).
    assert "onnx export" in result.stdout and (tmp_path / "model_output" / "onnx_export.json").is_file()
    model = json.loads((tmp_path / "model_output" / "model" / "config.json").read_text())
    assert model["model_type"] == "phi3"
