"""Interrupt a step at a named point — a power cut (SIGKILL) or a full disk — then run it again, as a user would.

tests/faults/sitecustomize.py does the interrupting (FINETUNE_PHI_FAULT names the point); the project's code
knows nothing of it. After each interruption the rerun must recover: the tutorial still ends with an answer,
one serving process per slot, no file half-written, and a full disk is one sentence with the previous model
still serving.
"""

import json
import signal
from pathlib import Path

import psutil
import pytest
import requests
from dotenv import dotenv_values

from conftest import PROJECT_DIR, run_script
from stand_ins.sandbox import isolated_env

pytestmark = pytest.mark.slow

FAULTS_DIR = Path(__file__).resolve().parent / "faults"
SERVER_MODULE = "stand_ins.endpoint_server"

# Step 3, local: each process start and each write, in the order deploy_model.py reaches them.
DEPLOY_POINTS = [
    "kill:before:stand_ins.endpoint_process:start",
    "kill:after:stand_ins.endpoint_process:start",  # the server runs, no pid file yet
    "kill:after:stand_ins.endpoint_process:write_pid_record",
    "kill:before:stand_ins.deployment:register_local_model",
    "kill:after:stand_ins.deployment:register_local_model",
    "kill:before:stand_ins.deployment:publish",  # smoke-tested, .env not yet switched
    "kill:after:stand_ins.deployment:publish",  # .env switched, state.json not yet
    "kill:after:stand_ins.deployment:atomic_write_text",  # state.json written, the old slot still runs
    "kill:before:stand_ins.deployment:stop_previous",
]


@pytest.fixture
def project(tmp_path, trained_model_dir):
    """A throwaway project whose last job is the demo's fine-tuned model, with one endpoint deployed (blue)."""
    env = isolated_env(tmp_path)
    record = {"name": "finetune-phi-interrupted", "target": "local", "status": "Completed",
              "model_output": str(trained_model_dir)}
    Path(env["LAST_JOB_FILE"]).parent.mkdir(parents=True, exist_ok=True)
    Path(env["LAST_JOB_FILE"]).write_text(json.dumps(record))
    step(env, "deploy_model.py")
    yield env
    run_script("cleanup.py", env=env)


def step(env, script, fault=None, expect=0):
    """Run a step in `env` (with a fault, when given); returns the CompletedProcess after checking its exit."""
    faults = {"PYTHONPATH": str(FAULTS_DIR), "FINETUNE_PHI_FAULT": fault} if fault else {}
    result = run_script(script, env={**env, **faults}, timeout=300)
    assert result.returncode == expect, f"{script} ({fault}) exited {result.returncode}:\n{result.stdout[-2000:]}\n" \
                                        f"{result.stderr[-2000:]}"
    return result


def servers(env):
    """{port: [pids]} of this project's endpoint servers on the sandbox's two slot ports."""
    first = int(env["LOCAL_ENDPOINT_PORT"])
    found = {first: [], first + 1: []}
    for process in psutil.process_iter(["cmdline", "cwd"]):
        cmdline = process.info["cmdline"] or []
        if SERVER_MODULE in cmdline and process.info["cwd"] == str(PROJECT_DIR):
            port = int(cmdline[cmdline.index("--port") + 1])
            if port in found:
                found[port].append(process.pid)
    return found


def answer(env):
    """The tutorial's client, with the URL and key .env holds now."""
    values = dotenv_values(env["FINETUNE_PHI_ENV_FILE"])
    response = requests.post(values["AZURE_ML_ENDPOINT"], json={"input_data": ["Who founded Microsoft?"]},
                             headers={"Authorization": f"Bearer {values['AZURE_ML_API_KEY']}"}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()[0]


def half_written(folder):
    """Temporary files a write left behind (every write goes to .<name>.*.tmp, then is renamed)."""
    return sorted(str(path) for path in Path(folder).rglob(".*.tmp"))


@pytest.mark.parametrize("fault", DEPLOY_POINTS)
def test_a_redeploy_killed_at_any_point_recovers_on_the_next_run(project, fault):
    result = step(project, "deploy_model.py", fault=fault, expect=-signal.SIGKILL)
    assert result.returncode == -signal.SIGKILL

    rerun = step(project, "deploy_model.py")

    assert "Port" not in rerun.stderr, rerun.stderr
    assert isinstance(answer(project), str)
    assert all(len(pids) <= 1 for pids in servers(project).values()), servers(project)
    assert sum(len(pids) for pids in servers(project).values()) == 1, "one slot serves; the other was stopped"
    assert not half_written(Path(project["LOCAL_ENDPOINT_DIR"]).parent.parent), "a write was left half-done"


def test_another_program_on_the_slots_port_still_gets_the_sentence(project):
    import socket

    port = int(project["LOCAL_ENDPOINT_PORT"]) + 1  # green: the slot the redeploy would start
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen()
        result = step(project, "deploy_model.py", expect=1)
    assert f"Port {port} is in use" in result.stderr and "Traceback" not in result.stderr
    assert isinstance(answer(project), str), "the serving slot keeps serving"


def test_a_full_disk_when_env_is_written_is_a_sentence_and_the_old_endpoint_keeps_serving(project):
    before = dotenv_values(project["FINETUNE_PHI_ENV_FILE"])
    result = step(project, "deploy_model.py", fault="full:before:stand_ins.deployment:publish", expect=1)
    assert "No room to write" in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert dotenv_values(project["FINETUNE_PHI_ENV_FILE"]) == before
    assert isinstance(answer(project), str)
    assert sum(len(pids) for pids in servers(project).values()) == 1, "the new slot was stopped"
    assert not half_written(Path(project["FINETUNE_PHI_ENV_FILE"]).parent)


def test_a_full_disk_when_the_data_is_written_is_a_sentence_and_the_old_data_stays(tmp_path):
    env = isolated_env(tmp_path)
    step(env, "download_dataset.py")
    train = Path(env["TRAIN_DATA_PATH"])
    before = train.read_bytes()
    result = run_script("download_dataset.py", "--seed", "7", env={
        **env, "PYTHONPATH": str(FAULTS_DIR), "FINETUNE_PHI_FAULT": "full:before:helpers.files:write_generated_file"})
    assert result.returncode == 1 and "No room to write" in result.stderr and "Traceback" not in result.stderr, \
        result.stderr[-2000:]
    assert train.read_bytes() == before, "the previous data file must stay whole"
    assert not half_written(train.parent)


@pytest.mark.parametrize("nth", [1, 2, 3])  # the manifest (both hashes), the data file, the manifest (new hash)
def test_a_data_write_killed_at_any_point_leaves_a_whole_file_the_rerun_replaces(tmp_path, nth):
    env = isolated_env(tmp_path)
    step(env, "download_dataset.py")
    train = Path(env["TRAIN_DATA_PATH"])
    before = train.read_bytes()
    result = run_script("download_dataset.py", "--seed", "7", env={
        **env, "PYTHONPATH": str(FAULTS_DIR), "FINETUNE_PHI_FAULT": f"kill:after:helpers.files:atomic_write_text:{nth}"})
    assert result.returncode == -signal.SIGKILL
    assert train.read_bytes() in (before, after_seed_7(tmp_path)), "the old file or the new one, whole"
    assert not half_written(train.parent)
    rerun = run_script("download_dataset.py", "--seed", "7", env=env)  # no --force: the step knows its own file
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert train.read_bytes() == after_seed_7(tmp_path)


def after_seed_7(tmp_path):
    """What step 1 writes with --seed 7, from a clean project of its own."""
    env = isolated_env(tmp_path / "reference")
    if not Path(env["TRAIN_DATA_PATH"]).is_file():
        assert run_script("download_dataset.py", "--seed", "7", env=env).returncode == 0
    return Path(env["TRAIN_DATA_PATH"]).read_bytes()
