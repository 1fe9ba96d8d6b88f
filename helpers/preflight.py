"""The preflight: what Azure must allow before a step bills anything, asked of Azure, each answer printed.

    TARGET=azure python setup_ml.py --check         # step 2's checks, nothing submitted
    TARGET=azure python deploy_model.py --check     # step 3's checks, nothing deployed
    TARGET=serverless python setup_ml.py --check    # the serverless road's

Steps 2 and 3 run the same checks before their first billable call (`before_training(...)`, ...). Each check prints
one line; a failed one says, in one sentence, the `az` command or portal page that fixes it, and the step stops
with them. What Azure does not let us check from here is printed as such, never passed silently.

| check          | asks Azure                                                                                  |
|----------------|---------------------------------------------------------------------------------------------|
| sign-in        | a token from `az login`, and the configured subscription (GET /subscriptions/{id})          |
| providers      | the resource providers the step needs are Registered (GET .../providers/{namespace})        |
| workspace      | the workspace (or project) exists, and its region                                            |
| quota          | the SKU family's vCPU quota in that region (compute.list_sizes + compute.list_usage)         |
| identity       | the endpoint's managed identity exists, has the configured client id, and its roles        |
| image          | a curated image pinned in config.py is still listed in the azureml registry                |
| base model     | serverless: the registry's model is not retired and lists the workspace's region            |
"""

import math
import re
from dataclasses import dataclass

import config
from helpers.azure_ml import get_registry_client
from helpers.errors import StepError

ARM_API_VERSION = {"subscription": "2022-12-01", "providers": "2021-04-01", "identity": "2023-01-31",
                   "roleAssignments": "2022-04-01"}
TRAINING_PROVIDERS = ("Microsoft.MachineLearningServices", "Microsoft.ContainerRegistry")
SERVERLESS_PROVIDERS = TRAINING_PROVIDERS + ("Microsoft.Network",)
# Managed online endpoints reserve quota for 20 % more instances than they run (for upgrades), rounded up to whole
# instances: one Standard_E4s_v3 (4 vCPUs) needs ceil(1 x 1.2) = 2 instances = 8 vCPUs; blue/green runs two slots.
DEPLOYMENT_QUOTA_HEADROOM = 1.2
# Built-in role ids (they are the same in every tenant) that let the endpoint's identity pull the image / read the model.
ACR_PULL_ROLES = {"7f951dda-4ed3-4680-a7ca-43fe172d538d": "AcrPull", "b24988ac-6180-42a0-ab88-20f7382dd24c": "Contributor",
                  "8e3af657-a8ff-443c-a75c-2fe8c4bcb635": "Owner"}
BLOB_READ_ROLES = {"2a2b9908-6ea1-4ae2-8e65-a410df84e7d1": "Storage Blob Data Reader",
                   "ba92f5b4-2d11-453d-a403-e96b0029c9fe": "Storage Blob Data Contributor",
                   "b7e6dc6d-f1e8-4753-8033-0f276bb0955b": "Storage Blob Data Owner"}
CURATED_IMAGE = re.compile(r"^mcr\.microsoft\.com/azureml/curated/(?P<name>[^:@]+):(?P<version>[^:@]+)$")


@dataclass
class Result:
    """One check's answer: ok True (passed), False (refused: `detail` says what to do) or None (cannot be checked)."""

    name: str
    ok: object
    detail: str

    def line(self):
        mark = {True: "ok  ", False: "FAIL", None: "n/a "}[self.ok]
        return f"  {mark}  {self.name}: {self.detail}"


class Refused(Exception):
    """Raised inside a check: the sentence that says what to do."""


class CannotCheck(Exception):
    """Raised inside a check: why Azure cannot tell us from here."""


# --- What each step checks ------------------------------------------------------------------------------------------
def before_training(ml_client):
    """Step 2 on Azure ML, before the job: every check printed; StepError if one refused."""
    return run(training_checks(ml_client), "step 2 on Azure ML")


def before_deployment(ml_client, image):
    """Step 3 on Azure ML, before the model is registered and the endpoint created; `image`: (its setting, value)."""
    return run(deployment_checks(ml_client, image), "step 3 on Azure ML")


def before_serverless_training(ml_client, base_model_check):
    """Step 2 on the serverless road, before the job; `base_model_check(region, state)` is the road's own
    (serverless/azure_checks.py). Returns {"workspace", "base_model"} as Azure listed them."""
    state = {}
    run(serverless_checks(ml_client, state, base_model_check), "step 2, serverless")
    return state


def before_serverless_deployment(ml_client):
    """Step 3 on the serverless road, before the endpoint; returns {"workspace"}."""
    state = {}
    run(serverless_checks(ml_client, state), "step 3, serverless")
    return state


def training_checks(ml_client):
    """Step 2 on Azure ML: sign-in, providers, workspace, the cluster SKU's quota, the training image."""
    state = {}
    return [("sign-in", lambda: signed_in(ml_client)),
            ("providers", lambda: providers_registered(ml_client, TRAINING_PROVIDERS)),
            ("workspace", lambda: workspace_found(ml_client, state)),
            ("training quota", lambda: quota(ml_client, config.AZURE_COMPUTE_INSTANCE_TYPE, training_vcpus,
                                             "AZURE_COMPUTE_INSTANCE_TYPE", low_priority=config.AZURE_COMPUTE_TIER == "low_priority",
                                             location=config.AZURE_COMPUTE_LOCATION or workspace_of(state).location)),
            ("training image", lambda: curated_image_listed(config.AZURE_TRAINING_IMAGE, "AZURE_TRAINING_IMAGE"))]


def deployment_checks(ml_client, image):
    """Step 3 on Azure ML: sign-in, providers, workspace, the deployment SKU's quota, the identity, the image
    (`image`: the setting that names it, and its value)."""
    state = {}
    return [("sign-in", lambda: signed_in(ml_client)),
            ("providers", lambda: providers_registered(ml_client, TRAINING_PROVIDERS)),
            ("workspace", lambda: workspace_found(ml_client, state)),
            ("deployment quota", lambda: quota(ml_client, config.AZURE_DEPLOYMENT_INSTANCE_TYPE,
                                               lambda vcpus: deployment_vcpus(vcpus, deployment_slots(ml_client)),
                                               "AZURE_DEPLOYMENT_INSTANCE_TYPE", location=workspace_of(state).location)),
            ("managed identity", lambda: identity_access(ml_client, state)),
            ("inference image", lambda: curated_image_listed(image[1], image[0]))]


def serverless_checks(ml_client, state, base_model_check=None):
    """The serverless road: sign-in, providers (Microsoft.Network too), the project; then, for step 2, the base
    model (live, and offered in the project's region)."""
    checks = [("sign-in", lambda: signed_in(ml_client)),
              ("providers", lambda: providers_registered(ml_client, SERVERLESS_PROVIDERS)),
              ("project", lambda: workspace_found(ml_client, state))]
    if base_model_check is not None:
        checks.append(("base model", lambda: base_model_check(workspace_of(state).location, state)))
    return checks


def workspace_of(state):
    """The workspace an earlier check found; a later check that needs it cannot run without it."""
    if "workspace" not in state:
        raise CannotCheck("needs the workspace, which was not found")
    return state["workspace"]


def run(checks, title):
    """Run every check, print each answer; StepError with the first refusal (and how many more) if any refused."""
    print(f"Preflight ({title}):")
    results = []
    for position, (name, check) in enumerate(checks):
        if position and results[0].ok is False:  # the sign-in gates every other question
            print(Result(name, None, "not asked: needs the sign-in").line())
            continue
        try:
            results.append(Result(name, True, check()))
        except Refused as refusal:
            results.append(Result(name, False, str(refusal)))
        except CannotCheck as reason:
            results.append(Result(name, None, str(reason)))
        except StepError as error:  # azure_errors() already made Azure's answer a sentence
            results.append(Result(name, False, str(error)))
        print(results[-1].line(), flush=True)
    refused = [result for result in results if result.ok is False]
    if refused:
        more = f" ({len(refused) - 1} more above)" if len(refused) > 1 else ""
        raise StepError(f"Preflight: {refused[0].detail}{more}")
    return results


def checked(checks, title):
    """--check: run the checks and return the exit code (0: nothing refused)."""
    run(checks, title)
    print("Preflight passed: nothing was submitted.")
    return 0


# --- The checks -----------------------------------------------------------------------------------------------------
def arm_get(ml_client, path, api_version):
    """GET an ARM path through azure-ai-ml's own pipeline (sign-in, retries, transport); returns (status, JSON)."""
    from azure.core.rest import HttpRequest

    # The SDK has no public call for subscriptions, providers or role assignments; azure-mgmt-resource would be a
    # dependency for three GETs. Its generated ARM client sends any request with the same credential.
    client = ml_client._service_client_10_2023  # noqa: SLF001
    response = client.send_request(HttpRequest("GET", f"https://management.azure.com{path}",
                                               params={"api-version": api_version}))
    try:
        body = response.json()
    except ValueError:
        body = {}
    return response.status_code, body


def signed_in(ml_client):
    """A token from the sign-in, and the subscription in AZURE_SUBSCRIPTION_ID visible and enabled."""
    from azure.core.exceptions import ClientAuthenticationError

    try:
        status, body = arm_get(ml_client, f"/subscriptions/{config.AZURE_SUBSCRIPTION_ID}",
                               ARM_API_VERSION["subscription"])
    except ClientAuthenticationError:
        raise Refused("Not signed in to Azure: run `az login` (or `az login --use-device-code`).") from None
    if status in (401, 403, 404):
        raise Refused(f"Your sign-in cannot see subscription {config.AZURE_SUBSCRIPTION_ID}: run `az account list -o "
                      "table`, then `az account set --subscription <id>` and set AZURE_SUBSCRIPTION_ID in .env to it.")
    if body.get("state", "Enabled") != "Enabled":
        raise Refused(f"Subscription {body.get('displayName', config.AZURE_SUBSCRIPTION_ID)} is {body['state']}: "
                      "re-enable it in the Azure portal (Subscriptions), or use another.")
    return f"subscription {body.get('displayName', config.AZURE_SUBSCRIPTION_ID)} ({config.AZURE_SUBSCRIPTION_ID})"


def providers_registered(ml_client, namespaces):
    """Each resource provider in `namespaces` Registered for the subscription."""
    missing = []
    for namespace in namespaces:
        status, body = arm_get(ml_client, f"/subscriptions/{config.AZURE_SUBSCRIPTION_ID}/providers/{namespace}",
                               ARM_API_VERSION["providers"])
        if status == 403:
            raise CannotCheck("your role may not read resource providers; "
                              f"`az provider show -n {namespace} --query registrationState` says")
        if body.get("registrationState") != "Registered":
            missing.append(namespace)
    if missing:
        commands = " and ".join(f"`az provider register --namespace {namespace}`" for namespace in missing)
        raise Refused(f"The subscription has not registered {', '.join(missing)}: run {commands}, and wait until "
                      f"`az provider show -n {missing[0]} --query registrationState` says Registered.")
    return ", ".join(namespaces) + " registered"


def workspace_found(ml_client, state):
    """The workspace (a serverless project is one) and its region, kept in state["workspace"] for later checks."""
    from azure.core.exceptions import ResourceNotFoundError

    try:
        workspace = ml_client.workspaces.get(config.AZURE_ML_WORKSPACE_NAME)
    except ResourceNotFoundError:
        raise Refused(f"No workspace {config.AZURE_ML_WORKSPACE_NAME} in resource group {config.AZURE_RESOURCE_GROUP_NAME}: "
                      f"`az ml workspace list -g {config.AZURE_RESOURCE_GROUP_NAME} -o table` lists them; set "
                      "AZURE_ML_WORKSPACE_NAME in .env (docs/azure-setup.md creates one).") from None
    state["workspace"] = workspace
    return f"{workspace.name} in {workspace.location}"


def training_vcpus(vcpus):
    """vCPUs the training job holds: every node of the cluster it runs on."""
    return config.INSTANCE_COUNT * vcpus


def deployment_slots(ml_client):
    """2 while blue/green runs the new slot beside one that serves (an endpoint with a deployment), else 1."""
    from azure.core.exceptions import ResourceNotFoundError

    try:
        endpoint = ml_client.online_endpoints.get(config.AZURE_ENDPOINT_NAME)
    except ResourceNotFoundError:
        return 1
    return 2 if any(endpoint.traffic or {}) else 1


def deployment_vcpus(vcpus, slots):
    """vCPUs a deployment reserves: instances (plus Azure's 20 %, whole instances) x vCPUs, for each slot running."""
    return math.ceil(config.AZURE_DEPLOYMENT_INSTANCE_COUNT * DEPLOYMENT_QUOTA_HEADROOM) * vcpus * slots


def field(entity, name, rest_name):
    """An attribute of a VmSize or Usage: azure-ai-ml 1.35 copies the REST body's camelCase keys (vCPUs, currentValue)
    onto these entities beside snake_case attributes it leaves None, so either may hold the value."""
    value = getattr(entity, name, None)
    return getattr(entity, rest_name, None) if value is None else value


def family_key(text):
    """A VM family as both APIs can be compared: vmSizes says standardNCADSA100v4Family, usages say
    "Standard NCADSA100v4 Family Cluster Dedicated vCPUs"."""
    return re.sub(r"[^a-z0-9]", "", text.lower())


def quota(ml_client, instance_type, vcpus_needed, setting, location, low_priority=False):
    """The SKU's family has the vCPUs free that `vcpus_needed(vcpus per VM)` says, in `location`."""
    sizes = {size.name.lower(): size for size in ml_client.compute.list_sizes(location=location)}
    size = sizes.get(instance_type.lower())
    where = location
    if size is None:
        raise Refused(f"{instance_type} is not offered to Azure ML in {where}: `az ml compute list-sizes -o table` "
                      f"lists what is; set {setting} in .env.")
    needed = vcpus_needed(field(size, "v_cp_us", "vCPUs"))
    kind = "LowPriority" if low_priority else "Dedicated"
    wanted = family_key(f"{size.family}Cluster{kind}vCPUs")
    usages = [usage for usage in ml_client.compute.list_usage(location=location)
              if str(usage.type or "").endswith("vmFamily/usages")]
    row = next((usage for usage in usages if family_key(usage.name["value"]) == wanted), None)
    if row is None:
        raise CannotCheck(f"Azure lists no {kind.lower()} quota for {size.family} in {where}")
    limit, used = row.limit, field(row, "current_value", "currentValue")
    if limit >= 0 and limit - used < needed:
        raise Refused(f"{row.name['value']} quota in {where}: {needed} vCPUs needed ({instance_type}), {limit - used} "
                      f"free of {limit}: request more in the Azure portal (Azure Machine Learning > Quotas > "
                      f"{row.name['value']}), or set {setting} to a SKU you have quota for.")
    return f"{needed} vCPUs of {row.name['value']} needed, {limit - used} free of {limit}"


def identity_access(ml_client, state):
    """The endpoint's user-assigned identity: it exists, has the configured client id, and may pull and read."""
    status, body = arm_get(ml_client, config.AZURE_MANAGED_IDENTITY_RESOURCE_ID, ARM_API_VERSION["identity"])
    if status == 404:
        raise Refused(f"No managed identity {config.AZURE_MANAGED_IDENTITY_NAME} in {config.AZURE_RESOURCE_GROUP_NAME}: "
                      f"run `az identity create -n {config.AZURE_MANAGED_IDENTITY_NAME} -g "
                      f"{config.AZURE_RESOURCE_GROUP_NAME}` (docs/azure-setup.md), or fix AZURE_MANAGED_IDENTITY_NAME.")
    if status == 403:
        raise CannotCheck("your role may not read the managed identity")
    properties = body.get("properties", {})
    if properties.get("clientId", "").lower() != config.AZURE_MANAGED_IDENTITY_CLIENT_ID.lower():
        raise Refused(f"Managed identity {config.AZURE_MANAGED_IDENTITY_NAME} has client id {properties.get('clientId')}: "
                      "set AZURE_MANAGED_IDENTITY_CLIENT_ID in .env to it (`az identity show -n "
                      f"{config.AZURE_MANAGED_IDENTITY_NAME} -g {config.AZURE_RESOURCE_GROUP_NAME} --query clientId`).")
    workspace = workspace_of(state)
    said = [f"{config.AZURE_MANAGED_IDENTITY_NAME} found"]
    for scope, roles, need, what in ((getattr(workspace, "container_registry", None), ACR_PULL_ROLES, "AcrPull",
                                      "the workspace's container registry"),
                                     (getattr(workspace, "storage_account", None), BLOB_READ_ROLES,
                                      "Storage Blob Data Reader", "the workspace's storage account")):
        said.append(role_on(ml_client, properties.get("principalId"), scope, roles, need, what))
    return "; ".join(said)


def role_on(ml_client, principal_id, scope, roles, need, what):
    """One of `roles` held by the identity on `scope` (assignments above the scope count); a sentence either way."""
    if not scope:
        return f"{what}: not created yet (Azure ML creates it on the first image build), not checked"
    status, body = arm_get(ml_client, f"{scope}/providers/Microsoft.Authorization/roleAssignments?"
                                      f"$filter=principalId eq '{principal_id}'", ARM_API_VERSION["roleAssignments"])
    if status == 403:
        return f"{what}: your role may not read role assignments, not checked"
    held = [roles[role] for role in (assignment.get("properties", {}).get("roleDefinitionId", "").rsplit("/", 1)[-1]
                                     for assignment in body.get("value", [])) if role in roles]
    if not held:
        raise Refused(f"Managed identity {config.AZURE_MANAGED_IDENTITY_NAME} has no {need} role on {what}: run `az role "
                      f"assignment create --assignee-object-id {principal_id} --assignee-principal-type "
                      f"ServicePrincipal --role \"{need}\" --scope {scope}`.")
    return f"{held[0]} on {what}"


def curated_image_listed(image, setting):
    """A curated image (mcr.microsoft.com/azureml/curated/<name>:<version>) still listed in the azureml registry."""
    from azure.ai.ml.exceptions import ValidationException
    from azure.core.exceptions import ResourceNotFoundError

    match = CURATED_IMAGE.match(image)
    if not match:
        raise CannotCheck(f"{image} is not a curated environment; the SDK cannot list its tags")
    name, version = match["name"], match["version"]
    registry = get_registry_client("azureml")
    try:
        environment = (registry.environments.get(name, label="latest") if version == "latest"
                       else registry.environments.get(name, version=version))
    except (ResourceNotFoundError, ValidationException):  # the label "latest" finding no listed version says the same
        raise Refused(f"The azureml registry no longer lists environment {name} version {version}: `az ml environment "
                      f"list --registry-name azureml --name {name} -o table` lists the current ones; set {setting} "
                      "in .env to one.") from None
    return f"{name}:{environment.version} listed in the azureml registry ({environment.image or image})"

