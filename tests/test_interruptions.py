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

from conftest import PROJECT_DIR, run_script, write_recipe
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


@pytest.fixture(scope="module")
def project(tmp_path_factory, trained_model_dir):
    """A throwaway project whose last job is the demo's fine-tuned model, with one endpoint deployed. Shared by the
    tests of this module: each leaves it as a recovered deploy does (one slot serving), the start of the next."""
    env = isolated_env(tmp_path_factory.mktemp("interrupted"))
    record = {"name": "finetune-phi-interrupted", "target": "local", "status": "Completed",
              "model_output": str(trained_model_dir)}
    Path(env["LAST_JOB_FILE"]).parent.mkdir(parents=True, exist_ok=True)
    Path(env["LAST_JOB_FILE"]).write_text(json.dumps(record))
    step(env, "deploy_model.py")
    yield env
    run_script("cleanup.py", env=env)


def step(env, script, *args, fault=None, expect=0, fault_bytes=0):
    """Run a step in `env` (with a fault, when given); returns the CompletedProcess after checking its exit."""
    faults = {"PYTHONPATH": str(FAULTS_DIR), "FINETUNE_PHI_FAULT": fault,
              "FINETUNE_PHI_FAULT_BYTES": str(fault_bytes)} if fault else {}
    result = run_script(script, *args, env={**env, **faults}, timeout=300)
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

    live = json.loads((Path(project["LOCAL_ENDPOINT_DIR"]) / "state.json").read_text())["slot"]
    port = int(project["LOCAL_ENDPOINT_PORT"]) + (0 if live == "green" else 1)  # the slot the redeploy would start
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


# --- Step 2, local: one job at a time, whatever dies ------------------------------------------------------------
def trainings(env):
    """Pids of the fine_tune.py processes training for this sandbox (not the job processes that run them)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if cmdline[1:2] and cmdline[1].endswith("fine_tune.py") and env["JOBS_DIR"] in " ".join(cmdline):
            found.append(process.pid)
    return found


def last_job(env):
    """outputs/last_job.json of the sandbox ({} before a job has recorded itself)."""
    path = Path(env["LAST_JOB_FILE"])
    return json.loads(path.read_text()) if path.is_file() else {}


def wait_until_ended(env, timeout_s=300):
    """Wait for the recorded job to record its end (it outlived the step that started it)."""
    import time

    deadline = time.monotonic() + timeout_s
    while last_job(env).get("status") in (None, "Running") and time.monotonic() < deadline:
        time.sleep(1)
    return last_job(env).get("status")


@pytest.fixture
def data_ready(tmp_path):
    """A throwaway project with step 1 done and a one-epoch recipe (these tests need a job, not a good model)."""
    env = {**isolated_env(tmp_path), "RECIPE": str(write_recipe(tmp_path / "one-epoch.yaml", epochs=1)),
           "ONNX_EXPORT": "false"}
    step(env, "download_dataset.py")
    yield env
    for pid in trainings(env):
        psutil.Process(pid).kill()
    run_script("cleanup.py", env=env)


def test_setup_ml_killed_after_the_job_started_leaves_one_job_and_the_next_steps_wait_for_it(data_ready):
    env = data_ready
    step(env, "setup_ml.py", fault="kill:after:stand_ins.job_runner:start_job", expect=-signal.SIGKILL)

    again = step(env, "setup_ml.py", expect=1)  # a second job would share (or, on a GPU, exhaust) the machine
    assert "is still running on this machine" in again.stderr and "python setup_ml.py --cancel" in again.stderr
    assert len(trainings(env)) <= 1
    deploy = run_script("deploy_model.py", env=env)  # the job may have ended meanwhile: then it deploys
    assert deploy.returncode == 0 or "still running" in deploy.stderr or "No fine-tuning job" in deploy.stderr

    assert wait_until_ended(env) == "Completed", "the job outlived its step and recorded its end"
    step(env, "deploy_model.py")
    assert isinstance(answer(env), str)


def test_a_job_process_killed_mid_training_is_seen_as_interrupted_and_the_rerun_trains_again(data_ready):
    env = data_ready
    # The job's own process dies just after recording itself Running; its training goes on, unrecorded.
    step(env, "setup_ml.py", fault="kill:after:helpers.job_record:record_job", expect=1)
    refused = step(env, "setup_ml.py", expect=1) if trainings(env) else None  # the orphan training still counts
    assert refused is None or "is still running" in refused.stderr
    for pid in trainings(env):
        psutil.Process(pid).wait(300)
    deploy = step(env, "deploy_model.py", expect=1)
    assert "was interrupted" in deploy.stderr and "python setup_ml.py" in deploy.stderr
    step(env, "setup_ml.py")
    step(env, "deploy_model.py")
    assert isinstance(answer(env), str)


def test_setup_ml_cancel_stops_the_running_job(data_ready):
    env = data_ready
    step(env, "setup_ml.py", fault="kill:after:stand_ins.job_runner:start_job", expect=-signal.SIGKILL)
    result = step(env, "setup_ml.py", "--cancel")
    assert "Cancelling job" in result.stdout
    assert wait_until_ended(env, 60) == "Canceled"
    assert trainings(env) == []


def test_a_full_disk_when_the_model_is_saved_fails_the_job_with_a_sentence_and_the_previous_model_serves(project):
    jobs = Path(project["JOBS_DIR"]).parent / "model-save"  # its own job record: the others deploy the demo's
    env = {**project, "RECIPE": str(write_recipe(jobs / "one-epoch.yaml", epochs=1)), "ONNX_EXPORT": "false",
           "JOBS_DIR": str(jobs / "jobs"), "LAST_JOB_FILE": str(jobs / "last_job.json")}
    step(env, "download_dataset.py")
    # Files of the training process may grow to 1 MB from the model save on: its log can, its weights cannot.
    result = step(env, "setup_ml.py", fault="full:before:mlflow.transformers:save_model", fault_bytes=1_000_000,
                  expect=1)
    assert "no room to save the model" in result.stdout, (result.stdout + result.stderr)[-3000:]
    assert "Traceback" not in result.stdout
    assert not Path(last_job(env)["model_output"]).exists(), "no half model is left to register"
    assert last_job(env)["status"] == "Failed"
    deploy = step(env, "deploy_model.py", expect=1)
    assert "is Failed, not Completed" in deploy.stderr
    assert isinstance(answer(env), str), "the model deployed before keeps serving"


def test_setup_ml_killed_before_the_job_started_leaves_nothing_running_and_the_rerun_trains(data_ready):
    env = data_ready
    step(env, "setup_ml.py", fault="kill:before:stand_ins.job_runner:start_job", expect=-signal.SIGKILL)
    assert trainings(env) == [] and last_job(env) == {}
    step(env, "setup_ml.py")
    step(env, "deploy_model.py")
    assert isinstance(answer(env), str)


def test_a_full_disk_in_the_model_registry_is_a_sentence_and_the_old_endpoint_keeps_serving(project):
    # The registry (mlflow.db, SQLite) may grow no more once registration starts.
    result = step(project, "deploy_model.py", fault="full:before:stand_ins.deployment:register_local_model",
                  fault_bytes=1, expect=1)
    assert "No room to write the local MLflow registry" in result.stderr and "Traceback" not in result.stderr, \
        result.stderr[-2000:]
    assert isinstance(answer(project), str)
    assert sum(len(pids) for pids in servers(project).values()) == 1, "the new slot was stopped"
