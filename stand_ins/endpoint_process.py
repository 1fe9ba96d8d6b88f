"""The local endpoint's process: start it, wait until it is ready, stop it, and remember it.

Azure runs a deployment's container for you; here the endpoint server (stand_ins/endpoint_server.py) is a
process of this machine. This module is the one place that starts, waits for and stops that process:

    with serve_model(model_dir, log_path) as endpoint:     # a free port, a fresh key, stopped afterwards
        requests.post(endpoint.url, json=..., headers={"Authorization": f"Bearer {endpoint.key}"})

deploy_model.py keeps its endpoint running after it exits, so it records each process in a pid file (pid and
start time, read back with `read_pid_record`) and the live slot in state.json; cleanup.py stops what they
name. psutil checks a pid before any signal: only a process that runs the endpoint server, started at the
recorded time, is stopped — never a program that got the same pid later. It works the same on Linux, macOS
and Windows.
"""

import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import config
from helpers.files import atomic_write_text
from helpers.errors import StepError

SERVER_MODULE = "stand_ins.endpoint_server"  # run as `python -m stand_ins.endpoint_server`
KEY_VARIABLE = "LOCAL_ENDPOINT_KEY"  # the key reaches the server in its environment, never its command line
READY_TIMEOUT_S = 180  # loading Phi-3.5-mini on a CPU takes a while; the tiny model takes seconds
RUNTIME_HEADER = "X-Serving-Runtime"  # GET /ready names score.py's runtime in it
STOP_GRACE_S = 10  # after SIGTERM, in-flight answers get this long before the process is killed


@dataclass
class RunningEndpoint:
    """An endpoint process this program started: where it answers, its key, its log."""

    process: subprocess.Popen
    url: str
    key: str
    log_path: Path
    create_time: float
    exit_code: int | None = None  # set by stop()
    runtime: str | None = None  # score.py's runtime (transformers or onnxruntime-genai), once it is ready

    @property
    def pid(self):
        """The server's process id."""
        return self.process.pid


def free_port(host="127.0.0.1"):
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_is_free(host, port):
    """True when nothing listens on host:port."""
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1" if host in ("0.0.0.0", "") else host, port)) != 0


def start(model_dir, port, key, log_path, host="127.0.0.1", extra_args=(), detached=True, settings=None):
    """Start the endpoint server on host:port for `model_dir`; returns a RunningEndpoint (not yet ready).
    `settings` ({name: value}) override config.py's settings in the server's environment (SERVING_RUNTIME, ...)."""
    import psutil

    command = [sys.executable, "-m", SERVER_MODULE, "--model-dir", str(model_dir), "--host", host,
               "--port", str(port), *map(str, extra_args)]
    env = {**os.environ, **(settings or {}), KEY_VARIABLE: key, "PYTHONUNBUFFERED": "1"}
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as log:  # the child keeps its own handle
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=detached, cwd=config.PROJECT_DIR)
    url_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return RunningEndpoint(process, f"http://{url_host}:{port}/score", key, log_path,
                           psutil.Process(process.pid).create_time())


def wait_until_ready(endpoint, timeout_s=READY_TIMEOUT_S, while_loading=None):
    """Poll GET /ready until 200; StepError if the process exits, the model fails to load, or time runs out.
    `while_loading(response)` sees each answer before the 200 (the tests check what a loading server says)."""
    import requests

    ready_url = endpoint.url.rsplit("/", 1)[0] + "/ready"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if endpoint.process.poll() is not None:
            raise StepError(f"The endpoint process exited with code {endpoint.process.returncode} before it was ready.")
        try:
            response = requests.get(ready_url, timeout=2)
            if response.status_code == 200:
                endpoint.runtime = response.headers.get(RUNTIME_HEADER)
                return endpoint
            if response.status_code == 500:
                raise StepError(f"The endpoint could not load the model: {response.text[:300]}")
            if while_loading:
                while_loading(response)
        except requests.ConnectionError:
            pass
        time.sleep(0.25)
    raise StepError(f"The endpoint was not ready after {timeout_s} s.")


def is_endpoint_process(pid, create_time=None):
    """True if `pid` runs the endpoint server (and, given create_time, is the very process recorded then)."""
    import psutil

    try:
        process = psutil.Process(pid)
        return SERVER_MODULE in process.cmdline() and (create_time is None or abs(process.create_time() - create_time) < 0.01)
    except (psutil.Error, TypeError, ValueError):  # gone, a zombie, not ours to inspect, or not a pid at all
        return False


def server_on_port(port):
    """(pid, create_time) of an endpoint server of this project started for `port`, or None.

    What a step killed before it recorded the pid leaves behind: found by its command line (this project's server
    module, --port `port`) and its working folder (this project), never any other program on the port."""
    import psutil

    for process in psutil.process_iter(["cmdline", "cwd", "create_time"]):
        cmdline = process.info["cmdline"] or []
        ports = [value for flag, value in zip(cmdline, cmdline[1:]) if flag == "--port"]
        if SERVER_MODULE in cmdline and ports == [str(port)] and process.info["cwd"] == str(config.PROJECT_DIR):
            return process.pid, process.info["create_time"]
    return None


def stop(pid, create_time=None, grace_s=None):
    """Stop an endpoint process: terminate, wait up to grace_s, then kill. True if it was running and stopped;
    False if no such endpoint runs (any other program with that pid is left alone) or it could not be stopped."""
    return _terminate(pid, create_time, STOP_GRACE_S if grace_s is None else grace_s)[0]


def _terminate(pid, create_time, grace_s):
    """(stopped, exit code): the code is known only for a child of this process (None otherwise)."""
    import psutil

    if not is_endpoint_process(pid, create_time):
        return False, None
    process = psutil.Process(pid)
    try:
        process.terminate()
        try:
            return True, process.wait(grace_s)  # reaps it when it is our child
        except psutil.TimeoutExpired:
            process.kill()
            return True, process.wait(grace_s)
    except psutil.NoSuchProcess:  # it ended by itself meanwhile
        return True, None
    except (psutil.AccessDenied, psutil.TimeoutExpired):  # not ours to stop, or it would not die
        return False, None


def stop_endpoint(endpoint):
    """Stop a RunningEndpoint this program started; returns (and records) its exit code."""
    stopped, code = _terminate(endpoint.pid, endpoint.create_time, STOP_GRACE_S)
    endpoint.exit_code = code if stopped else endpoint.process.wait()  # not stopped: it had exited already
    return endpoint.exit_code


@contextlib.contextmanager
def serve_model(model_dir, log_path, host="127.0.0.1", port=None, key=None, extra_args=(), timeout_s=READY_TIMEOUT_S,
                while_loading=None, settings=None):
    """Serve a model folder (MLflow model or plain transformers folder) until the block ends; yields the
    RunningEndpoint once it is ready. A free port and a fresh key unless given; always stopped afterwards."""
    endpoint = start(model_dir, port or free_port(host), key or secrets.token_urlsafe(32), log_path, host, extra_args,
                     settings=settings)
    try:
        yield wait_until_ready(endpoint, timeout_s, while_loading)
    finally:
        stop_endpoint(endpoint)


# --- What deploy_model.py leaves running: pid files and the live slot --------------------------------
def write_pid_record(path, endpoint):
    """Record a started endpoint (pid and start time) so cleanup.py can stop it even if the step dies."""
    atomic_write_text(path, json.dumps({"pid": endpoint.pid, "create_time": endpoint.create_time}) + "\n")


def read_json_record(path, required=("pid",)):
    """A pid file or state.json as a dict, None when absent; StepError naming the file when it is damaged."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        record = None
    if not isinstance(record, dict) or not all(isinstance(record.get(name), int) for name in required):
        raise StepError(f"{config.shown(path)} is damaged (expected a JSON record with {', '.join(required)})")
    return record


def read_pid_record(path):
    """(pid, create_time) from a pid file, or None when there is none."""
    record = read_json_record(path)
    return None if record is None else (record["pid"], record.get("create_time"))


def is_running(record):
    """True if a recorded endpoint (a dict with pid and create_time) still runs."""
    return bool(record) and is_endpoint_process(record.get("pid"), record.get("create_time"))
