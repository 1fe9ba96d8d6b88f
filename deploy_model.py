"""Step 3 — register the fine-tuned model and serve it from an endpoint; its URL and key go into .env.

    python deploy_model.py                          # local: MLflow registry + an endpoint on 127.0.0.1:5001
    TARGET=azure python deploy_model.py             # Azure ML managed online endpoint on Standard_E4s_v3
    TARGET=azure python deploy_model.py --dry-run   # builds and validates model, endpoint, deployment; no network

The job comes from outputs/last_job.json (written by setup_ml.py) or --job-name. Both targets deploy
blue/green: the new deployment is started next to the one serving, sent a smoke request, and only then
given the traffic; if anything fails, the log's tail is printed, traffic stays where it was and the step
exits non-zero. An existing endpoint is never deleted. Afterwards .env (mode 600) holds AZURE_ML_ENDPOINT
and AZURE_ML_API_KEY, which integrate_with_promptflow.py reads — nothing to copy from the studio.

Locally the endpoint is local_endpoint.py in the background (pid, state and log in outputs/endpoint/;
--foreground keeps it in this terminal); `python cleanup.py` stops it.
"""

import argparse
import copy
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import config
from ml_client import StepError, azure_errors, exit_with, get_ml_client
from safe_write import atomic_write_text, update_env_file
from setup_ml import print_tail, read_last_job

SCORING_DIR = config.PROJECT_DIR / "scoring_dir"
SLOTS = ("blue", "green")
SMOKE_QUESTION = "Who founded Microsoft?"
SMOKE_REQUEST = {"input_data": [SMOKE_QUESTION], "params": {"max_new_tokens": 64, "do_sample": False}}
READY_TIMEOUT_S = 180  # loading Phi-3.5-mini on a CPU takes a while; the tiny model takes seconds
PROGRESS_EVERY_S = 30


def find_job(job_name, target):
    """The job to deploy: --job-name, or the one setup_ml.py recorded (which must have completed)."""
    record = read_last_job()
    if job_name:
        return record if record and record.get("name") == job_name else {"name": job_name, "target": target}
    if not record:
        raise StepError("No fine-tuning job recorded: run `python setup_ml.py` first, or pass --job-name.")
    if record.get("target") != target:
        raise StepError(f"The last job, {record['name']}, ran with TARGET={record.get('target')}, not {target}: "
                             "run setup_ml.py for this target, or pass --job-name.")
    if record.get("status") != "Completed":
        raise StepError(f"The last job, {record['name']}, is {record.get('status')}, not Completed: "
                             "run `python setup_ml.py` again (or pass --job-name).")
    return record


def other_slot(slot):
    """Blue/green: the slot that is not `slot`."""
    return SLOTS[1] if slot == SLOTS[0] else SLOTS[0]


# --- Azure: model, endpoint, deployment, traffic ---------------------------------------------------
def build_model(model_name, job_name):
    """The job's model_output, as an MLflow model asset."""
    from azure.ai.ml.constants import AssetTypes
    from azure.ai.ml.entities import Model

    return Model(
        name=model_name,
        path=f"azureml://jobs/{job_name}/outputs/model_output",
        type=AssetTypes.MLFLOW_MODEL,
        description=f"Phi-3 fine-tuned by job {job_name}",
        tags={"job_name": job_name},
    )


def register_model(ml_client, model_name, job_name):
    """Register the job's output as a new version of `model_name`."""
    model = ml_client.models.create_or_update(build_model(model_name, job_name))
    print(f"Registered model {model.name}, version {model.version}")
    return model


def build_endpoint(endpoint_name, description):
    """A key-authenticated managed online endpoint that runs as the user-assigned identity."""
    from azure.ai.ml.entities import IdentityConfiguration, ManagedIdentityConfiguration, ManagedOnlineEndpoint

    return ManagedOnlineEndpoint(
        name=endpoint_name,
        description=description,
        auth_mode="key",
        identity=IdentityConfiguration(
            type="user_assigned",
            user_assigned_identities=[ManagedIdentityConfiguration(resource_id=config.AZURE_MANAGED_IDENTITY_RESOURCE_ID)],
        ),
    )


def create_or_update_endpoint(ml_client, endpoint_name, description):
    """Reuse the endpoint if it exists (never delete it: that drops its deployments and URL); else create it."""
    from azure.core.exceptions import ResourceNotFoundError

    try:
        endpoint = ml_client.online_endpoints.get(endpoint_name)
        print(f"Using existing endpoint {endpoint_name} (traffic: {endpoint.traffic or {}})")
        return endpoint
    except ResourceNotFoundError:
        print(f"Creating endpoint {endpoint_name} ...")
        poller = ml_client.online_endpoints.begin_create_or_update(build_endpoint(endpoint_name, description))
        return wait_with_progress(poller, f"endpoint {endpoint_name}")


def build_deployment(endpoint_name, deployment_name, model):
    """The deployment: our score.py and pinned environment on Standard_E4s_v3, with the tutorial's settings."""
    from azure.ai.ml.entities import (CodeConfiguration, Environment, ManagedOnlineDeployment, OnlineRequestSettings,
                                      ProbeSettings)

    # The tutorial's probes: a 7.6 GB model needs minutes to load on a CPU before the first answer.
    probe = ProbeSettings(failure_threshold=30, success_threshold=1, period=100, initial_delay=500)
    return ManagedOnlineDeployment(
        name=deployment_name,
        endpoint_name=endpoint_name,
        model=model,
        code_configuration=CodeConfiguration(code=str(SCORING_DIR), scoring_script="score.py"),
        environment=Environment(
            name="phi-3-inference-environment",
            image=config.AZURE_INFERENCE_IMAGE,
            conda_file=str(SCORING_DIR / "conda.yml"),
        ),
        instance_type=config.AZURE_DEPLOYMENT_INSTANCE_TYPE,
        instance_count=config.AZURE_DEPLOYMENT_INSTANCE_COUNT,
        environment_variables={
            "SUBSCRIPTION_ID": config.AZURE_SUBSCRIPTION_ID,
            "RESOURCE_GROUP_NAME": config.AZURE_RESOURCE_GROUP_NAME,
            "UAI_CLIENT_ID": config.AZURE_MANAGED_IDENTITY_CLIENT_ID,
            "MAX_NEW_TOKENS_LIMIT": str(config.MAX_NEW_TOKENS_LIMIT),
        },
        # The tutorial also set max_queue_wait_ms; Azure deprecated it (requests wait up to
        # request_timeout_ms), and it is left out so the deployment carries no deprecated field.
        request_settings=OnlineRequestSettings(
            max_concurrent_requests_per_instance=config.MAX_CONCURRENT_REQUESTS_PER_INSTANCE,
            request_timeout_ms=config.REQUEST_TIMEOUT_MS,
        ),
        liveness_probe=probe,
        readiness_probe=copy.deepcopy(probe),
    )


def create_or_update_deployment(ml_client, endpoint_name, deployment_name, model):
    """Create (or update) the deployment and wait until Azure says it succeeded."""
    print(f"Deploying {deployment_name} to {endpoint_name} on {config.AZURE_DEPLOYMENT_INSTANCE_TYPE} (this takes 10-20 minutes) ...")
    poller = ml_client.online_deployments.begin_create_or_update(build_deployment(endpoint_name, deployment_name, model))
    return wait_with_progress(poller, f"deployment {deployment_name}")


def set_traffic_to_deployment(ml_client, endpoint_name, deployment_name):
    """Send 100% of the endpoint's traffic to `deployment_name` (the others keep running at 0%)."""
    endpoint = ml_client.online_endpoints.get(endpoint_name)
    endpoint.traffic = {name: 0 for name in (endpoint.traffic or {})} | {deployment_name: 100}
    wait_with_progress(ml_client.online_endpoints.begin_create_or_update(endpoint), "traffic update")
    print(f"Traffic: {endpoint.traffic}")


def wait_with_progress(poller, what):
    """Wait for a long-running Azure operation, printing the elapsed time every PROGRESS_EVERY_S seconds."""
    started = time.monotonic()
    while not poller.done():
        poller.wait(timeout=PROGRESS_EVERY_S)
        if not poller.done():
            print(f"  ... {what}: still working ({time.monotonic() - started:.0f} s)", flush=True)
    result = poller.result()
    print(f"  {what}: done in {time.monotonic() - started:.0f} s")
    return result


def smoke_test_azure(ml_client, endpoint_name, deployment_name):
    """Ask the new deployment directly (not through the traffic split); return its answer."""
    with tempfile.TemporaryDirectory() as folder:
        request = Path(folder) / "request.json"
        request.write_text(json.dumps(SMOKE_REQUEST))
        raw = ml_client.online_endpoints.invoke(endpoint_name=endpoint_name, deployment_name=deployment_name,
                                                request_file=str(request))
    return check_smoke_answer(json.loads(raw) if isinstance(raw, (str, bytes)) else raw)


def check_smoke_answer(answer):
    """The contract's answer: a list with one string per input."""
    if not (isinstance(answer, list) and len(answer) == 1 and isinstance(answer[0], str)):
        raise StepError(f"The smoke request got an answer outside the contract: {str(answer)[:300]}")
    return answer[0]


def live_slot(endpoint):
    """Which blue/green slot carries the traffic now (None for a new endpoint)."""
    for name, share in (endpoint.traffic or {}).items():
        if share and name.endswith(tuple(f"-{slot}" for slot in SLOTS)):
            return name.rsplit("-", 1)[1]
    return None


def deploy_azure(job_name):
    """Register, reuse or create the endpoint, deploy blue/green, smoke-test, switch traffic, write .env."""
    from azure.core.exceptions import HttpResponseError

    config.require(*config.AZURE_DEPLOY_SETTINGS)
    ml_client = get_ml_client()
    endpoint_name = config.AZURE_ENDPOINT_NAME
    with azure_errors():
        model = register_model(ml_client, config.AZURE_MODEL_NAME, job_name)
        endpoint = create_or_update_endpoint(ml_client, endpoint_name, f"Phi-3 fine-tuned by {job_name}")
        slot = other_slot(live_slot(endpoint) or SLOTS[1])
        deployment_name = f"{config.AZURE_DEPLOYMENT_NAME}-{slot}"
        try:
            create_or_update_deployment(ml_client, endpoint_name, deployment_name, model)
            answer = smoke_test_azure(ml_client, endpoint_name, deployment_name)
        except (HttpResponseError, StepError, ValueError) as error:
            if isinstance(error, HttpResponseError) and error.status_code in (401, 403):
                raise  # a sign-in or permission problem, not a failed deployment: azure_errors() explains it
            print(f"Deployment {deployment_name} failed: {error}", file=sys.stderr)
            print_deployment_logs(ml_client, endpoint_name, deployment_name)
            print(f"Traffic was left as it was: {endpoint.traffic or {}}", file=sys.stderr)
            return 1
        print(f"Smoke test: {SMOKE_QUESTION!r} -> {answer!r}")
        set_traffic_to_deployment(ml_client, endpoint_name, deployment_name)
        scoring_uri = ml_client.online_endpoints.get(endpoint_name).scoring_uri
        key = ml_client.online_endpoints.get_keys(endpoint_name).primary_key
    update_env_file(config.ENV_FILE, {"AZURE_ML_ENDPOINT": scoring_uri, "AZURE_ML_API_KEY": key})
    print(f"Endpoint {endpoint_name} serves {deployment_name}: {scoring_uri}")
    print(f"Wrote AZURE_ML_ENDPOINT and AZURE_ML_API_KEY to {config.shown(config.ENV_FILE)} (readable by you only).")
    previous = [name for name in (endpoint.traffic or {}) if name != deployment_name]
    for name in previous:
        print(f"The previous deployment {name} still runs at 0% traffic and costs money: roll back with "
              f"`az ml online-endpoint update -n {endpoint_name} --traffic \"{name}=100\"`, or delete it with "
              f"`az ml online-deployment delete -n {name} -e {endpoint_name}`.")
    print("Delete the endpoint when you are done, to stop the charges: python cleanup.py")
    return 0


def print_deployment_logs(ml_client, endpoint_name, deployment_name):
    """The last lines of the deployment's container log (where score.py's errors land)."""
    try:
        logs = ml_client.online_deployments.get_logs(name=deployment_name, endpoint_name=endpoint_name, lines=50)
    except Exception as error:  # noqa: BLE001 - the deployment already failed; this is only extra detail
        print(f"(could not fetch the deployment's logs: {type(error).__name__})", file=sys.stderr)
        return
    print_tail(logs.splitlines(), f"deployment {deployment_name}'s log")


def without_nulls(data):
    """A dumped entity with its null fields left out (the SDK's schemas refuse them when loading)."""
    if isinstance(data, dict):
        return {key: without_nulls(value) for key, value in data.items() if value is not None}
    if isinstance(data, list):
        return [without_nulls(value) for value in data]
    return data


def dump_yaml(entity, path):
    """Write an entity's YAML to `path`; a copy is dumped, since dump() rewrites an endpoint's identities in place."""
    import yaml

    data = copy.deepcopy(entity).dump(path)
    if data is not None:  # ManagedOnlineEndpoint.dump() ignores `path` and returns the dict, with nulls
        Path(path).write_text(yaml.safe_dump(without_nulls(json.loads(json.dumps(data))), sort_keys=False))


def dry_run_azure(job_name):
    """Build and validate the model, endpoint and deployment with azure-ai-ml's schemas; print them."""
    from azure.ai.ml import load_model, load_online_deployment, load_online_endpoint
    from marshmallow import ValidationError

    config.require(*config.AZURE_DEPLOY_SETTINGS)
    model = build_model(config.AZURE_MODEL_NAME, job_name)
    endpoint = build_endpoint(config.AZURE_ENDPOINT_NAME, f"Phi-3 fine-tuned by {job_name}")
    deployment = build_deployment(config.AZURE_ENDPOINT_NAME, f"{config.AZURE_DEPLOYMENT_NAME}-{SLOTS[0]}", model)
    with tempfile.TemporaryDirectory() as folder:
        for entity, loader, title in ((model, load_model, "Model"), (endpoint, load_online_endpoint, "Endpoint"),
                                      (deployment, load_online_deployment, "Deployment")):
            path = Path(folder) / f"{title.lower()}.yml"
            try:  # dump() checks types and allowed values too, before the schema checks the YAML
                dump_yaml(entity, path)
                loader(path)
            except (ValidationError, ValueError) as error:
                messages = getattr(error, "messages", error)
                raise StepError(f"The {title.lower()} does not validate: {messages}") from None
            print(f"--- {title} (validated) ---\n{path.read_text()}")
    print("Dry run: nothing was registered or deployed.")
    return 0


# --- Local: MLflow registry and local_endpoint.py, blue/green on two ports ------------------------------
def register_local_model(model_name, model_dir, job_name):
    """Register the job's MLflow model in the local registry (mlflow.db): a new version each run."""
    import mlflow

    mlflow.set_tracking_uri(config.MLFLOW_TRACKING_URI)
    try:
        version = mlflow.register_model(str(model_dir), model_name, tags={"job_name": job_name})
    except Exception as error:  # noqa: BLE001 - MLflow and its database raise many types; all mean the same here
        raise StepError(f"Could not register the model in the local MLflow registry ({config.MLFLOW_TRACKING_URI}): "
                        f"{type(error).__name__}: {error}") from error
    # The version's source is the job's folder itself: the endpoint serves exactly what was registered.
    print(f"Registered model {model_name}, version {version.version} (local MLflow registry, source {config.shown(model_dir)})")
    return version.version


def endpoint_state_file():
    """Where the local endpoint's live slot is recorded."""
    return Path(config.LOCAL_ENDPOINT_DIR) / "state.json"


def read_endpoint_state():
    """The live local deployment ({slot, port, pid, ...}), or None."""
    path = endpoint_state_file()
    return json.loads(path.read_text()) if path.is_file() else None


def process_alive(pid):
    """True if a process with this pid exists."""
    try:
        os.kill(pid, 0)
    except (OSError, TypeError):
        return False
    return True


def is_local_endpoint(pid):
    """True if `pid` runs local_endpoint.py (so a recycled pid is never signalled); trusts the pid without /proc."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not Path("/proc/self/cmdline").exists():
        return process_alive(pid)
    try:
        return b"local_endpoint.py" in cmdline.read_bytes()
    except OSError:
        return False


def stop_process(pid, grace_s=10):
    """SIGTERM a local endpoint, wait up to grace_s, then SIGKILL; returns True if it was running."""
    if not process_alive(pid) or not is_local_endpoint(pid):
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not process_alive(pid):
            return True
        try:  # reap it when it is our child; harmless otherwise
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    return True


def port_is_free(host, port):
    """True when nothing listens on host:port."""
    with socket.socket() as sock:
        return sock.connect_ex((host, port)) != 0


def start_local_endpoint(model_dir, slot, key, foreground=False):
    """Start local_endpoint.py for one slot; returns (process, url, log path)."""
    port = config.LOCAL_ENDPOINT_PORT + SLOTS.index(slot)
    host = config.LOCAL_ENDPOINT_HOST
    if not port_is_free(host, port):
        raise StepError(f"Port {port} is in use: stop what listens there (python cleanup.py stops old endpoints) "
                             "or set LOCAL_ENDPOINT_PORT.")
    folder = Path(config.LOCAL_ENDPOINT_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / f"{slot}.log"
    command = [sys.executable, str(config.PROJECT_DIR / "local_endpoint.py"), "--model-dir", str(model_dir),
               "--host", host, "--port", str(port)]
    env = {**os.environ, "LOCAL_ENDPOINT_KEY": key, "PYTHONUNBUFFERED": "1"}
    log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - the server writes to it after we return
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=not foreground, cwd=config.PROJECT_DIR)
    log.close()
    atomic_write_text(folder / f"{slot}.pid", f"{process.pid}\n")  # cleanup.py stops it even if this step dies
    url_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return process, f"http://{url_host}:{port}/score", log_path


def wait_until_ready(process, url, timeout_s=READY_TIMEOUT_S):
    """Poll /ready until 200; fail if the process exits or the time runs out."""
    import requests

    ready_url = url.rsplit("/", 1)[0] + "/ready"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StepError(f"The endpoint process exited with code {process.returncode} before it was ready.")
        try:
            response = requests.get(ready_url, timeout=2)
            if response.status_code == 200:
                return
            if response.status_code == 500:
                raise StepError(f"The endpoint could not load the model: {response.text[:300]}")
        except requests.ConnectionError:
            pass
        time.sleep(0.25)
    raise StepError(f"The endpoint was not ready after {timeout_s} s.")


def abandon_endpoint(process, slot):
    """Stop a new slot that will not get the traffic, and forget its pid (cleanup.py must never signal a reused pid)."""
    stop_process(process.pid)
    (Path(config.LOCAL_ENDPOINT_DIR) / f"{slot}.pid").unlink(missing_ok=True)


def smoke_test_local(url, key):
    """Ask the new endpoint the smoke question, the way the tutorial's client does; return the answer."""
    import requests

    response = requests.post(url, json=SMOKE_REQUEST, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    if response.status_code != 200:
        raise StepError(f"The smoke request got HTTP {response.status_code}: {response.text[:300]}")
    return check_smoke_answer(response.json())


def deploy_local(job, foreground=False):
    """Start the new slot beside the live one while registering, smoke-test, switch .env, stop the old slot."""
    model_dir = config.PROJECT_DIR / job.get("model_output", Path(config.JOBS_DIR) / job["name"] / "model_output")
    if not (Path(model_dir) / "MLmodel").is_file():
        raise StepError(f"No MLflow model in {config.shown(model_dir)}: run `python setup_ml.py` first.")
    live = read_endpoint_state()
    if live and not process_alive(live.get("pid")):
        live = None  # stale record: that endpoint is gone
    slot = other_slot(live["slot"]) if live else SLOTS[0]
    key = secrets.token_urlsafe(32)
    # The new slot starts first: its server spends seconds importing torch while the model is registered.
    process, url, log_path = start_local_endpoint(model_dir, slot, key, foreground)
    print(f"Starting local endpoint '{slot}' (pid {process.pid}) on {url} ...")
    started = time.monotonic()
    try:
        version = register_local_model(config.AZURE_MODEL_NAME, model_dir, job["name"])
    except BaseException:  # no registered version, no deployment: the new slot goes, the live one keeps serving
        abandon_endpoint(process, slot)
        raise
    try:
        wait_until_ready(process, url)
        answer = smoke_test_local(url, key)
    except KeyboardInterrupt:
        abandon_endpoint(process, slot)
        raise
    except (StepError, OSError) as error:
        abandon_endpoint(process, slot)
        print(f"The new endpoint failed: {error}", file=sys.stderr)
        print_tail(log_path.read_text(encoding="utf-8", errors="replace").splitlines(), config.shown(log_path))
        if live:
            print(f"The previous endpoint ({live['slot']}, {live['url']}) keeps serving.", file=sys.stderr)
        return 1
    print(f"Ready in {time.monotonic() - started:.1f} s. Smoke test: {SMOKE_QUESTION!r} -> {answer!r}")
    update_env_file(config.ENV_FILE, {"AZURE_ML_ENDPOINT": url, "AZURE_ML_API_KEY": key})
    state = {"slot": slot, "pid": process.pid, "url": url, "log": str(log_path), "model_name": config.AZURE_MODEL_NAME,
             "model_version": version, "job_name": job["name"]}
    atomic_write_text(endpoint_state_file(), json.dumps(state, indent=2) + "\n")
    if live:
        stop_process(live["pid"])
        (Path(config.LOCAL_ENDPOINT_DIR) / f"{live['slot']}.pid").unlink(missing_ok=True)
        print(f"Stopped the previous endpoint ({live['slot']}, pid {live['pid']}).")
    print(f"Wrote AZURE_ML_ENDPOINT and AZURE_ML_API_KEY to {config.shown(config.ENV_FILE)} (readable by you only).")
    print(f"Local endpoint serves {config.AZURE_MODEL_NAME} v{version} at {url}; log: {config.shown(log_path)}; "
          "stop it with: python cleanup.py")
    if foreground:
        print("Serving in the foreground; Ctrl+C stops it.")
        try:
            process.wait()
        except KeyboardInterrupt:
            stop_process(process.pid)
            endpoint_state_file().unlink(missing_ok=True)
    return 0


def parse_args(argv=None):
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job-name", default=None, help="the fine-tuning job to deploy (default: the last one setup_ml.py ran)")
    parser.add_argument("--dry-run", action="store_true", help="Azure: build and validate everything, deploy nothing")
    parser.add_argument("--foreground", action="store_true", help="local: keep the endpoint in this terminal")
    return parser.parse_args(argv)


def main(argv=None):
    """Run step 3 for config.TARGET; returns the exit code."""
    args = parse_args(argv)
    try:
        if config.TARGET == "local":
            return deploy_local(find_job(args.job_name, "local"), args.foreground)
        if args.dry_run:
            record = read_last_job()
            job_name = args.job_name or (record or {}).get("name") or "<job-name>"
            return dry_run_azure(job_name)
        return deploy_azure(find_job(args.job_name, "azure")["name"])
    except (StepError, config.MissingSettingsError) as error:
        return exit_with(error)


if __name__ == "__main__":
    sys.exit(main())
