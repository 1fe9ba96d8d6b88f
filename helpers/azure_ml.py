"""Azure Machine Learning plumbing shared by setup_ml.py, deploy_model.py, cleanup.py and serverless/.

- `get_ml_client()`: the tutorial's client; checks the settings first (no network until they are filled in),
  then signs in with the Azure CLI's login. `get_registry_client(...)`: the same for a registry (the catalogue).
- `azure_errors()`: the usual sign-in and permission failures as one sentence that says what to do.
- `check_name(...)`: Azure's naming rules, checked before any call (the SDK checks some only when it sends).
- `validate(...)`, `validate_rest_entity(...)`: offline checks of entities with azure-ai-ml's own schemas
  (dump -> load_*), for --dry-run.
- `wait_with_progress(...)`, `print_job_log_tail(...)`, `print_deployment_log_tail(...)`: waiting and logs.
- `state_name(...)`: Azure's word for a status.
"""

import contextlib
import copy
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import config
from helpers.errors import StepError, print_tail

PROGRESS_EVERY_S = 30


def get_ml_client():
    """An MLClient for the workspace in config.py, signed in with `az login` (the tutorial's AzureCliCredential)."""
    config.require(*config.AZURE_WORKSPACE_SETTINGS)
    from azure.ai.ml import MLClient
    from azure.identity import AzureCliCredential

    return MLClient(
        credential=AzureCliCredential(),
        subscription_id=config.AZURE_SUBSCRIPTION_ID,
        resource_group_name=config.AZURE_RESOURCE_GROUP_NAME,
        workspace_name=config.AZURE_ML_WORKSPACE_NAME,
    )


@contextlib.contextmanager
def azure_errors():
    """Translate sign-in and permission failures into StepError with the next thing to do."""
    from azure.core.exceptions import (ClientAuthenticationError, HttpResponseError, ServiceRequestError,
                                       ServiceResponseError)
    from azure.identity import CredentialUnavailableError

    from azure.ai.ml.exceptions import MlException

    try:
        yield
    except MlException as error:  # the SDK refused the request before sending it (ValidationException, ...)
        raise StepError(f"azure-ai-ml refused the request: {first_line(error)}") from None
    except CredentialUnavailableError:
        raise StepError("Not signed in to Azure: run `az login` (or `az login --use-device-code`) and try again.") from None
    except ClientAuthenticationError as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise StepError(
            f"Azure refused the sign-in or the permission ({message}). Run `az login`, check that "
            f"AZURE_SUBSCRIPTION_ID is the subscription of {config.AZURE_ML_WORKSPACE_NAME}, and that you have access."
        ) from None
    except (ServiceRequestError, ServiceResponseError) as error:  # DNS, TLS, a dropped connection, a timeout
        raise StepError(f"Could not reach Azure ({type(error).__name__}: {first_line(error)}). Check your network "
                        "(and proxy settings) and run the step again.") from None
    except HttpResponseError as error:  # after ClientAuthenticationError, its subclass
        text = str(error)
        if "already an endpoint with this name" in text or (error.status_code == 404 and "InferencingClientCallFailed" in text):
            # Names are unique per region across subscriptions; a name deleted minutes ago answers 404 for a while.
            raise StepError(f"The endpoint name {config.AZURE_ENDPOINT_NAME} is taken in this region (by anyone, or by "
                            "an endpoint deleted minutes ago): choose another AZURE_ENDPOINT_NAME in .env.") from None
        if error.status_code != 403:
            raise
        message = str(error).splitlines()[0] if str(error) else "403 Forbidden"
        raise StepError(
            f"Azure refused the permission ({message}). Ask for a role on workspace {config.AZURE_ML_WORKSPACE_NAME} "
            "(Contributor or AzureML Data Scientist), or `az login` with an account that has one."
        ) from None


def first_line(error):
    """The first line of an exception's message (Azure's messages run to dozens of lines)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# --- Names and offline validation (--dry-run) -------------------------------------------------------
# Online endpoints, deployments and AmlCompute clusters: 3-32 characters (24 is the compute-instance rule). A letter first, then letters, digits and
# hyphens, no hyphen last. Endpoint names are also unique per region across all subscriptions.
NAME_RULE = re.compile(r"[A-Za-z][A-Za-z0-9-]*[A-Za-z0-9]")


def check_name(value, setting, max_length, what):
    """StepError naming `setting` unless `value` follows Azure's naming rule for `what`."""
    if not (3 <= len(value) <= max_length and NAME_RULE.fullmatch(value)):
        raise StepError(f"{setting} gives the {what} name {value!r} ({len(value)} characters): Azure needs 3 to "
                        f"{max_length} characters, a letter first, then letters, digits and hyphens, and no hyphen "
                        f"last. Set {setting} in .env.")



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

    if hasattr(entity, "_to_job"):  # command() returns a pipeline node; _to_job() is the job jobs.create_or_update sends
        entity = entity._to_job()
    data = copy.deepcopy(entity).dump(path)
    if data is not None:  # ManagedOnlineEndpoint.dump() ignores `path` and returns the dict, with nulls
        Path(path).write_text(yaml.safe_dump(without_nulls(json.loads(json.dumps(data))), sort_keys=False))
    local = local_inputs(entity)
    if local:  # dump() writes a local file input as "azureml:/tmp/...", an asset name; the SDK uploads the file instead
        data = yaml.safe_load(Path(path).read_text())
        for keys, local_path in local.items():
            place = data
            for key in keys:
                place = place[key]
            place["path"] = local_path
        Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


def local_inputs(entity):
    """{YAML keys: local path} of a job's inputs that are files on this machine (uploaded when the job is sent): a
    command job's inputs, a fine-tuning job's training and validation data."""
    found = {("inputs", name): value for name, value in (getattr(entity, "inputs", None) or {}).items()}
    found.update({(key,): getattr(entity, key, None) for key in ("training_data", "validation_data")})
    return {keys: str(value.path) for keys, value in found.items()
            if isinstance(getattr(value, "path", None), str) and Path(value.path).is_absolute()
            and Path(value.path).exists()}


def validate(entity, loader, title):
    """Check an entity with azure-ai-ml's schema (dump -> load_*); returns its YAML. No network."""
    from marshmallow import ValidationError

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "entity.yml"
        try:  # dump() checks types and allowed values too, before the schema checks the YAML
            dump_yaml(entity, path)
            loader(path)
        except (ValidationError, ValueError) as error:
            raise StepError(f"The {title.lower()} does not validate: {getattr(error, 'messages', error)}") from None
        return path.read_text()


def validate_job_bindings(job):
    """The component check: every ${{inputs.x}} / ${{outputs.x}} of the command names a declared one."""
    result = job.component._validate()
    # Its naming rule (no hyphens) is for registered components only, not for job names: left out.
    problems = {path: message for path, message in result.error_messages.items() if path != "name"}
    if problems:
        raise StepError(f"The job does not validate: {problems}")


def print_validated(entities):
    """Validate [(title, entity, loader)] and print each as `--- title (validated) ---` and its YAML."""
    texts = [(title, validate(entity, loader, title)) for title, entity, loader in entities]
    for title, text in texts:
        print(f"--- {title} (validated) ---\n{text}")


# --- Waiting and logs -------------------------------------------------------------------------------
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


def rank_zero_first(path):
    """Sort key: std_log.txt, then std_log_process_0*.txt (rank 0 of a distributed job), then the others."""
    match = re.search(r"process_(\d+)", path.name)
    return (int(match[1]) if match else -1, path.name)


def print_job_log_tail(ml_client, job_name):
    """Download a job's logs (not its outputs: a model is gigabytes) and print rank 0's standard output's tail."""
    with tempfile.TemporaryDirectory() as folder:
        try:
            ml_client.jobs.download(job_name, download_path=folder, all=False)
        except Exception as error:  # noqa: BLE001 - the job already failed; this is only extra detail
            print(f"(could not download the job's logs: {type(error).__name__}; open the studio link above)", file=sys.stderr)
            return
        logs = sorted(Path(folder).rglob("std_log*.txt"), key=rank_zero_first)
        if not logs:
            print("(no std_log.txt found in the job's logs; open the studio link above)")
            return
        print_tail(logs[0].read_text(encoding="utf-8", errors="replace").splitlines(), logs[0].name)


def print_deployment_log_tail(ml_client, endpoint_name, deployment_name):
    """The last lines of a deployment's container log (where score.py's errors land)."""
    try:
        logs = ml_client.online_deployments.get_logs(name=deployment_name, endpoint_name=endpoint_name, lines=50)
    except Exception as error:  # noqa: BLE001 - the deployment already failed; this is only extra detail
        print(f"(could not fetch the deployment's logs: {type(error).__name__})", file=sys.stderr)
        return
    print_tail(logs.splitlines(), f"deployment {deployment_name}'s log")


# --- Azure's states and the model catalogue ---------------------------------------------------------------
def state_name(state):
    """Azure's word for a status: azure-ai-ml returns enums (str() of one gives 'JobStatus.FAILED'), or text."""
    return getattr(state, "value", state)


def get_registry_client(registry_name):
    """An MLClient for a registry (azureml: the model catalogue), signed in like get_ml_client()."""
    from azure.ai.ml import MLClient
    from azure.identity import AzureCliCredential

    return MLClient(credential=AzureCliCredential(), registry_name=registry_name)


def validate_rest_entity(entity, loader, title):
    """validate() for azure-ai-ml's REST-shaped entities (ServerlessEndpoint), which have no dump(): their fields as
    YAML -> load_* (which checks required fields and types); returns the YAML. No network."""
    import yaml
    from marshmallow import ValidationError

    text = yaml.safe_dump(without_nulls(json.loads(json.dumps(dict(entity)))), sort_keys=False)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "entity.yml"
        path.write_text(text)
        try:
            loader(path)
        except (ValidationError, ValueError) as error:
            raise StepError(f"The {title.lower()} does not validate: {getattr(error, 'messages', error)}") from None
    return text
