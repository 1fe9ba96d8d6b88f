"""Azure Machine Learning plumbing shared by setup_ml.py, deploy_model.py and cleanup.py.

- `get_ml_client()`: the tutorial's client; checks the settings first (no network until they are filled in),
  then signs in with the Azure CLI's login.
- `azure_errors()`: the usual sign-in and permission failures as one sentence that says what to do.
- `validate(...)` / `yaml_of(...)`: offline checks of entities with azure-ai-ml's own schemas (dump -> load_*),
  for the steps' --dry-run.
- `wait_with_progress(...)`, `print_job_log_tail(...)`, `print_deployment_log_tail(...)`: waiting and logs.
"""

import contextlib
import copy
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import config
from step_errors import StepError, print_tail

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
    from azure.core.exceptions import ClientAuthenticationError, HttpResponseError
    from azure.identity import CredentialUnavailableError

    try:
        yield
    except CredentialUnavailableError:
        raise StepError("Not signed in to Azure: run `az login` (or `az login --use-device-code`) and try again.") from None
    except ClientAuthenticationError as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise StepError(
            f"Azure refused the sign-in or the permission ({message}). Run `az login`, check that "
            f"AZURE_SUBSCRIPTION_ID is the subscription of {config.AZURE_ML_WORKSPACE_NAME}, and that you have access."
        ) from None
    except HttpResponseError as error:  # after ClientAuthenticationError, its subclass
        if error.status_code != 403:
            raise
        message = str(error).splitlines()[0] if str(error) else "403 Forbidden"
        raise StepError(
            f"Azure refused the permission ({message}). Ask for a role on workspace {config.AZURE_ML_WORKSPACE_NAME} "
            "(Contributor or AzureML Data Scientist), or `az login` with an account that has one."
        ) from None


# --- Offline validation (--dry-run) -----------------------------------------------------------------
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


def yaml_of(entity):
    """An entity as the YAML azure-ai-ml would write for it."""
    buffer = io.StringIO()
    entity.dump(buffer)
    return buffer.getvalue()


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


def print_job_log_tail(ml_client, job_name):
    """Download a job's logs and print the last lines of its standard output."""
    with tempfile.TemporaryDirectory() as folder:
        try:
            ml_client.jobs.download(job_name, download_path=folder, all=True)
        except Exception as error:  # noqa: BLE001 - the job already failed; this is only extra detail
            print(f"(could not download the job's logs: {type(error).__name__}; open the studio link above)", file=sys.stderr)
            return
        logs = sorted(Path(folder).rglob("std_log*.txt"))
        if not logs:
            print("(no std_log.txt found in the job's logs; open the studio link above)")
            return
        print_tail(logs[-1].read_text(encoding="utf-8", errors="replace").splitlines(), logs[-1].name)


def print_deployment_log_tail(ml_client, endpoint_name, deployment_name):
    """The last lines of a deployment's container log (where score.py's errors land)."""
    try:
        logs = ml_client.online_deployments.get_logs(name=deployment_name, endpoint_name=endpoint_name, lines=50)
    except Exception as error:  # noqa: BLE001 - the deployment already failed; this is only extra detail
        print(f"(could not fetch the deployment's logs: {type(error).__name__})", file=sys.stderr)
        return
    print_tail(logs.splitlines(), f"deployment {deployment_name}'s log")
