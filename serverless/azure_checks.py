"""Prerequisites of the serverless road and Azure's refusals of it, each as one sentence that says what to do."""

import contextlib
import logging
import sys

import config
from helpers.errors import StepError


def note_experimental():
    """One line instead of azure-ai-ml's notice for every experimental class and method this road touches (~10)."""
    logging.getLogger("azure.ai.ml._utils._experimental").setLevel(logging.ERROR)
    print("Note: azure-ai-ml 1.35 marks serverless fine-tuning and ServerlessEndpoint experimental (they may change).",
          file=sys.stderr)


def check_region(ml_client):
    """The workspace, once its region is one of SERVERLESS_REGIONS (where serverless fine-tuning of Phi runs)."""
    workspace = ml_client.workspaces.get(config.AZURE_ML_WORKSPACE_NAME)
    region = (workspace.location or "").replace(" ", "").lower()
    if config.SERVERLESS_REGIONS and region not in config.SERVERLESS_REGIONS:
        raise StepError(f"Workspace {config.AZURE_ML_WORKSPACE_NAME} is in {workspace.location}, and serverless fine-tuning "
                        f"of {config.SERVERLESS_BASE_MODEL} runs in {', '.join(config.SERVERLESS_REGIONS)}: create a "
                        "hub-based project there (docs/serverless.md) and set AZURE_ML_WORKSPACE_NAME to it.")
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

