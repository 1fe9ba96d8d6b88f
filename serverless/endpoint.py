"""Step 3 on the serverless road: a serverless endpoint for the fine-tuned model, billed while it exists.

    TARGET=serverless python deploy_model.py [--dry-run] # deploy(): deploy_serverless() / dry_run_deploy()
    TARGET=serverless python cleanup.py                  # cleanup(): deletes the endpoint (asks first)

The model step 2 registered is deployed as a `ServerlessEndpoint` (one that exists is reused when it serves
that model, and never deleted here), asked one question, and only then its chat-completions URL and key go
into .env (mode 600), where the flow reads them.
"""

import sys

import config
from helpers.azure_ml import (azure_errors, check_name, get_ml_client, state_name, validate_rest_entity,
                              wait_with_progress)
from helpers.errors import StepError
from helpers.endpoint import publish, smoke_test
from helpers.job_record import find_job, read_last_job
from scoring_dir.contract import CHAT_COMPLETIONS_PATH, SMOKE_QUESTION
from helpers import preflight
from serverless.azure_checks import note_experimental, serverless_refusals
from serverless.job import registered_model


def build_serverless_endpoint(endpoint_name, model_id, job_name):
    """The ServerlessEndpoint entity, serving the fine-tuned model (Azure gives it key authentication).

    Only what azure-ai-ml sends is set: its request carries the model id, the tags, the Consumption sku and the
    location (ServerlessEndpoint._to_rest_object); an auth_mode or description would be printed and never sent.
    """
    from azure.ai.ml.entities import ServerlessEndpoint

    return ServerlessEndpoint(name=endpoint_name, model_id=model_id, tags={"job_name": job_name})


def fine_tuned_model_id(location, workspace_id, model):
    """The id a serverless endpoint takes for a model the workspace registered (Azure's samples build it so)."""
    return f"azureml://locations/{location}/workspaces/{workspace_id}/models/{model['name']}/versions/{model['version']}"


def create_or_reuse_endpoint(ml_client, endpoint_name, model_id, job_name):
    """The serverless endpoint serving `model_id`: created when missing, reused when it serves it; never deleted."""
    from azure.core.exceptions import ResourceNotFoundError

    try:
        endpoint = ml_client.serverless_endpoints.get(endpoint_name)
    except ResourceNotFoundError:  # only "not found": an auth error must not look like "missing"
        print(f"Creating serverless endpoint {endpoint_name} for {model_id} (a few minutes) ...")
        poller = ml_client.serverless_endpoints.begin_create_or_update(
            build_serverless_endpoint(endpoint_name, model_id, job_name))
        return wait_with_progress(poller, f"serverless endpoint {endpoint_name}")
    state = (state_name(endpoint.provisioning_state) or "succeeded").lower()
    if endpoint.model_id != model_id:
        raise StepError(f"Serverless endpoint {endpoint_name} already serves {endpoint.model_id}, and it is not deleted "
                        "here: set SERVERLESS_ENDPOINT_NAME to a new name, or delete it with `TARGET=serverless python "
                        "cleanup.py` and deploy again.")
    if state == "failed":
        raise StepError(f"Serverless endpoint {endpoint_name} is in state failed: delete it with `TARGET=serverless "
                        "python cleanup.py` and deploy again.")
    if state != "succeeded":
        raise StepError(f"Serverless endpoint {endpoint_name} is still {state}: wait for it, then deploy again.")
    print(f"Using existing serverless endpoint {endpoint_name} (it already serves {model_id})")
    return endpoint


def chat_completions_url(scoring_uri):
    """The URL the flow posts to: the endpoint's scoring URI plus the chat-completions path."""
    return scoring_uri.rstrip("/") + CHAT_COMPLETIONS_PATH


def deploy_serverless(job_name):
    """Step 3 on the serverless road: endpoint, smoke request, then URL and key into .env."""
    record = find_job(job_name, "serverless")
    job_name, model = record["name"], record.get("registered_model")
    ml_client = get_ml_client()
    endpoint_name = config.SERVERLESS_ENDPOINT_NAME
    with azure_errors(), serverless_refusals():
        workspace = preflight.before_serverless_deployment(ml_client)["workspace"]  # nothing billed before
        model = model or registered_model(ml_client, job_name)
        # _workspace_id: the workspace's GUID, which the model id needs; azure-ai-ml has no public name for it.
        model_id = fine_tuned_model_id(workspace.location, workspace._workspace_id, model)
        endpoint = create_or_reuse_endpoint(ml_client, endpoint_name, model_id, job_name)
        url = chat_completions_url(endpoint.scoring_uri)
        key = ml_client.serverless_endpoints.get_keys(endpoint_name).primary_key
    try:
        print(f"Smoke test: {SMOKE_QUESTION!r} -> {smoke_test(url, key)!r}")
    except StepError:
        print(f"Serverless endpoint {endpoint_name} stays (a fine-tuned model's deployment is billed per hour): "
              "`TARGET=serverless python cleanup.py` deletes it. .env was left as it was.", file=sys.stderr)
        raise
    print(f"Serverless endpoint {endpoint_name}: {url}")
    publish(url, key)
    print("Delete the endpoint when you are done, to stop its hourly hosting charge: TARGET=serverless python cleanup.py")
    return 0


def dry_run_deploy(job_name):
    """Build the serverless endpoint, validate it with azure-ai-ml's own checks, print it; no network."""
    from azure.ai.ml import load_serverless_endpoint

    record = read_last_job() or {}
    model = record.get("registered_model") if record.get("target") == "serverless" else None
    model = model or {"name": config.SERVERLESS_MODEL_PREFIX, "version": "<version>"}
    # The workspace's region and GUID come from Azure when deploying for real.
    model_id = fine_tuned_model_id("<workspace-region>", "<workspace-id>", model)
    endpoint = build_serverless_endpoint(config.SERVERLESS_ENDPOINT_NAME, model_id, job_name)
    text = validate_rest_entity(endpoint, load_serverless_endpoint, "Serverless endpoint")
    print(f"--- Serverless endpoint (validated) ---\n{text}")
    print("Dry run: nothing was deployed.")
    return 0


def deploy(job_name, dry_run, check=False):
    """Step 3 on the serverless road (check: the preflight only)."""
    config.require(*config.SERVERLESS_DEPLOY_SETTINGS)
    check_name(config.SERVERLESS_ENDPOINT_NAME, "SERVERLESS_ENDPOINT_NAME", 32, "serverless endpoint")
    note_experimental()
    if check:
        with azure_errors():
            preflight.before_serverless_deployment(get_ml_client())
        print("Preflight passed: nothing was deployed.")
        return 0
    if dry_run:
        return dry_run_deploy(job_name or (read_last_job() or {}).get("name") or "<job-name>")
    return deploy_serverless(job_name)



def delete_serverless_endpoint(ml_client, endpoint_name, confirm):
    """Delete the serverless endpoint once `confirm(question)` says yes; returns a line saying what happened."""
    from azure.core.exceptions import ResourceNotFoundError

    try:
        endpoint = ml_client.serverless_endpoints.get(endpoint_name)
    except ResourceNotFoundError:
        return f"serverless endpoint {endpoint_name}: not found (already deleted)"
    if not confirm(f"Delete serverless endpoint {endpoint_name} (serving {endpoint.model_id}) and its URL and keys?"):
        return f"serverless endpoint {endpoint_name}: kept (a fine-tuned model's deployment is billed per hour)"
    print(f"Deleting serverless endpoint {endpoint_name} ...")
    ml_client.serverless_endpoints.begin_delete(endpoint_name).result()
    return f"serverless endpoint {endpoint_name}: deleted; the fine-tuned model stays registered (redeploy any time)"


def cleanup(confirm):
    """cleanup.py on the serverless road: delete the endpoint (after `confirm`) and say what is still billed."""
    config.require(*config.SERVERLESS_DEPLOY_SETTINGS)
    ml_client = get_ml_client()
    with azure_errors():
        print(f"  - {delete_serverless_endpoint(ml_client, config.SERVERLESS_ENDPOINT_NAME, confirm)}")
    print(f"Still in your subscription: project {config.AZURE_ML_WORKSPACE_NAME} with its hub's storage (small monthly "
          f"fees). Remove everything: az group delete --name {config.AZURE_RESOURCE_GROUP_NAME}")
    return 0
