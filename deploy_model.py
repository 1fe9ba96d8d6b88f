"""Step 3 — register the fine-tuned model and serve it from an endpoint; its URL and key go into .env.

    python deploy_model.py                          # local: MLflow registry + an endpoint on 127.0.0.1:5001
    TARGET=azure python deploy_model.py             # Azure ML managed online endpoint on Standard_E4s_v3
    TARGET=azure python deploy_model.py --dry-run   # builds and validates model, endpoint, deployment; no network
    TARGET=serverless python deploy_model.py        # a serverless endpoint for the model step 2 fine-tuned (serverless.py)

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
import sys
import tempfile
from pathlib import Path

import config
from azure_ml import (SLOTS, azure_errors, check_deploy_names as check_names, check_existing_endpoint, delete_if_failed,
                      get_ml_client, inference_environment, next_slot, print_deployment_log_tail, print_validated,
                      retire_previous, wait_with_progress)
from job_record import find_job, read_last_job
import serverless
from safe_write import update_env_file
from step_errors import StepError, exit_with

SCORING_DIR = config.PROJECT_DIR / "scoring_dir"
SMOKE_QUESTION = "Who founded Microsoft?"
SMOKE_REQUEST = {"input_data": [SMOKE_QUESTION], "params": {"max_new_tokens": 64, "do_sample": False}}


# --- The tutorial's functions (get_ml_client comes from azure_ml.py: steps 2, 3 and cleanup share it) -----
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


def create_or_update_deployment(ml_client, endpoint_name, deployment_name, model):
    """Create (or update) the deployment and wait until Azure says it succeeded (a failure raises)."""
    print(f"Deploying {deployment_name} to {endpoint_name} on {config.AZURE_DEPLOYMENT_INSTANCE_TYPE} (this takes 10-20 minutes) ...")
    poller = ml_client.online_deployments.begin_create_or_update(build_deployment(endpoint_name, deployment_name, model))
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
    check_names()
    ml_client = get_ml_client()
    endpoint_name = config.AZURE_ENDPOINT_NAME
    with azure_errors():
        model = register_model(ml_client, config.AZURE_MODEL_NAME, job_name)
        endpoint = create_or_update_endpoint(ml_client, endpoint_name, f"Phi-3 fine-tuned by {job_name}")
        deployment_name = f"{config.AZURE_DEPLOYMENT_NAME}-{next_slot(endpoint)}"
        try:  # unlike the tutorial, a failed deployment is reported and exits non-zero; traffic stays
            delete_if_failed(ml_client, endpoint, deployment_name)
            create_or_update_deployment(ml_client, endpoint_name, deployment_name, model)
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
        update_env_file(config.ENV_FILE, {"AZURE_ML_ENDPOINT": scoring_uri, "AZURE_ML_API_KEY": key})
        print(f"Endpoint {endpoint_name} serves {deployment_name}: {scoring_uri}")
        print(f"Wrote AZURE_ML_ENDPOINT and AZURE_ML_API_KEY to {config.shown(config.ENV_FILE)} (readable by you only).")
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


def build_deployment(endpoint_name, deployment_name, model):
    """The deployment: our score.py and pinned environment on Standard_E4s_v3, with the tutorial's settings."""
    from azure.ai.ml.entities import CodeConfiguration, ManagedOnlineDeployment, OnlineRequestSettings, ProbeSettings

    # The tutorial's probes: a 7.6 GB model needs minutes to load on a CPU before the first answer.
    probe = ProbeSettings(failure_threshold=30, success_threshold=1, period=100, initial_delay=500)
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
            "MAX_NEW_TOKENS_LIMIT": str(config.MAX_NEW_TOKENS_LIMIT),
            "MAX_INPUTS_PER_REQUEST": str(config.MAX_INPUTS_PER_REQUEST),
            "WORKER_COUNT": str(config.AZURE_WORKER_COUNT),  # azmlinfsrv's gunicorn workers (see config.py)
            "SERVING_RUNTIME": config.SERVING_RUNTIME,  # auto: the job's ONNX export on a CPU instance
        },
        # The tutorial also set max_queue_wait_ms; Azure deprecated it (requests wait up to request_timeout_ms).
        request_settings=OnlineRequestSettings(
            max_concurrent_requests_per_instance=config.MAX_CONCURRENT_REQUESTS_PER_INSTANCE,
            request_timeout_ms=config.REQUEST_TIMEOUT_MS,
        ),
        liveness_probe=probe,
        readiness_probe=copy.deepcopy(probe),
    )


# --- The smoke request (not in the tutorial: a bad model never gets the traffic) ---------------------------
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


def dry_run_azure(job_name):
    """Build and validate the model, endpoint and deployment with azure-ai-ml's schemas; print them."""
    from azure.ai.ml import load_model, load_online_deployment, load_online_endpoint

    config.require(*config.AZURE_DEPLOY_SETTINGS)
    check_names()
    model = build_model(config.AZURE_MODEL_NAME, job_name)
    endpoint = build_endpoint(config.AZURE_ENDPOINT_NAME, f"Phi-3 fine-tuned by {job_name}")
    deployment = build_deployment(config.AZURE_ENDPOINT_NAME, f"{config.AZURE_DEPLOYMENT_NAME}-{SLOTS[0]}", model)
    print_validated([("Model", model, load_model), ("Endpoint", endpoint, load_online_endpoint),
                     ("Deployment", deployment, load_online_deployment)])
    print("Dry run: nothing was registered or deployed.")
    return 0


def parse_args(argv=None):
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job-name", default=None, help="the fine-tuning job to deploy (default: the last one setup_ml.py ran)")
    parser.add_argument("--dry-run", action="store_true", help="Azure: build and validate everything, deploy nothing")
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

            return deploy_local(find_job(args.job_name, "local"), SMOKE_REQUEST, check_smoke_answer, args.foreground)
        if config.TARGET == "serverless":  # Azure AI Foundry's serverless API instead of an online endpoint
            return serverless.deploy(args.job_name, args.dry_run)
        if args.dry_run:
            return dry_run_azure(args.job_name or (read_last_job() or {}).get("name") or "<job-name>")
        return deploy_azure(find_job(args.job_name, "azure")["name"], args.keep_previous)
    except (StepError, config.MissingSettingsError) as error:
        return exit_with(error)


if __name__ == "__main__":
    sys.exit(main())
