"""The serverless road (TARGET=serverless): Azure AI Foundry fine-tunes a catalogue Phi and hosts it, billed per token.

    TARGET=serverless python download_dataset.py         # step 1 also writes data/{train,test}_chat.jsonl
    TARGET=serverless python setup_ml.py [--dry-run]     # step 2: submit_finetuning() / dry_run_finetuning()
    TARGET=serverless python deploy_model.py [--dry-run] # step 3: deploy_serverless() / dry_run_deploy()
    TARGET=serverless python cleanup.py                  # deletes the serverless endpoint (asks first)

Step 2 builds the job with azure-ai-ml's `create_finetuning_job` (experimental in 1.35): task chat completion,
the model's registry id, the chat-completions JSONL of step 1 (uploaded on submit), the hyperparameters of
config.py, and no compute (that is what makes it serverless). It polls the job's status until it ends and
records the job and the model it registered in outputs/last_job.json. Step 3 deploys that model as a
`ServerlessEndpoint` (never deleting one that exists), asks it one question, then writes its chat-completions
URL and key to .env (mode 600), where the flow reads them. Missing settings stop a step before any network
call; Azure's usual refusals of this road (region, provider registration, role, quota) become one sentence.
"""

import contextlib
import logging
import sys
import time

import requests

import config
from azure_ml import (azure_errors, check_name, get_ml_client, get_registry_client, print_validated, state_name,
                      validate_rest_entity, wait_with_progress)
from job_record import UNFINISHED, find_job, read_last_job, record_job
from safe_write import update_env_file
from step_errors import StepError

SMOKE_QUESTION = "Who founded Microsoft?"
SMOKE_TIMEOUT_S = (10, 120)  # connect, read: a serverless endpoint answers in seconds once it is up
CHAT_COMPLETIONS_PATH = "/v1/chat/completions"  # appended to the endpoint's scoring URI (Azure's own samples)


# --- Step 2: the fine-tuning job ------------------------------------------------------------------------
def base_model_id(registry_client=None):
    """The catalogue model's registry id with its version (SERVERLESS_BASE_MODEL_VERSION, else "latest" looked up)."""
    registry_id = config.SERVERLESS_MODELS[config.SERVERLESS_BASE_MODEL]
    if config.SERVERLESS_BASE_MODEL_VERSION:
        return f"{registry_id}/versions/{config.SERVERLESS_BASE_MODEL_VERSION}"
    if registry_client is None:  # the dry run: Azure resolves the label when the job starts
        return f"{registry_id}/labels/latest"
    return registry_client.models.get(config.SERVERLESS_BASE_MODEL, label="latest").id


def create_serverless_finetuning_job(model_id, job_name):
    """The chat-completion fine-tuning job; without a compute Azure runs it serverless."""
    from azure.ai.ml.finetuning import FineTuningTaskType, create_finetuning_job

    return create_finetuning_job(
        task=FineTuningTaskType.CHAT_COMPLETION,
        model=model_id,
        training_data=str(config.CHAT_TRAIN_DATA_PATH),  # local files: uploaded by jobs.create_or_update
        validation_data=str(config.CHAT_TEST_DATA_PATH),
        hyperparameters={  # strings, as the service takes them
            "num_train_epochs": str(config.SERVERLESS_EPOCHS),
            "learning_rate": str(config.SERVERLESS_LEARNING_RATE),
            "per_device_train_batch_size": str(config.SERVERLESS_BATCH_SIZE),
        },
        output_model_name_prefix=config.SERVERLESS_MODEL_PREFIX,
        name=job_name,
        display_name=job_name,
        experiment_name=config.AZURE_EXPERIMENT_NAME,
        tags={"road": "serverless", "base_model": config.SERVERLESS_BASE_MODEL},
    )


def submit_finetuning(job_name):
    """Check the region, submit the job, follow its status, record it and the model it registered."""
    ml_client = get_ml_client()
    with azure_errors(), serverless_refusals():
        workspace = check_region(ml_client)
        model_id = base_model_id(get_registry_client("azureml"))
        print(f"Fine-tuning {model_id} serverless in {workspace.location} ({config.SERVERLESS_EPOCHS} epochs, "
              f"learning rate {config.SERVERLESS_LEARNING_RATE}, batch size {config.SERVERLESS_BATCH_SIZE}) ...")
        job = ml_client.jobs.create_or_update(create_serverless_finetuning_job(model_id, job_name))
        details = {"studio_url": job.studio_url, "workspace": config.AZURE_ML_WORKSPACE_NAME, "base_model": model_id}
        record_job(job.name, "serverless", state_name(job.status), **details)
        print(f"Submitted job {job.name}\nStudio: {job.studio_url}")
        try:
            status = follow_status(ml_client, job.name)
        except KeyboardInterrupt:
            record_job(job.name, "serverless", "Running", **details)
            print(f"\nStopped following. The job keeps running (and billing) in Azure; cancel it with\n  az ml job cancel "
                  f"--name {job.name} --workspace-name {config.AZURE_ML_WORKSPACE_NAME} --resource-group "
                  f"{config.AZURE_RESOURCE_GROUP_NAME}\nor, once it has completed, run `python deploy_model.py`.")
            return 130
        if status != "Completed":
            record_job(job.name, "serverless", status, **details)
            reason = refusal(failure_text(ml_client, job.name))
            print(f"Job {job.name} ended with status {status}. " + (reason or "Open the studio link above for its reason."),
                  file=sys.stderr)
            return 1
        model = registered_model(ml_client, job.name)
        record_job(job.name, "serverless", status, registered_model=model, **details)
    print(f"Job {job.name} completed: model {model['name']} version {model['version']}. Next: python deploy_model.py")
    return 0


def follow_status(ml_client, job_name):
    """Print the job's status whenever it changes, asking every SERVERLESS_POLL_SECONDS; returns how it ended."""
    started, last = time.monotonic(), None
    while True:
        status = state_name(ml_client.jobs.get(job_name).status)
        if status != last:
            print(f"  {time.monotonic() - started:6.0f} s  {status}", flush=True)
            last = status
        if status not in UNFINISHED:
            return status
        time.sleep(config.SERVERLESS_POLL_SECONDS)


def failure_text(ml_client, job_name):
    """What Azure says about a job that did not complete (its error, if the job carries one)."""
    error = getattr(ml_client.jobs.get(job_name), "error", None)
    return str(error or "")


def registered_model(ml_client, job_name):
    """{"name", "version"} of the model the job registered (its `registered_model` output)."""
    from azure.core.exceptions import ResourceNotFoundError

    output = (ml_client.jobs.get(job_name).outputs or {}).get("registered_model")
    name = (output.get("name") if isinstance(output, dict) else getattr(output, "name", None)) or config.SERVERLESS_MODEL_PREFIX
    try:
        model = ml_client.models.get(name, label="latest")
    except ResourceNotFoundError:
        raise StepError(f"Job {job_name} completed, but the workspace has no model {name}: open the job in the studio; "
                        "its Outputs tab names the model it registered.") from None
    return {"name": model.name, "version": str(model.version)}


def dry_run_finetuning(job_name):
    """Build the fine-tuning job, validate it with azure-ai-ml's schema, print it; no network."""
    from azure.ai.ml import load_job

    print_validated([("Serverless fine-tuning job", create_serverless_finetuning_job(base_model_id(), job_name),
                      load_job)])
    print("Dry run: nothing was submitted.")
    return 0


def check_chat_data_files():
    """Stop early, with the command to run, when step 1 has not written the chat-completions files."""
    missing = [config.shown(p) for p in (config.CHAT_TRAIN_DATA_PATH, config.CHAT_TEST_DATA_PATH) if not p.is_file()]
    if missing:
        raise StepError(f"{', '.join(missing)} not found: run `TARGET=serverless python download_dataset.py` first.")


def finetune(job_name, dry_run):
    """Step 2 on the serverless road."""
    config.require(*config.SERVERLESS_SETTINGS)
    note_experimental()
    check_chat_data_files()
    return dry_run_finetuning(job_name) if dry_run else submit_finetuning(job_name)


# --- Step 3: the serverless endpoint --------------------------------------------------------------------
def build_serverless_endpoint(endpoint_name, model_id, job_name):
    """The ServerlessEndpoint entity: key-authenticated, serving the fine-tuned model."""
    from azure.ai.ml.entities import ServerlessEndpoint

    return ServerlessEndpoint(name=endpoint_name, model_id=model_id, auth_mode="key",
                              description=f"Phi fine-tuned serverless by job {job_name}", tags={"job_name": job_name})


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
    """The URL the flow posts to: the endpoint's scoring URI plus /v1/chat/completions."""
    return scoring_uri.rstrip("/") + CHAT_COMPLETIONS_PATH


def smoke_test(url, key):
    """Ask the endpoint one question in the chat-completions contract; its answer, or a StepError without the key."""
    body = {"messages": [{"role": "user", "content": SMOKE_QUESTION}], "max_tokens": 64, "temperature": 0}
    try:
        response = requests.post(url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=SMOKE_TIMEOUT_S)
    except requests.RequestException as error:
        raise StepError(f"The serverless endpoint at {url} did not answer ({type(error).__name__}).") from None
    try:
        answer = response.json()["choices"][0]["message"]["content"] if response.status_code == 200 else None
    except (ValueError, KeyError, IndexError, TypeError):
        answer = None
    if not isinstance(answer, str):
        text = response.text.replace(key, "<key>")[:300]
        raise StepError(f"The smoke request to {url} got HTTP {response.status_code} outside the contract: {text}")
    return answer


def deploy_serverless(job_name):
    """Step 3 on the serverless road: endpoint, smoke request, then URL and key into .env."""
    record = find_job(job_name, "serverless")
    job_name, model = record["name"], record.get("registered_model")
    ml_client = get_ml_client()
    endpoint_name = config.SERVERLESS_ENDPOINT_NAME
    with azure_errors(), serverless_refusals():
        model = model or registered_model(ml_client, job_name)
        workspace = check_region(ml_client)
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
    update_env_file(config.ENV_FILE, {"AZURE_ML_ENDPOINT": url, "AZURE_ML_API_KEY": key})
    print(f"Serverless endpoint {endpoint_name}: {url}")
    print(f"Wrote AZURE_ML_ENDPOINT and AZURE_ML_API_KEY to {config.shown(config.ENV_FILE)} (readable by you only).")
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


def deploy(job_name, dry_run):
    """Step 3 on the serverless road."""
    config.require(*config.SERVERLESS_DEPLOY_SETTINGS)
    check_name(config.SERVERLESS_ENDPOINT_NAME, "SERVERLESS_ENDPOINT_NAME", 32, "serverless endpoint")
    note_experimental()
    if dry_run:
        return dry_run_deploy(job_name or (read_last_job() or {}).get("name") or "<job-name>")
    return deploy_serverless(job_name)


def note_experimental():
    """One line instead of azure-ai-ml's notice for every experimental class and method this road touches (~10)."""
    logging.getLogger("azure.ai.ml._utils._experimental").setLevel(logging.ERROR)
    print("Note: azure-ai-ml 1.35 marks serverless fine-tuning and ServerlessEndpoint experimental (they may change).",
          file=sys.stderr)


# --- Prerequisites and Azure's refusals, as one sentence each ------------------------------------------------
def check_region(ml_client):
    """The workspace, once its region is one of SERVERLESS_REGIONS (where serverless fine-tuning of Phi runs)."""
    workspace = ml_client.workspaces.get(config.AZURE_ML_WORKSPACE_NAME)
    region = (workspace.location or "").replace(" ", "").lower()
    if config.SERVERLESS_REGIONS and region not in config.SERVERLESS_REGIONS:
        raise StepError(f"Workspace {config.AZURE_ML_WORKSPACE_NAME} is in {workspace.location}, and serverless fine-tuning "
                        f"of {config.SERVERLESS_BASE_MODEL} runs in {', '.join(config.SERVERLESS_REGIONS)}: create a "
                        "hub-based project there (README, the serverless road) and set AZURE_ML_WORKSPACE_NAME to it.")
    return workspace


def refusal(text):
    """Azure's usual refusal of this road in `text`, as one sentence that says what to do; None for others."""
    low = text.lower()
    scope = f"/subscriptions/{config.AZURE_SUBSCRIPTION_ID}/resourceGroups/{config.AZURE_RESOURCE_GROUP_NAME}"
    if "microsoft.network" in low or "missingsubscriptionregistration" in low or "not registered to use" in low:
        return ("The subscription has not registered the Microsoft.Network resource provider: run `az provider register "
                "--namespace Microsoft.Network`, wait until `az provider show -n Microsoft.Network --query "
                "registrationState` says Registered, then run the step again.")
    if "authorizationfailed" in low or "does not have authorization" in low or "forbidden" in low:
        return ("Azure refused the permission: ask for the Azure AI Developer role on the resource group "
                f"(`az role assignment create --assignee <your-sign-in> --role \"Azure AI Developer\" --scope {scope}`), "
                "then run the step again.")
    if "quota" in low:
        return ("Azure refused for quota (one serverless deployment per model per project; fine-tuning jobs per "
                "region): delete an endpoint you no longer use (`TARGET=serverless python cleanup.py`) or ask for more "
                "in the Azure portal (Quotas), then run the step again.")
    if ("region" in low or "location" in low) and ("not supported" in low or "not available" in low):
        return (f"{config.SERVERLESS_BASE_MODEL} is not offered serverless in this project's region: create a hub-based "
                "project in East US 2 and set AZURE_ML_WORKSPACE_NAME to it.")
    if "pay-as-you-go" in low or "free trial" in low or "subscription type" in low:
        return ("Serverless fine-tuning needs a pay-as-you-go subscription (free and trial ones are refused): set "
                "AZURE_SUBSCRIPTION_ID to one.")
    return None


@contextlib.contextmanager
def serverless_refusals():
    """Turn Azure's refusals of this road (HttpResponseError) into StepError with the one thing to do."""
    from azure.core.exceptions import HttpResponseError

    try:
        yield
    except HttpResponseError as error:
        sentence = refusal(f"{getattr(error, 'error', '') or ''} {error}")
        if sentence is None:
            raise
        raise StepError(sentence) from None
