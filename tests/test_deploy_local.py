"""deploy_model.py and cleanup.py with TARGET=local, for real: the endpoint `make demo` left running.

The session's `demo_run` fixture ran `make demo` (dataset, fine-tuning, deploy) into the test WORK_DIR, so
.env, the MLflow registry and the endpoint's pid/state/log files are this session's own. The tests call the
endpoint as the tutorial's client does, redeploy it blue/green, break a model on purpose, and stop it —
and always leave it serving, since later test modules (the Prompt flow tests) call it too.
"""

import json
import os
import shutil
import socket
import stat
from pathlib import Path

import psutil
import pytest
import requests
from dotenv import dotenv_values

from azure_mocks import AZURE_WARNING_FILTERS, FAKE_DEPLOY_SETTINGS, validated_yaml_blocks
from conftest import run_script

import config

pytestmark = [pytest.mark.filterwarnings(f) for f in (
    *AZURE_WARNING_FILTERS,
    "ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning",  # MLflow's SQL store, on SQLAlchemy 2.1
)]

QUESTION = "Who founded Microsoft?"
BROKEN_JOB = "finetune-phi-broken-weights"
SLOTS = ("blue", "green")
# Every socket a process opens fails: the dry run must need none (its config and settings are offline).
NO_NETWORK = (
    "import runpy, socket, sys\n"
    "def refuse(*args, **kwargs):\n"
    "    raise OSError('network call attempted')\n"
    "socket.socket.connect = socket.socket.connect_ex = socket.getaddrinfo = socket.create_connection = refuse\n"
    "sys.argv = ['deploy_model.py', *sys.argv[1:]]\n"
    "runpy.run_path('deploy_model.py', run_name='__main__')\n"
)


def tutorial_client(url, key, question=QUESTION, do_sample=True):
    """The tutorial's client: POST input_data and params with a Bearer key, take response.json()[0]."""
    data = {"input_data": [question],
            "params": {"temperature": 0.7, "max_new_tokens": 128, "do_sample": do_sample, "return_full_text": True}}
    response = requests.post(url, json=data, headers={"Authorization": "Bearer " + key}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()[0]


def env_values():
    """AZURE_ML_ENDPOINT and AZURE_ML_API_KEY as .env holds them now."""
    values = dotenv_values(config.ENV_FILE)
    return values["AZURE_ML_ENDPOINT"], values["AZURE_ML_API_KEY"]


def endpoint_state():
    """The live local endpoint that deploy_model.py recorded ({slot, pid, url, ...}), or None."""
    path = Path(config.LOCAL_ENDPOINT_DIR) / "state.json"
    return json.loads(path.read_text()) if path.is_file() else None


def slot_url(slot):
    """The URL a slot serves on: blue on LOCAL_ENDPOINT_PORT, green on the next port."""
    return f"http://127.0.0.1:{config.LOCAL_ENDPOINT_PORT + SLOTS.index(slot)}/score"


def port_open(url):
    """True if something listens on the URL's port."""
    port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def gone(pid, timeout_s=15):
    """True once the process has exited (a zombie waiting for its parent counts as exited)."""
    try:
        process = psutil.Process(pid)
        process.wait(timeout_s)
    except psutil.NoSuchProcess:
        return True
    except psutil.TimeoutExpired:
        return process.status() == psutil.STATUS_ZOMBIE
    return True


def registered_versions():
    """{version: tags} of config.AZURE_MODEL_NAME in the local MLflow registry."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=config.MLFLOW_TRACKING_URI, registry_uri=config.MLFLOW_TRACKING_URI)
    return {int(v.version): v.tags for v in client.search_model_versions(f"name='{config.AZURE_MODEL_NAME}'")}


def endpoint_logs():
    """Everything the local endpoints have logged (blue.log, green.log)."""
    return "".join(p.read_text(errors="replace") for p in Path(config.LOCAL_ENDPOINT_DIR).glob("*.log"))


def deploy(*args):
    """`python deploy_model.py ...` as a user types it; returns the CompletedProcess."""
    return run_script("deploy_model.py", *args, timeout=300)


# --- Without the demo ---------------------------------------------------------------------------------------
def test_help():
    result = deploy("--help")
    assert result.returncode == 0, result.stderr
    for option in ("--job-name", "--dry-run", "--foreground"):
        assert option in result.stdout


def test_azure_dry_run_as_typed_needs_no_network(tmp_path):
    env = {**FAKE_DEPLOY_SETTINGS, "TARGET": "azure", "FINETUNE_PHI_ENV_FILE": str(tmp_path / ".env"),
           "LAST_JOB_FILE": str(tmp_path / "last_job.json")}
    result = run_script("-c", NO_NETWORK, "--dry-run", "--job-name", "finetune-phi-typed", env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    blocks = validated_yaml_blocks(result.stdout)
    assert set(blocks) == {"Model", "Endpoint", "Deployment"}
    assert blocks["Model"]["path"] == "azureml://jobs/finetune-phi-typed/outputs/model_output"
    assert blocks["Endpoint"]["name"] == FAKE_DEPLOY_SETTINGS["AZURE_ENDPOINT_NAME"]
    assert blocks["Deployment"]["instance_type"] == "Standard_E4s_v3"
    assert "Dry run: nothing was registered or deployed." in result.stdout
    assert not (tmp_path / ".env").exists()


# --- What `make demo` left running ------------------------------------------------------------------------
@pytest.mark.slow
def test_demo_wrote_env_and_the_tutorials_client_gets_answers(demo_run):
    live = endpoint_state()
    assert live, "make demo left no local endpoint running"
    url, key = env_values()
    assert url == live["url"] == slot_url(live["slot"])
    assert len(key) >= 32
    assert stat.S_IMODE(os.stat(config.ENV_FILE).st_mode) == 0o600
    assert isinstance(tutorial_client(url, key), str)  # sampled at temperature 0.7: the words may vary
    answer = tutorial_client(url, key, do_sample=False)
    assert "Bill Gates" in answer
    assert answer.startswith(QUESTION)  # return_full_text, as the tutorial's client asks


@pytest.mark.slow
def test_demo_registered_the_model_with_its_job(demo_run):
    job_name = json.loads(Path(config.LAST_JOB_FILE).read_text())["name"]
    versions = registered_versions()
    live = endpoint_state()
    assert int(live["model_version"]) in versions
    assert versions[int(live["model_version"])].get("job_name") == job_name == live["job_name"]


@pytest.mark.slow
def test_the_key_is_never_logged_or_printed(demo_run):
    _url, key = env_values()
    assert key not in demo_run.stdout + demo_run.stderr
    assert key not in endpoint_logs()
    assert "POST /score 200" in endpoint_logs()  # the log is written, just without the key


# --- Blue/green redeploys -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_redeploy_switches_slot_url_and_key_and_stops_the_old_one(demo_run):
    before = endpoint_state()
    old_url, old_key = env_values()
    versions_before = registered_versions()
    result = deploy()
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    after = endpoint_state()
    new_url, new_key = env_values()
    assert after["slot"] != before["slot"]
    assert new_url == after["url"] == slot_url(after["slot"]) != old_url
    assert new_key != old_key
    assert int(after["model_version"]) == max(versions_before) + 1
    assert int(after["model_version"]) in registered_versions()
    assert f"Stopped the previous endpoint ({before['slot']}, pid {before['pid']})" in result.stdout

    assert gone(before["pid"]), "the previous endpoint is still running"
    assert not port_open(old_url)
    with pytest.raises(requests.ConnectionError):
        tutorial_client(old_url, old_key)
    refused = requests.post(new_url, json={"input_data": [QUESTION]}, headers={"Authorization": f"Bearer {old_key}"},
                            timeout=30)
    assert refused.status_code == 401
    assert "Bill Gates" in tutorial_client(new_url, new_key, do_sample=False)

    for key in (old_key, new_key):
        assert key not in result.stdout + result.stderr
        assert key not in endpoint_logs()


@pytest.mark.slow
def test_a_model_that_fails_to_load_leaves_the_previous_endpoint_serving(demo_run, trained_model_dir):
    model_output = Path(config.JOBS_DIR) / BROKEN_JOB / "model_output"
    shutil.rmtree(model_output, ignore_errors=True)
    shutil.copytree(trained_model_dir, model_output)
    weights = list(model_output.rglob("*.safetensors")) + list(model_output.rglob("model.onnx*"))
    assert len(weights) >= 3, f"no safetensors and ONNX files under {model_output}"  # both runtimes' weights
    for path in weights:
        with open(path, "r+b") as handle:
            handle.truncate(64)  # an MLmodel file that looks fine, weights that do not load
    before = endpoint_state()
    env_before = Path(config.ENV_FILE).read_bytes()
    url, key = env_values()
    failed_slot = next(slot for slot in SLOTS if slot != before["slot"])

    result = deploy("--job-name", BROKEN_JOB)
    assert result.returncode == 1, result.stdout[-2000:]
    assert "The new endpoint failed" in result.stderr
    assert "--- last " in result.stderr and f"{failed_slot}.log ---" in result.stderr  # the log's tail
    assert "did not load" in result.stderr or "could not load the model" in result.stderr
    assert f"The previous endpoint ({before['slot']}, {before['url']}) keeps serving." in result.stderr
    assert "Traceback" not in result.stdout

    assert Path(config.ENV_FILE).read_bytes() == env_before
    assert endpoint_state() == before
    assert not port_open(slot_url(failed_slot))
    assert not (Path(config.LOCAL_ENDPOINT_DIR) / f"{failed_slot}.pid").exists()  # no stale pid for cleanup.py
    assert "Bill Gates" in tutorial_client(url, key, do_sample=False)


@pytest.mark.slow
def test_a_failed_registration_stops_the_new_slot_and_the_old_one_keeps_serving(demo_run):
    before = endpoint_state()
    env_before = Path(config.ENV_FILE).read_bytes()
    url, key = env_values()
    failed_slot = next(slot for slot in SLOTS if slot != before["slot"])

    result = run_script("deploy_model.py", env={"MLFLOW_TRACKING_URI": "nosuchscheme://registry"}, timeout=300)
    assert result.returncode == 1, result.stdout[-2000:]
    assert "Could not register the model in the local MLflow registry (nosuchscheme://registry)" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    started_pid = int(result.stdout.split(f"Starting local endpoint '{failed_slot}' (pid ", 1)[1].split(")", 1)[0])
    assert gone(started_pid)  # the new slot was stopped, not left running
    assert not (Path(config.LOCAL_ENDPOINT_DIR) / f"{failed_slot}.pid").exists()
    assert Path(config.ENV_FILE).read_bytes() == env_before
    assert endpoint_state() == before
    assert "Bill Gates" in tutorial_client(url, key, do_sample=False)


# --- cleanup.py never signals what is not our endpoint; damaged records are a sentence -----------------
def unrelated_process():
    """A process that is not an endpoint (as a recycled pid would be): a Python sleeping for a minute."""
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


@pytest.mark.slow
def test_cleanup_leaves_an_unrelated_process_with_a_recorded_pid_alone(demo_run, tmp_path):
    other = unrelated_process()
    folder = tmp_path / "endpoint"
    folder.mkdir()
    created = psutil.Process(other.pid).create_time()
    (folder / "blue.pid").write_text(json.dumps({"pid": other.pid, "create_time": created}))
    (folder / "green.pid").write_text(json.dumps({"pid": other.pid}))  # no start time: the command line decides
    (folder / "state.json").write_text(json.dumps({"slot": "blue", "pid": other.pid, "create_time": created,
                                                    "url": "http://127.0.0.1:1/score"}))
    try:
        result = run_script("cleanup.py", env={"LOCAL_ENDPOINT_DIR": str(folder)}, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "No local endpoint is running." in result.stdout
        assert other.poll() is None, "cleanup.py signalled a process that is not the endpoint"
    finally:
        other.kill()
        other.wait()


@pytest.mark.slow
@pytest.mark.parametrize("name, content", [("blue.pid", "12x\n"), ("green.pid", '{"pid": "many"}'),
                                           ("state.json", "{not json")])
def test_a_damaged_pid_or_state_file_is_a_sentence_not_a_traceback(demo_run, tmp_path, name, content):
    folder = tmp_path / "endpoint"
    folder.mkdir()
    (folder / name).write_text(content)
    result = run_script("cleanup.py", env={"LOCAL_ENDPOINT_DIR": str(folder)}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert f"{name} is damaged" in result.stderr and "stop it by hand" in result.stderr
    assert not (folder / name).exists()  # said once; the next run is quiet
    again = run_script("cleanup.py", env={"LOCAL_ENDPOINT_DIR": str(folder)}, timeout=60)
    assert "damaged" not in again.stderr and "No local endpoint is running." in again.stdout


def test_deploy_says_the_previous_endpoint_stopped_only_when_it_did(tmp_path, monkeypatch, capsys):
    import subprocess
    import sys

    from stand_ins import deployment, endpoint_process

    # A stand-in "endpoint" (its command line names the server module) that ignores SIGTERM; kill() is
    # made to fail, as it would for a process of another user.
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    stubborn = subprocess.Popen([sys.executable, "-c", code, endpoint_process.SERVER_MODULE], stdout=subprocess.PIPE,
                                text=True)
    stubborn.stdout.readline()
    monkeypatch.setattr(config, "LOCAL_ENDPOINT_DIR", tmp_path)
    monkeypatch.setattr(psutil.Process, "kill", lambda self: None)
    monkeypatch.setattr(endpoint_process, "STOP_GRACE_S", 0.3)
    live = {"slot": "blue", "pid": stubborn.pid, "create_time": psutil.Process(stubborn.pid).create_time()}
    (tmp_path / "blue.pid").write_text(json.dumps(live))
    try:
        deployment.stop_previous(live)
        out, err = capsys.readouterr()
        assert "Stopped the previous endpoint" not in out
        assert f"Could not stop the previous endpoint (blue, pid {stubborn.pid})" in err and "cleanup.py" in err
        assert (tmp_path / "blue.pid").exists()  # kept, so cleanup.py can try again
    finally:
        stubborn.kill()
        stubborn.wait()


# --- cleanup.py, then deploy again: later test modules need the endpoint -------------------------------
@pytest.mark.slow
def test_cleanup_stops_the_endpoint_and_is_harmless_twice(demo_run):
    live = endpoint_state()
    try:
        first = run_script("cleanup.py", timeout=120)
        assert first.returncode == 0, first.stderr
        assert f"Stopped local endpoint '{live['slot']}' (pid {live['pid']}, {live['url']})." in first.stdout
        assert gone(live["pid"]), "cleanup.py left the endpoint running"
        assert not port_open(live["url"])
        assert endpoint_state() is None
        second = run_script("cleanup.py", timeout=120)
        assert second.returncode == 0, second.stderr
        assert "No local endpoint is running." in second.stdout
    finally:
        restored = deploy()
    assert restored.returncode == 0, restored.stdout[-2000:] + restored.stderr[-3000:]
    url, key = env_values()
    assert endpoint_state()["slot"] == "blue" and url == slot_url("blue")  # no live slot: blue again
    assert key not in restored.stdout + restored.stderr
    assert "Bill Gates" in tutorial_client(url, key, do_sample=False)


@pytest.mark.slow
def test_deploy_with_a_damaged_state_file_says_what_to_run(demo_run, tmp_path):
    folder = tmp_path / "endpoint"
    folder.mkdir()
    (folder / "state.json").write_text("{half a reco")
    result = run_script("deploy_model.py", env={"LOCAL_ENDPOINT_DIR": str(folder)}, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "state.json is damaged" in result.stderr and "python cleanup.py" in result.stderr
    assert (folder / "state.json").read_text() == "{half a reco"  # nothing is changed behind the user's back
