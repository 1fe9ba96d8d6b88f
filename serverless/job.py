"""Step 2 on the serverless road: Azure AI Foundry fine-tunes a catalogue Phi, no cluster of yours.

    TARGET=serverless python setup_ml.py [--dry-run]     # finetune(): submit_finetuning() / dry_run_finetuning()

The job is azure-ai-ml's `create_finetuning_job` (experimental in 1.35): task chat completion, the model's
registry id, the chat-completions JSONL of step 1 (uploaded on submit), the hyperparameters of config.py, and
no compute (that is what makes it serverless). Step 2 polls its status until it ends and records the job and
the model it registered in outputs/last_job.json, where step 3 finds them.
"""

import sys
import time

import config
from helpers.azure_ml import azure_errors, get_ml_client, get_registry_client, print_validated, state_name
from helpers.errors import StepError
from helpers.job_record import UNFINISHED, follow_azure_job, record_job
from helpers import preflight
from serverless.azure_checks import check_base_model, note_experimental, refusal, serverless_refusals


def base_model_id(model=None):
    """The catalogue model's registry id with its version: the registry's answer, else (the dry run) what was set."""
    if model is not None:
        return model.id
    registry_id = config.SERVERLESS_MODELS[config.SERVERLESS_BASE_MODEL]
    if config.SERVERLESS_BASE_MODEL_VERSION:
        return f"{registry_id}/versions/{config.SERVERLESS_BASE_MODEL_VERSION}"
    return f"{registry_id}/labels/latest"  # the dry run: Azure resolves the label when the job starts


def base_model_check():
    """The preflight's question for this road: is SERVERLESS_BASE_MODEL live in the azureml registry, and offered in
    the project's region (its tags)?"""
    registry_client = get_registry_client("azureml")
    return lambda region, state: check_base_model(registry_client, region, state)


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
    """The preflight, then submit the job, follow its status, record it and the model it registered."""
    ml_client = get_ml_client()
    with azure_errors(), serverless_refusals():
        facts = preflight.before_serverless_training(ml_client, base_model_check())  # nothing billed before
        workspace, model_id = facts["workspace"], base_model_id(facts["base_model"])
        print(f"Fine-tuning {model_id} serverless in {workspace.location} ({config.SERVERLESS_EPOCHS} epochs, "
              f"learning rate {config.SERVERLESS_LEARNING_RATE}, batch size {config.SERVERLESS_BATCH_SIZE}) ...")
        job = ml_client.jobs.create_or_update(create_serverless_finetuning_job(model_id, job_name))
        details = {"studio_url": job.studio_url, "workspace": config.AZURE_ML_WORKSPACE_NAME, "base_model": model_id}
        status, failure = follow_azure_job(job, "serverless", lambda: follow_status(ml_client, job.name), **details)
        if status is None:  # Ctrl+C: the job goes on in Azure
            return 130
        if status != "Completed":
            reason = refusal(failure)
            print(f"Job {job.name} ended with status {status}. " + (reason or "Open the studio link above for its reason."),
                  file=sys.stderr)
            return 1
        model = registered_model(ml_client, job.name)
        record_job(job.name, "serverless", status, registered_model=model, **details)
    print(f"Job {job.name} completed: model {model['name']} version {model['version']}. Next: python deploy_model.py")
    return 0


def follow_status(ml_client, job_name):
    """Print the job's status whenever it changes, asking every SERVERLESS_POLL_SECONDS; returns (how it ended,
    Azure's words on a failure)."""
    started, last = time.monotonic(), None
    while True:
        status = state_name(ml_client.jobs.get(job_name).status)
        if status != last:
            print(f"  {time.monotonic() - started:6.0f} s  {status}", flush=True)
            last = status
        if status not in UNFINISHED:
            return status, "" if status == "Completed" else failure_text(ml_client, job_name)
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


def finetune(job_name, dry_run, check=False):
    """Step 2 on the serverless road (check: the preflight only)."""
    config.require(*config.AZURE_WORKSPACE_SETTINGS)  # a project is a workspace
    note_experimental()
    if check:
        with azure_errors(), serverless_refusals():
            preflight.before_serverless_training(get_ml_client(), base_model_check())
        print("Preflight passed: nothing was submitted.")
        return 0
    check_chat_data_files()
    return dry_run_finetuning(job_name) if dry_run else submit_finetuning(job_name)

