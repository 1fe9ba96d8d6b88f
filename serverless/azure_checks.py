"""The serverless road's facts read from Azure (the base model's registry tags) and Azure's refusals as sentences."""

import contextlib
import logging
import re
import sys
from datetime import date

import config
from helpers.errors import StepError


def note_experimental():
    """One line instead of azure-ai-ml's notice for every experimental class and method this road touches (~10)."""
    logging.getLogger("azure.ai.ml._utils._experimental").setLevel(logging.ERROR)
    print("Note: azure-ai-ml 1.35 marks serverless fine-tuning and ServerlessEndpoint experimental (they may change).",
          file=sys.stderr)


# The azureml registry's model tags (Azure/azureml-assets, assets/models/system/<model>/spec.yaml) say what Azure offers.
RETIREMENT_TAGS = ("FinetuneRetirementDate", "InferenceRetirementDate")  # past: the model is retired for this road
REGIONS_TAG = "maas-finetuning-deploy-regions"  # where it fine-tunes and deploys serverless (Microsoft's own samples read it)


def region_key(region):
    """A region as both sides can be compared: "East US 2" and "eastus2" are the same."""
    return re.sub(r"[^a-z0-9]", "", str(region).lower())


def tag_regions(tags):
    """The regions of the model's maas-finetuning-deploy-regions tag (a list, or text like "[eastus2, westus3]")."""
    value = (tags or {}).get(REGIONS_TAG) or ""
    items = value if isinstance(value, (list, tuple)) else re.split(r"[,;]", str(value).strip("[]"))
    return tuple(region_key(item.strip().strip("'\"")) for item in items if item.strip().strip("'\""))


def retired_on(tags):
    """The first of the model's retirement dates that has passed, or None."""
    for name in RETIREMENT_TAGS:
        value = str((tags or {}).get(name) or "")[:10]
        if value and date.fromisoformat(value) <= date.today():
            return value
    return None


def use_instead():
    """The sentence that names the model to use instead of a retired one."""
    return (f"set SERVERLESS_BASE_MODEL={config.SERVERLESS_DEFAULT_MODEL} in .env (the current Phi that Azure "
            "fine-tunes serverless) and run the step again")


def registry_model(registry_client):
    """SERVERLESS_BASE_MODEL as the azureml registry lists it: the pinned version, else the one labelled latest."""
    from azure.ai.ml.exceptions import ValidationException
    from azure.core.exceptions import ResourceNotFoundError

    name = config.SERVERLESS_BASE_MODEL
    try:
        if config.SERVERLESS_BASE_MODEL_VERSION:
            return registry_client.models.get(name, version=config.SERVERLESS_BASE_MODEL_VERSION)
        return registry_client.models.get(name, label="latest")
    except (ResourceNotFoundError, ValidationException):  # the label "latest" finds no listed version: archived
        other = "" if name == config.SERVERLESS_DEFAULT_MODEL else f": {use_instead()}"
        raise StepError(f"The azureml registry no longer lists {name}"
                        f"{' version ' + config.SERVERLESS_BASE_MODEL_VERSION if config.SERVERLESS_BASE_MODEL_VERSION else ''}"
                        f" (archived or retired){other}.") from None


def check_base_model(registry_client, workspace_region, state):
    """The base model live in the registry (not retired) and offered in the workspace's region; kept in state."""
    model = registry_model(registry_client)
    state["base_model"] = model
    tags = model.tags or {}
    retired = retired_on(tags)
    if retired:
        raise StepError(f"{model.name} was retired for serverless fine-tuning on {retired} (the azureml registry's "
                        f"model tags): {use_instead()}.")
    regions = tag_regions(tags)
    if config.SERVERLESS_REGIONS:  # the user's own narrowing, on top of Azure's list
        regions = tuple(region for region in regions if region in config.SERVERLESS_REGIONS) if regions else config.SERVERLESS_REGIONS
    if regions and region_key(workspace_region) not in regions:
        raise StepError(f"Workspace {config.AZURE_ML_WORKSPACE_NAME} is in {workspace_region}, and {model.name} fine-tunes "
                        f"serverless in {', '.join(regions)}: create a hub-based project in one of them "
                        "(docs/serverless.md) and set AZURE_ML_WORKSPACE_NAME to it.")
    where = f"offered in {workspace_region}" if regions else f"the registry lists no regions for it ({REGIONS_TAG})"
    return f"{model.name} version {model.version} live; {where}"


def refusal(text):
    """Azure's usual refusal of this road in `text`, as one sentence that says what to do; None for others."""
    low = text.lower()
    scope = f"/subscriptions/{config.AZURE_SUBSCRIPTION_ID}"
    if "microsoft.network" in low or "missingsubscriptionregistration" in low or "not registered to use" in low:
        return ("The subscription has not registered the Microsoft.Network resource provider: run `az provider register "
                "--namespace Microsoft.Network`, wait until `az provider show -n Microsoft.Network --query "
                "registrationState` says Registered, then run the step again.")
    if "authorizationfailed" in low or "does not have authorization" in low or "forbidden" in low:
        return ("Azure refused the permission: serverless fine-tuning needs Owner or Contributor on the subscription "
                f"(`az role assignment create --assignee <your-sign-in> --role Contributor --scope {scope}`), "
                "then run the step again.")
    if "quota" in low:
        return ("Azure refused for quota (one serverless deployment per model per project; fine-tuning jobs per "
                "region): delete an endpoint you no longer use (`TARGET=serverless python cleanup.py`) or ask for more "
                "in the Azure portal (Quotas), then run the step again.")
    if ("region" in low or "location" in low) and ("not supported" in low or "not available" in low):
        return (f"{config.SERVERLESS_BASE_MODEL} is not offered serverless in this project's region: create a hub-based "
                f"project in a region its registry entry lists (`TARGET=serverless python setup_ml.py --check` names "
                "them) and set AZURE_ML_WORKSPACE_NAME to it.")
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

