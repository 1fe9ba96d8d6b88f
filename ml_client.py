"""Connecting to the Azure ML workspace, shared by setup_ml.py, deploy_model.py and cleanup.py.

`get_ml_client()` checks the settings first (no network until they are filled in), then signs in with
the Azure CLI's login. `azure_errors()` turns the usual sign-in and permission failures into one sentence
that says what to do.
"""

import contextlib
import sys

import config


def get_ml_client():
    """An MLClient for the workspace in config.py, signed in with `az login`."""
    config.require(*config.AZURE_WORKSPACE_SETTINGS)
    from azure.ai.ml import MLClient
    from azure.identity import AzureCliCredential

    return MLClient(
        credential=AzureCliCredential(),
        subscription_id=config.AZURE_SUBSCRIPTION_ID,
        resource_group_name=config.AZURE_RESOURCE_GROUP_NAME,
        workspace_name=config.AZURE_ML_WORKSPACE_NAME,
    )


class StepError(RuntimeError):
    """A step's failure (Azure or local) explained in one sentence; the step exits non-zero with it."""


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


def exit_with(error):
    """Print a step's error the same way everywhere; returns the exit code."""
    print(f"error: {error}", file=sys.stderr)
    return 1
