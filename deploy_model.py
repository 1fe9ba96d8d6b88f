"""Step 3 — register the fine-tuned model and serve it from an endpoint; its URL and key go into .env.

    python deploy_model.py                          # local: MLflow registry + an endpoint on 127.0.0.1:5001
    TARGET=azure python deploy_model.py             # Azure ML managed online endpoint on Standard_E4s_v3
    TARGET=azure python deploy_model.py --dry-run   # builds and validates model, endpoint, deployment; no network
    TARGET=azure python deploy_model.py --check     # asks Azure what the deployment needs (quota, identity, ...)
    TARGET=serverless python deploy_model.py        # a serverless endpoint for the model step 2 fine-tuned (serverless/)

The job comes from outputs/last_job.json (written by setup_ml.py) or --job-name. Both targets deploy
blue/green: the new deployment is started next to the one serving, sent a smoke request, and only then
given the traffic; if anything fails, the log's tail is printed, traffic stays where it was and the step
exits non-zero. An existing endpoint is never deleted. Afterwards .env (mode 600) holds AZURE_ML_ENDPOINT
and AZURE_ML_API_KEY, which integrate_with_promptflow.py reads — nothing to copy from the studio.

Locally the endpoint is stand_ins/endpoint_server.py in the background (pid, state and log in
outputs/endpoint/; --foreground keeps it in this terminal); `python cleanup.py` stops it.
"""

import argparse
import copy
import json
import re
import sys
import tempfile
from pathlib import Path

import config
from helpers.azure_ml import (azure_errors, check_name, get_ml_client, print_deployment_log_tail, print_validated,
                              state_name, wait_with_progress)
from helpers.endpoint import publish, smoke_answer, smoke_request
from helpers import preflight
from helpers.errors import StepError, exit_code
from helpers.job_record import find_job, read_last_job
from helpers.serving_speed import PROBE_FAILURE_THRESHOLD, endpoint_settings
from scoring_dir.contract import SCORE_ENVIRONMENT, SLOTS, SMOKE_QUESTION
import serverless

SCORING_DIR = config.PROJECT_DIR / "scoring_dir"


# --- The tutorial's functions (get_ml_client comes from helpers/azure_ml.py: steps 2, 3 and cleanup share it) -----
def register_model(ml_client, model_name, job_name):
    """Register the job's output as a new version of `model_name`."""
    model = ml_client.models.create_or_update(build_model(model_name, job_name))
    print(f"Registered model {model.name}, version {model.version}")
    return model


# The tutorial's delete_existing_endpoint() is left out on purpose: deleting drops the live deployments and URL.
def create_or_update_endpoint(ml_client, endpoint_name, description):
    """Reuse the endpoint if it exists; else create it (empty: traffic only once a deployment has answered)."""
    from azure.core.exceptions import ResourceNotFoundError

    try:
        endpoint = ml_client.online_endpoints.get(endpoint_name)
    except ResourceNotFoundError:  # only "not found": an auth error must not look like "missing"
        print(f"Creating endpoint {endpoint_name} ...")
        poller = ml_client.online_endpoints.begin_create_or_update(build_endpoint(endpoint_name, description))
        return wait_with_progress(poller, f"endpoint {endpoint_name}")
    check_existing_endpoint(endpoint)
    print(f"Using existing endpoint {endpoint_name} (traffic: {endpoint.traffic or {}})")
    return endpoint


def create_or_update_deployment(ml_client, endpoint_name, deployment_name, model, settings):
    """Create (or update) the deployment and wait until Azure says it succeeded (a failure raises)."""
    print(f"Deploying {deployment_name} to {endpoint_name} on {config.AZURE_DEPLOYMENT_INSTANCE_TYPE} (this takes 10-20 minutes) ...")
    poller = ml_client.online_deployments.begin_create_or_update(
        build_deployment(endpoint_name, deployment_name, model, settings))
    return wait_with_progress(poller, f"deployment {deployment_name}")


def set_traffic_to_deployment(ml_client, endpoint_name, deployment_name):
    """Send 100% of the endpoint's traffic to `deployment_name` (the others keep running at 0%)."""
    endpoint = ml_client.online_endpoints.get(endpoint_name)
    endpoint.traffic = {name: 0 for name in (endpoint.traffic or {})} | {deployment_name: 100}
    wait_with_progress(ml_client.online_endpoints.begin_create_or_update(endpoint), "traffic update")
    print(f"Traffic: {endpoint.traffic}")


def deploy_azure(job_name, keep_previous=False):
    """The tutorial's main(), blue/green: register, endpoint, deployment, smoke request, traffic, then .env."""
    from azure.ai.ml.exceptions import MlException
    from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError

    config.require(*config.AZURE_DEPLOY_SETTINGS)
    check_deploy_names()
    ml_client = get_ml_client()
    endpoint_name = config.AZURE_ENDPOINT_NAME
    with azure_errors():
        preflight.before_deployment(ml_client, deployment_image())  # not in the tutorial: asked before anything is billed
        settings = serving_settings(export_record(ml_client, job_name))
        model = register_model(ml_client, config.AZURE_MODEL_NAME, job_name)
        endpoint = create_or_update_endpoint(ml_client, endpoint_name, f"Phi-3 fine-tuned by {job_name}")
        deployment_name = f"{config.AZURE_DEPLOYMENT_NAME}-{next_slot(endpoint)}"
        try:  # unlike the tutorial, a failed deployment is reported and exits non-zero; traffic stays
            delete_if_failed(ml_client, endpoint, deployment_name)
            create_or_update_deployment(ml_client, endpoint_name, deployment_name, model, settings)
            answer = smoke_test_azure(ml_client, endpoint_name, deployment_name)
        except (HttpResponseError, ServiceRequestError, ServiceResponseError, MlException, StepError, ValueError,
                KeyboardInterrupt) as error:
            if isinstance(error, HttpResponseError) and error.status_code in (401, 403):
                raise  # a sign-in or permission problem, not a failed deployment: azure_errors() explains it
            stopped = isinstance(error, KeyboardInterrupt)
            print(f"\nStopped waiting: Azure goes on with {deployment_name} (`az ml online-deployment show -n "
                  f"{deployment_name} -e {endpoint_name}`)." if stopped else f"Deployment {deployment_name} failed: "
                  f"{type(error).__name__}: {error}", file=sys.stderr)
            if not stopped:
                print_deployment_log_tail(ml_client, endpoint_name, deployment_name)
            print(f"Traffic was left as it was: {endpoint.traffic or {}}", file=sys.stderr)
            return 130 if stopped else 1
        print(f"Smoke test: {SMOKE_QUESTION!r} -> {answer!r}")
        set_traffic_to_deployment(ml_client, endpoint_name, deployment_name)
        # The tutorial copies these from the studio's Consume tab by hand.
        scoring_uri = ml_client.online_endpoints.get(endpoint_name).scoring_uri
        key = ml_client.online_endpoints.get_keys(endpoint_name).primary_key
        print(f"Endpoint {endpoint_name} serves {deployment_name}: {scoring_uri}")
        publish(scoring_uri, key)
        retire_previous(ml_client, endpoint, deployment_name, keep_previous)
    print("Delete the endpoint when you are done, to stop the charges: python cleanup.py")
    return 0


# --- The entities the tutorial's functions submit ---------------------------------------------------------
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


def build_deployment(endpoint_name, deployment_name, model, settings):
    """The deployment: our score.py and pinned environment on Standard_E4s_v3; concurrency and probes from `settings`."""
    from azure.ai.ml.entities import CodeConfiguration, ManagedOnlineDeployment, OnlineRequestSettings, ProbeSettings

    # Unlike the tutorial's fixed 500 s, the probes wait as long as the served runtime needs to load (serving_speed.py).
    probe = ProbeSettings(failure_threshold=PROBE_FAILURE_THRESHOLD, success_threshold=1, period=settings.probe_period_s,
                          initial_delay=settings.probe_initial_delay_s)
    return ManagedOnlineDeployment(
        name=deployment_name,
        endpoint_name=endpoint_name,
        model=model,
        # Our own score.py and environment instead of a no-code MLflow deployment, which keeps breaking.
        code_configuration=CodeConfiguration(code=str(SCORING_DIR), scoring_script="score.py"),
        environment=inference_environment(SCORING_DIR),  # on a GPU instance type: CUDA image and torch
        instance_type=config.AZURE_DEPLOYMENT_INSTANCE_TYPE,
        instance_count=config.AZURE_DEPLOYMENT_INSTANCE_COUNT,
        environment_variables={
            "SUBSCRIPTION_ID": config.AZURE_SUBSCRIPTION_ID,
            "RESOURCE_GROUP_NAME": config.AZURE_RESOURCE_GROUP_NAME,
            "UAI_CLIENT_ID": config.AZURE_MANAGED_IDENTITY_CLIENT_ID,
            "WORKER_COUNT": str(config.AZURE_WORKER_COUNT),  # azmlinfsrv's gunicorn workers (see config.py)
            # What score.py reads: its limits, and SERVING_RUNTIME (auto: the job's ONNX export on a CPU instance).
            **{name: str(getattr(config, name)) for name in SCORE_ENVIRONMENT},
        },
        # The tutorial also set max_queue_wait_ms; Azure deprecated it (requests wait up to request_timeout_ms).
        request_settings=OnlineRequestSettings(
            max_concurrent_requests_per_instance=settings.max_concurrent_requests,
            request_timeout_ms=config.REQUEST_TIMEOUT_MS,
        ),
        liveness_probe=probe,
        readiness_probe=copy.deepcopy(probe),
    )


# --- Concurrency and probes from the job's measured speed (not in the tutorial: it fixed 3 and 500 s) ---------------
def export_record(ml_client, job_name):
    """The job's export record (model_output/onnx_export.json: the export's measured speed), or None without one."""
    from azure.ai.ml._artifacts._artifact_utilities import download_artifact_from_aml_uri

    output = (ml_client.jobs.get(job_name).outputs or {}).get("model_output")
    uri = getattr(output, "path", None)
    if not isinstance(uri, str) or not uri.startswith("azureml://datastores/"):
        return None
    with tempfile.TemporaryDirectory() as folder:
        # The SDK's own downloader, for one small file: jobs.download would fetch the whole model (gigabytes).
        download_artifact_from_aml_uri(uri.rstrip("/") + "/onnx_export.json", folder, ml_client.datastores)
        found = sorted(Path(folder).rglob("onnx_export.json"))
        return json.loads(found[0].read_text(encoding="utf-8")) if found else None


def serving_settings(record):
    """The deployment's concurrency and probes for the runtime it will serve (MAX_CONCURRENT_REQUESTS_PER_INSTANCE,
    when set, overrides the derived concurrency); printed with where the speed came from."""
    settings = endpoint_settings(record, deployment_has_gpu())
    if config.is_set("MAX_CONCURRENT_REQUESTS_PER_INSTANCE"):
        settings.max_concurrent_requests = config.MAX_CONCURRENT_REQUESTS_PER_INSTANCE
    print(f"Serving with {settings.runtime} at {settings.tokens_per_second:g} tokens/s ({settings.source}): a full "
          f"request takes ~{settings.seconds_per_request:g} s, so {settings.max_concurrent_requests} concurrent "
          f"request(s) per instance; probes start after {settings.probe_initial_delay_s} s.")
    if settings.seconds_per_request * 1000 > config.REQUEST_TIMEOUT_MS:
        print(f"Warning: one full request (~{settings.seconds_per_request:g} s) is longer than REQUEST_TIMEOUT_MS "
              f"({config.REQUEST_TIMEOUT_MS} ms): lower MAX_INPUTS_PER_REQUEST, or serve a faster export.",
              file=sys.stderr)
    return settings


# --- The smoke request (not in the tutorial: a bad model never gets the traffic) ---------------------------
def smoke_test_azure(ml_client, endpoint_name, deployment_name):
    """Ask the new deployment directly (not through the traffic split) the smoke question; return its answer."""
    with tempfile.TemporaryDirectory() as folder:
        request = Path(folder) / "request.json"
        request.write_text(json.dumps(smoke_request()))
        raw = ml_client.online_endpoints.invoke(endpoint_name=endpoint_name, deployment_name=deployment_name,
                                                request_file=str(request))
    return smoke_answer(json.loads(raw) if isinstance(raw, (str, bytes)) else raw)


# --- Blue/green housekeeping (not in the tutorial: a deployment replaces another without downtime) ---------
def next_slot(endpoint):
    """The blue/green slot for the new deployment: the one not carrying the traffic (blue for a new endpoint)."""
    for name, share in (endpoint.traffic or {}).items():
        if share and name.endswith(tuple(f"-{slot}" for slot in SLOTS)):
            return SLOTS[1 - SLOTS.index(name.rsplit("-", 1)[1])]
    return SLOTS[0]


def check_existing_endpoint(endpoint):
    """StepError for an endpoint that cannot take a deployment now, or whose keys the flow cannot use."""
    state = state_name(endpoint.provisioning_state) or "Succeeded"
    if state.lower() == "failed":
        raise StepError(f"Endpoint {endpoint.name} is in state Failed: delete it (`python cleanup.py`) and deploy again.")
    if state.lower() != "succeeded":
        raise StepError(f"Endpoint {endpoint.name} is still {state}: wait for it, then deploy again.")
    if endpoint.auth_mode != "key":
        raise StepError(f"Endpoint {endpoint.name} uses auth_mode {endpoint.auth_mode}, and the flow sends a key: choose "
                        "another AZURE_ENDPOINT_NAME, or delete this endpoint (`python cleanup.py`).")


def delete_if_failed(ml_client, endpoint, deployment_name):
    """Delete a deployment whose provisioning failed and that has no traffic: Azure cannot update it, only re-create."""
    from azure.core.exceptions import ResourceNotFoundError

    try:
        existing = ml_client.online_deployments.get(name=deployment_name, endpoint_name=endpoint.name)
    except ResourceNotFoundError:
        return
    if (state_name(existing.provisioning_state) or "").lower() == "failed" and not (endpoint.traffic or {}).get(deployment_name):
        print(f"Deployment {deployment_name} failed before and cannot be updated; deleting it to re-create it ...")
        wait_with_progress(ml_client.online_deployments.begin_delete(name=deployment_name, endpoint_name=endpoint.name),
                           f"deleting {deployment_name}")


def retire_previous(ml_client, endpoint, deployment_name, keep):
    """Delete the deployments that had the traffic before (each holds quota and is billed), unless `keep`."""
    for name in [name for name in (endpoint.traffic or {}) if name != deployment_name]:
        if keep:
            print(f"The previous deployment {name} still runs at 0% traffic and costs money: roll back with "
                  f"`az ml online-endpoint update -n {endpoint.name} --traffic \"{name}=100\"`, or delete it with "
                  f"`az ml online-deployment delete -n {name} -e {endpoint.name}`.")
            continue
        wait_with_progress(ml_client.online_deployments.begin_delete(name=name, endpoint_name=endpoint.name),
                           f"deleting the previous deployment {name}")
        print(f"Deleted the previous deployment {name} (0% traffic; --keep-previous keeps one for a rollback).")


def check_deploy_names():
    """Azure's naming rules for the endpoint and both blue/green deployments, before anything is sent."""
    check_name(config.AZURE_ENDPOINT_NAME, "AZURE_ENDPOINT_NAME", 32, "endpoint")
    for slot in SLOTS:  # "-green" is one character longer than "-blue": both must fit
        check_name(f"{config.AZURE_DEPLOYMENT_NAME}-{slot}", "AZURE_DEPLOYMENT_NAME", 32, "deployment")


# --- The deployment's environment: CPU or GPU by instance type -------------------------------------------------------
# Azure's GPU VM families are the N series: NC (compute, e.g. Standard_NC4as_T4_v3, Standard_NC24ads_A100_v4),
# ND (deep learning, e.g. Standard_ND96asr_v4) and NV (visualization); every other family has no GPU.
GPU_INSTANCE_TYPE = re.compile(r"^Standard_N[CDV]\d", re.IGNORECASE)


def deployment_has_gpu(instance_type=None):
    """True when the deployment's instance type has a GPU (AZURE_DEPLOYMENT_HAS_GPU=true/false overrides the rule)."""
    override = config.AZURE_DEPLOYMENT_HAS_GPU.strip().lower()
    if override in ("true", "false"):
        return override == "true"
    return bool(GPU_INSTANCE_TYPE.match(instance_type or config.AZURE_DEPLOYMENT_INSTANCE_TYPE))


def deployment_image(instance_type=None):
    """(setting, image): the base image the deployment's environment builds on (CUDA on a GPU instance type)."""
    setting = "AZURE_GPU_INFERENCE_IMAGE" if deployment_has_gpu(instance_type) else "AZURE_INFERENCE_IMAGE"
    return setting, getattr(config, setting)


def inference_environment(scoring_dir, instance_type=None):
    """The deployment's Environment: the CPU image and conda.yml (CPU torch), or on a GPU instance type the CUDA
    image and conda_gpu.yml (CUDA torch; score.py then loads the model in bf16, or fp16 where the GPU lacks bf16)."""
    from azure.ai.ml.entities import Environment

    if deployment_has_gpu(instance_type):
        return Environment(name="phi-3-inference-environment-gpu", image=config.AZURE_GPU_INFERENCE_IMAGE,
                           conda_file=str(Path(scoring_dir) / "conda_gpu.yml"))
    return Environment(name="phi-3-inference-environment", image=config.AZURE_INFERENCE_IMAGE,
                       conda_file=str(Path(scoring_dir) / "conda.yml"))


def dry_run_azure(job_name):
    """Build and validate the model, endpoint and deployment with azure-ai-ml's schemas; print them."""
    from azure.ai.ml import load_model, load_online_deployment, load_online_endpoint

    config.require(*config.AZURE_DEPLOY_SETTINGS)
    check_deploy_names()
    model = build_model(config.AZURE_MODEL_NAME, job_name)
    endpoint = build_endpoint(config.AZURE_ENDPOINT_NAME, f"Phi-3 fine-tuned by {job_name}")
    # Offline, the job's export record is not read: the stated default speed; the real run reads the record.
    deployment = build_deployment(config.AZURE_ENDPOINT_NAME, f"{config.AZURE_DEPLOYMENT_NAME}-{SLOTS[0]}", model,
                                  serving_settings(None))
    print_validated([("Model", model, load_model), ("Endpoint", endpoint, load_online_endpoint),
                     ("Deployment", deployment, load_online_deployment)])
    print("Dry run: nothing was registered or deployed.")
    return 0


def parse_args(argv=None):
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job-name", default=None, help="the fine-tuning job to deploy (default: the last one setup_ml.py ran)")
    parser.add_argument("--dry-run", action="store_true", help="Azure: build and validate everything, deploy nothing")
    parser.add_argument("--check", action="store_true",
                        help="Azure: ask Azure whether the deployment can run (quota, identity, image), deploy nothing")
    parser.add_argument("--foreground", action="store_true", help="local: keep the endpoint in this terminal")
    parser.add_argument("--keep-previous", action="store_true",
                        help="Azure: keep the previous deployment (at 0%% traffic, still billed) for a rollback")
    return parser.parse_args(argv)


def main(argv=None):
    """Run step 3 for config.TARGET; returns the exit code."""
    args = parse_args(argv)
    try:
        if config.TARGET == "local":  # MLflow's registry and a local endpoint stand in: stand_ins/deployment.py
            from stand_ins.deployment import deploy_local

            return deploy_local(find_job(args.job_name, "local"), args.foreground)
        if config.TARGET == "serverless":  # Azure AI Foundry's serverless API instead of an online endpoint
            return serverless.deploy(args.job_name, args.dry_run, args.check)
        if args.check:
            config.require(*config.AZURE_DEPLOY_SETTINGS)
            with azure_errors():
                return preflight.checked(preflight.deployment_checks(get_ml_client(), deployment_image()),
                                         "step 3 on Azure ML")
        if args.dry_run:
            return dry_run_azure(args.job_name or (read_last_job() or {}).get("name") or "<job-name>")
        return deploy_azure(find_job(args.job_name, "azure")["name"], args.keep_previous)
    except StepError as error:  # config.MissingSettingsError included
        return exit_code(error)


if __name__ == "__main__":
    sys.exit(main())
