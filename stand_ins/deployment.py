"""The local managed online endpoint: a blue/green deployment of the job's model on two local ports.

    deploy_local(job)                                 # what `python deploy_model.py` does with TARGET=local
    stop_local_endpoints()                            # what `python cleanup.py` does with TARGET=local

As on Azure, the new deployment starts beside the one serving (blue on LOCAL_ENDPOINT_PORT, green on the next
port), answers a smoke request, and only then gets the traffic — here, .env's AZURE_ML_ENDPOINT and
AZURE_ML_API_KEY, which the flow reads — and the old one is stopped. If anything fails, the new one is
stopped, its log's tail printed, and the old one keeps serving. Pid files and state.json in LOCAL_ENDPOINT_DIR
say what runs, so cleanup.py can stop it after this process has exited.
"""

import json
import secrets
import sys
import time
from pathlib import Path

import config
from helpers.endpoint import publish, smoke_test
from helpers.errors import StepError, print_tail
from helpers.files import atomic_write_text
from helpers.job_record import model_output_dir
from scoring_dir.contract import SLOTS, SMOKE_QUESTION
from stand_ins import endpoint_process
from stand_ins.model_registry import mark_serving, register_local_model, unmark_serving


def endpoint_dir():
    """Where the local endpoint's pid files, state and logs live."""
    return Path(config.LOCAL_ENDPOINT_DIR)


def pid_file(slot):
    """The pid file of one slot."""
    return endpoint_dir() / f"{slot}.pid"


def state_file():
    """Where the live slot is recorded."""
    return endpoint_dir() / "state.json"


def read_state():
    """The live local deployment ({slot, pid, create_time, url, ...}), or None; a damaged file is a StepError."""
    state = endpoint_process.read_json_record(state_file())
    if state is not None and state.get("slot") not in SLOTS:
        raise StepError(f"{config.shown(state_file())} is damaged (no slot)")
    return state


def start_slot(model_dir, slot, key):
    """Start the endpoint server for one slot and record its pid; returns the RunningEndpoint."""
    port = config.LOCAL_ENDPOINT_PORT + SLOTS.index(slot)
    stop_stale_slot(slot, port)  # a server still loading has not taken the port yet: look for it all the same
    if not endpoint_process.port_is_free(config.LOCAL_ENDPOINT_HOST, port):
        raise StepError(f"Port {port} is in use: stop what listens there (python cleanup.py stops old endpoints) "
                        "or set LOCAL_ENDPOINT_PORT.")
    endpoint = endpoint_process.start(model_dir, port, key, endpoint_dir() / f"{slot}.log", config.LOCAL_ENDPOINT_HOST)
    endpoint_process.write_pid_record(pid_file(slot), endpoint)  # cleanup.py stops it even if this step dies
    return endpoint


def stop_stale_slot(slot, port):
    """Stop what an interrupted deploy left in the slot that gets no traffic: its recorded process, or (killed before
    it could record one) this project's endpoint server for the slot's port. Anything else on the port stays."""
    try:
        record = endpoint_process.read_pid_record(pid_file(slot))
    except StepError:  # a damaged pid file: the port tells instead
        record = None
    if not (record and endpoint_process.is_endpoint_process(*record)):
        record = endpoint_process.server_on_port(port)
    if record and endpoint_process.stop(*record):
        print(f"Stopped the '{slot}' endpoint (pid {record[0]}) that an interrupted deploy left behind.")
        pid_file(slot).unlink(missing_ok=True)


def abandon(endpoint, slot):
    """Stop a new slot that will not get the traffic, and forget its pid."""
    endpoint_process.stop_endpoint(endpoint)
    pid_file(slot).unlink(missing_ok=True)


def deploy_local(job, foreground=False):
    """Start the new slot beside the live one while registering, smoke-test, switch .env, stop the old slot."""
    model_dir = model_output_dir(job)
    if not (model_dir / "MLmodel").is_file():
        raise StepError(f"No MLflow model in {config.shown(model_dir)}: run `python setup_ml.py` first.")
    try:
        live = read_state()
    except StepError as error:
        raise StepError(f"{error}: run `python cleanup.py` (it stops what it can and removes the file), "
                        "then deploy again.") from None
    if live and not endpoint_process.is_running(live):
        live = None  # stale record: that endpoint is gone
    slot = SLOTS[1 - SLOTS.index(live["slot"])] if live else SLOTS[0]
    # The new slot starts first: its server spends seconds importing torch while the model is registered.
    endpoint = start_slot(model_dir, slot, secrets.token_urlsafe(32))
    print(f"Starting local endpoint '{slot}' (pid {endpoint.pid}) on {endpoint.url} ...")
    started = time.monotonic()
    try:
        version = register_local_model(config.AZURE_MODEL_NAME, model_dir, job["name"])
    except BaseException:  # no registered version, no deployment: the new slot goes, the live one keeps serving
        abandon(endpoint, slot)
        raise
    try:
        endpoint_process.wait_until_ready(endpoint)
        answer = smoke_test(endpoint.url, endpoint.key)
    except KeyboardInterrupt:
        abandon(endpoint, slot)
        raise
    except (StepError, OSError) as error:
        abandon(endpoint, slot)
        print(f"The new endpoint failed: {error}", file=sys.stderr)
        print_tail(endpoint.log_path.read_text(encoding="utf-8", errors="replace").splitlines(),
                   config.shown(endpoint.log_path))
        if live:
            print(f"The previous endpoint ({live['slot']}, {live['url']}) keeps serving.", file=sys.stderr)
        return 1
    print(f"Ready in {time.monotonic() - started:.1f} s, serving with {endpoint.runtime} (SERVING_RUNTIME="
          f"{config.SERVING_RUNTIME}). Smoke test: {SMOKE_QUESTION!r} -> {answer!r}")
    try:
        publish(endpoint.url, endpoint.key)  # the traffic moves: the flow reads .env
    except StepError:  # .env is as it was (a full disk, say): the previous endpoint keeps the traffic
        abandon(endpoint, slot)
        raise
    state = {"slot": slot, "pid": endpoint.pid, "create_time": endpoint.create_time, "url": endpoint.url,
             "log": str(endpoint.log_path), "model_name": config.AZURE_MODEL_NAME, "model_version": version,
             "job_name": job["name"]}
    atomic_write_text(state_file(), json.dumps(state, indent=2) + "\n")
    mark_serving(config.AZURE_MODEL_NAME, version)  # the studio shows which version serves
    if live:
        stop_previous(live)
    print(f"Local endpoint serves {config.AZURE_MODEL_NAME} v{version} (alias 'serving') at {endpoint.url}; "
          f"log: {config.shown(endpoint.log_path)}; stop it with: python cleanup.py")
    if foreground:
        serve_in_foreground(endpoint)
    return 0


def stop_previous(live):
    """Stop the slot that served before; say that it stopped only if it did."""
    what = f"the previous endpoint ({live['slot']}, pid {live['pid']})"
    if endpoint_process.stop(live["pid"], live.get("create_time")):
        print(f"Stopped {what}.")
    elif endpoint_process.is_running(live):  # its pid file stays, so cleanup.py can try again
        print(f"Could not stop {what}; it gets no traffic now: stop it with `python cleanup.py`.", file=sys.stderr)
        return
    else:
        print(f"{what[0].upper()}{what[1:]} had already stopped.")
    pid_file(live["slot"]).unlink(missing_ok=True)


def serve_in_foreground(endpoint):
    """Keep the endpoint in this terminal until it ends or Ctrl+C."""
    print("Serving in the foreground; Ctrl+C stops it.")
    try:
        endpoint.process.wait()
    except KeyboardInterrupt:
        endpoint_process.stop_endpoint(endpoint)
        state_file().unlink(missing_ok=True)


def stop_local_endpoints():
    """Stop every local endpoint slot that has a pid file; returns (what was stopped, damaged files noticed)."""
    stopped, problems = [], []
    try:
        live = read_state() or {}
    except StepError as error:
        live, problems = {}, [str(error)]
    for slot in SLOTS:
        records = set()
        try:
            record = endpoint_process.read_pid_record(pid_file(slot))
            if record:
                records.add(record)
        except StepError as error:
            problems.append(str(error))
        if live.get("slot") == slot:
            records.add((live["pid"], live.get("create_time")))
        for pid, create_time in sorted(records, key=lambda item: (item[0], item[1] or 0)):
            if endpoint_process.stop(pid, create_time):
                where = f", {live['url']}" if live.get("pid") == pid else ""
                stopped.append(f"local endpoint '{slot}' (pid {pid}{where})")
            elif endpoint_process.is_endpoint_process(pid, create_time):
                problems.append(f"could not stop local endpoint '{slot}' (pid {pid}); stop it by hand")
                records = None  # keep its pid file for the next try
        if records is not None:
            pid_file(slot).unlink(missing_ok=True)
    state_file().unlink(missing_ok=True)
    if live.get("model_name"):
        unmark_serving(live["model_name"])
    return stopped, problems
