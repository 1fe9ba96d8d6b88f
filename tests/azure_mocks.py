"""Offline stand-ins for Azure ML, shared by the tests of setup_ml.py, deploy_model.py and cleanup.py.

Nothing here makes a network call. The mocks are autospecced from the real azure-ai-ml classes, so a call
to a method that does not exist, or with an argument the real method does not take, fails the test.

    client = mock_ml_client()                          # MLClient with real-shaped operation groups
    patch_get_ml_client(monkeypatch, setup_ml, client)  # where the script imported get_ml_client
    loaded = schema_round_trip(entity, load_job, tmp_path)

Plain functions, no fixtures: a conftest can wrap them.
"""

import copy
import json
import socket
import sys
import warnings
from pathlib import Path
from unittest import mock

PROJECT_DIR = Path(__file__).resolve().parents[1]
if str(PROJECT_DIR) not in sys.path:  # the scripts are top-level modules of the project folder
    sys.path.insert(0, str(PROJECT_DIR))

with warnings.catch_warnings():  # importing azure.ai.ml raises hundreds of Marshmallow4Warnings
    warnings.simplefilter("ignore")
    from azure.ai.ml import MLClient
    from azure.ai.ml.entities import AmlCompute, CommandJob
    from azure.ai.ml.operations import (
        ComputeOperations,
        EnvironmentOperations,
        JobOperations,
        ModelOperations,
        OnlineDeploymentOperations,
        OnlineEndpointOperations,
        ServerlessEndpointOperations,
        WorkspaceOperations,
    )
    from azure.core.exceptions import ResourceNotFoundError
    from azure.core.polling import LROPoller

# The marks the Azure test modules put on themselves (pytestmark) until pytest config filters these.
AZURE_WARNING_FILTERS = (
    "ignore::marshmallow.warnings.Marshmallow4Warning",
)

# MLClient sets these in __init__ (they are properties over private attributes), so autospec alone
# leaves them as unspecced MagicMocks; mock_ml_client() replaces each with an autospecced instance.
OPERATION_CLASSES = {
    "compute": ComputeOperations,
    "jobs": JobOperations,
    "environments": EnvironmentOperations,
    "models": ModelOperations,
    "online_endpoints": OnlineEndpointOperations,
    "online_deployments": OnlineDeploymentOperations,
    "serverless_endpoints": ServerlessEndpointOperations,
    "workspaces": WorkspaceOperations,
}

FAKE_SUBSCRIPTION_ID = "00000000-0000-0000-0000-000000000000"
FAKE_WORKSPACE_SETTINGS = {
    "AZURE_SUBSCRIPTION_ID": FAKE_SUBSCRIPTION_ID,
    "AZURE_RESOURCE_GROUP_NAME": "rg-phi3-tests",
    "AZURE_ML_WORKSPACE_NAME": "ws-phi3-tests",
}
FAKE_DEPLOY_SETTINGS = {
    **FAKE_WORKSPACE_SETTINGS,
    "AZURE_MANAGED_IDENTITY_NAME": "id-phi3-tests",
    "AZURE_MANAGED_IDENTITY_CLIENT_ID": "11111111-1111-1111-1111-111111111111",
    "AZURE_ENDPOINT_NAME": "phi3-endpoint-tests",
}


def studio_url(job_name):
    """A studio link shaped like the real one."""
    return (f"https://ml.azure.com/runs/{job_name}?wsid=/subscriptions/{FAKE_SUBSCRIPTION_ID}"
            f"/resourcegroups/rg-phi3-tests/workspaces/ws-phi3-tests")


def submitted_job(name, status="Starting", url=None):
    """What jobs.create_or_update / jobs.get return: a Job with .name, .status and .studio_url."""
    job = mock.NonCallableMagicMock(spec=CommandJob, name=f"job:{name}")
    job.name = name
    job.status = status
    job.studio_url = url or studio_url(name)
    return job


def poller(result):
    """An LROPoller (autospecced) whose .result() is `result`, as begin_* methods return."""
    lro = mock.create_autospec(LROPoller, instance=True)
    lro.result.return_value = result
    lro.done.return_value = True
    lro.status.return_value = "Succeeded"
    return lro


def download_writes_log(lines, filename="std_log.txt"):
    """A side_effect for jobs.download that writes `lines` to user_logs/<filename> under download_path."""

    def download(name, *, download_path=".", output_name=None, all=False):  # noqa: A002 - the SDK's name
        folder = Path(download_path) / "user_logs"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / filename).write_text("\n".join(lines) + "\n", encoding="utf-8")

    return download


def mock_ml_client(*, job_status="Completed", compute_exists=True):
    """An autospecced MLClient whose operation groups are autospecced instances of the real classes.

    Defaults, each replaceable by the test (set .side_effect / .return_value):
      environments.create_or_update(env) -> env (the SDK returns the registered environment)
      compute.get(name)                   -> an AmlCompute, or ResourceNotFoundError if not compute_exists
      compute.begin_create_or_update(c)   -> poller(c)
      jobs.create_or_update(job)          -> submitted_job(job.name, "Starting")
      jobs.get(name)                      -> submitted_job(name, job_status)
      jobs.stream(name)                   -> None (a finished job streams out normally)
      jobs.download(...)                  -> writes nothing
      models.create_or_update(model)      -> model
      online_endpoints / online_deployments.begin_create_or_update(x) -> poller(x)
    Every call goes through the autospec, so a wrong method name or argument raises.
    """
    client = mock.create_autospec(MLClient, instance=True)
    for attribute, operations_class in OPERATION_CLASSES.items():
        setattr(client, attribute, mock.create_autospec(operations_class, instance=True))

    client.environments.create_or_update.side_effect = lambda environment: environment
    if compute_exists:
        client.compute.get.side_effect = lambda name: AmlCompute(name=name, size="Standard_NC24ads_A100_v4", max_instances=1)
    else:
        client.compute.get.side_effect = ResourceNotFoundError("ComputeNotFound: the compute does not exist")
    client.compute.begin_create_or_update.side_effect = poller

    def create_job(job, **kwargs):
        return submitted_job(job.name or "finetune-phi-generated", "Starting")

    client.jobs.create_or_update.side_effect = create_job
    client.jobs.get.side_effect = lambda name: submitted_job(name, job_status)
    client.jobs.stream.return_value = None
    client.jobs.download.return_value = None

    client.models.create_or_update.side_effect = lambda model, **kwargs: model
    client.online_endpoints.begin_create_or_update.side_effect = lambda endpoint, **kwargs: poller(endpoint)
    client.online_deployments.begin_create_or_update.side_effect = lambda deployment, **kwargs: poller(deployment)
    return client


def only_call_arg(method):
    """The single positional argument of a mocked method's only call (asserts it was called once)."""
    method.assert_called_once()
    args, _kwargs = method.call_args
    assert len(args) == 1, f"expected one positional argument, got {args!r}"
    return args[0]


def patch_get_ml_client(monkeypatch, module, client=None):
    """Make `module.get_ml_client()` (the name the script imported) return `client`; returns the client."""
    client = client if client is not None else mock_ml_client()
    monkeypatch.setattr(module, "get_ml_client", lambda: client)
    return client


def forbid_ml_client(monkeypatch, module=None):
    """Fail the test if anything builds an MLClient: the script's get_ml_client and the SDK's constructor."""

    def refuse(*args, **kwargs):
        raise AssertionError("an Azure ML client was requested; this path must not reach Azure")

    import azure.ai.ml

    monkeypatch.setattr(azure.ai.ml, "MLClient", refuse)  # azure_ml.get_ml_client imports it at call time
    if module is not None:
        monkeypatch.setattr(module, "get_ml_client", refuse)


def skip_preflight(monkeypatch):
    """Steps 2 and 3 on Azure ML without their preflight (tests/test_azure_sdk_flows.py runs it against the fake
    service); returns the list of titles it was asked for, so a test can see that it ran first."""
    from helpers import preflight

    asked = []
    monkeypatch.setattr(preflight, "run", lambda checks, title: asked.append(title) or [])
    return asked


def serve_arm_reads(monkeypatch, registered=("Microsoft.MachineLearningServices", "Microsoft.ContainerRegistry",
                                             "Microsoft.Network"), subscription_state="Enabled"):
    """The preflight's raw ARM reads (subscription, resource providers) answered as ARM does, for mocked clients."""
    from helpers import preflight

    def arm_get(ml_client, path, api_version):
        if path == f"/subscriptions/{FAKE_SUBSCRIPTION_ID}":
            return 200, {"subscriptionId": FAKE_SUBSCRIPTION_ID, "displayName": "Phi tests", "state": subscription_state}
        namespace = path.rsplit("/", 1)[-1]
        return 200, {"namespace": namespace, "registrationState": "Registered" if namespace in registered else "NotRegistered"}

    monkeypatch.setattr(preflight, "arm_get", arm_get)


def block_network(monkeypatch):
    """Make every socket connection and name lookup raise for the rest of the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network call attempted: {args[1:]!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def configure_azure(monkeypatch, settings=FAKE_WORKSPACE_SETTINGS, **overrides):
    """TARGET=azure with realistic fake workspace settings (plus any `overrides`) on the config module."""
    import config

    monkeypatch.setattr(config, "TARGET", "azure")
    monkeypatch.setattr(config, "RECIPE", config.PROJECT_DIR / config.TUTORIAL_RECIPE)  # as config.py chooses for azure
    for name, value in {**settings, **overrides}.items():
        assert hasattr(config, name), f"config has no setting {name}"
        monkeypatch.setattr(config, name, value)
    return config


CHAT_ROWS = [
    {"prompt": "What is Phi-3?", "prompt_id": "p1", "messages": [
        {"role": "user", "content": "What is Phi-3?"},
        {"role": "assistant", "content": "A small language model from Microsoft."}]},
    {"prompt": "Name a colour.", "prompt_id": "p2", "messages": [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."}]},
]


def write_jsonl(path, rows=CHAT_ROWS):
    """A small valid chat file (the ultrachat schema download_dataset.py writes)."""
    Path(path).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return Path(path)


def use_tmp_data(monkeypatch, tmp_path):
    """Train/test files and last_job.json under tmp_path; returns (train, test, last_job) paths."""
    import config

    train = write_jsonl(tmp_path / "train_data.jsonl", CHAT_ROWS)
    test = write_jsonl(tmp_path / "test_data.jsonl", CHAT_ROWS[:1])
    last_job = tmp_path / "outputs" / "last_job.json"
    monkeypatch.setattr(config, "TRAIN_DATA_PATH", train)
    monkeypatch.setattr(config, "TEST_DATA_PATH", test)
    monkeypatch.setattr(config, "LAST_JOB_FILE", last_job)
    return train, test, last_job


def schema_round_trip(entity, loader, tmp_path, name=None):
    """Dump `entity` to YAML and load it back with `loader` (azure.ai.ml.load_*); returns the loaded entity.

    Raises (marshmallow ValidationError) on unknown fields or wrong types. A deep copy is dumped because
    dump() mutates some entities in place (an endpoint's identities become dicts). A pipeline-node builder
    (the Command that `command()` returns) is dumped as the standalone job it submits as (`_to_job()`):
    its own dump() writes the pipeline-node schema, which load_job rejects (and deepcopy of the node fails).
    """
    if hasattr(entity, "_to_job"):
        entity = entity._to_job()
    entity = copy.deepcopy(entity)
    path = Path(tmp_path) / f"{name or type(entity).__name__.lower()}.yml"
    entity.dump(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return loader(path)


# --- deploy_model.py / cleanup.py: online endpoints -------------------------------------------------------
def failing_poller(error):
    """An LROPoller (autospecced) that finished, and whose .result() raises `error` (a failed deployment)."""
    lro = poller(None)
    lro.result.side_effect = error
    lro.status.return_value = "Failed"
    return lro


def scoring_uri(endpoint_name, region="eastus2"):
    """A scoring URI shaped like a managed online endpoint's."""
    return f"https://{endpoint_name}.{region}.inference.ml.azure.com/score"


def serve_online_endpoints(client, endpoints=None, primary_key="fake-primary-key", secondary_key="fake-second-key"):
    """Make client.online_endpoints behave like the service, over `endpoints` ({name: traffic dict}).

      get(name)                       -> a fresh ManagedOnlineEndpoint with the stored traffic and a scoring URI,
                                         or ResourceNotFoundError for an endpoint not in `endpoints`
      begin_create_or_update(ep)      -> stores ep.traffic (a copy, as sent) under ep.name; poller(ep)
      get_keys(name)                  -> EndpointAuthKeys(primary_key, secondary_key)
      begin_delete(name=...)          -> forgets the endpoint; poller(None)
    Returns the dict, so a test can see what the "service" holds afterwards.
    """
    from azure.ai.ml.entities import EndpointAuthKeys, ManagedOnlineEndpoint

    endpoints = {} if endpoints is None else endpoints

    def get(name, **kwargs):
        if name not in endpoints:
            raise ResourceNotFoundError(f"(UserError) Endpoint {name} does not exist")
        return ManagedOnlineEndpoint(name=name, auth_mode="key", traffic=dict(endpoints[name]),
                                     scoring_uri=scoring_uri(name), provisioning_state="Succeeded")

    def create_or_update(endpoint, **kwargs):
        endpoints[endpoint.name] = dict(endpoint.traffic or {})
        return poller(endpoint)

    def delete(name=None, **kwargs):
        endpoints.pop(name, None)
        return poller(None)

    operations = client.online_endpoints
    operations.get.side_effect = get
    operations.begin_create_or_update.side_effect = create_or_update
    operations.get_keys.side_effect = lambda name: EndpointAuthKeys(primary_key=primary_key, secondary_key=secondary_key)
    operations.begin_delete.side_effect = delete
    return endpoints


def endpoint_round_trip(endpoint, loader, tmp_path, name="endpoint"):
    """schema_round_trip for an online endpoint, whose dump() ignores its destination and returns a dict.

    ManagedOnlineEndpoint.dump(dest) writes nothing (azure-ai-ml 1.35) and its dict holds nulls
    (an identity's principal_id, client_id) that its own schema refuses on load: they are left out, as a
    person writing the YAML would. A deep copy is dumped: dump() turns the identities into dicts in place.
    """
    from helpers.azure_ml import dump_yaml

    path = Path(tmp_path) / f"{name}.yml"
    dump_yaml(endpoint, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return loader(path)


def validated_yaml_blocks(out):
    """The `--- <title> (validated) ---` blocks a dry run prints, each parsed as YAML ({title: dict})."""
    import yaml

    blocks, title = {}, None
    for line in out.splitlines():
        if line.startswith("--- ") and line.endswith(" (validated) ---"):
            title = line[4:-len(" (validated) ---")]
            blocks[title] = []
        elif title and not line.startswith("Dry run:"):
            blocks[title].append(line)
    return {name: yaml.safe_load("\n".join(lines)) for name, lines in blocks.items()}


# --- serverless/: the serverless road --------------------------------------------------------------------
FAKE_SERVERLESS_SETTINGS = {**FAKE_WORKSPACE_SETTINGS, "SERVERLESS_ENDPOINT_NAME": "phi-ft-serverless-tests"}
FAKE_WORKSPACE_ID = "22222222-2222-2222-2222-222222222222"


def configure_serverless(monkeypatch, tmp_path, **overrides):
    """TARGET=serverless with fake settings, chat-completions files and last_job.json under tmp_path."""
    import config

    configure_azure(monkeypatch, FAKE_SERVERLESS_SETTINGS, **overrides)
    monkeypatch.setattr(config, "TARGET", "serverless")
    chats = [{"messages": row["messages"]} for row in CHAT_ROWS]
    monkeypatch.setattr(config, "CHAT_TRAIN_DATA_PATH", write_jsonl(tmp_path / "train_chat.jsonl", chats))
    monkeypatch.setattr(config, "CHAT_TEST_DATA_PATH", write_jsonl(tmp_path / "test_chat.jsonl", chats[:1]))
    monkeypatch.setattr(config, "LAST_JOB_FILE", tmp_path / "outputs" / "last_job.json")
    monkeypatch.setattr(config, "ENV_FILE", tmp_path / ".env")
    monkeypatch.setattr(config, "SERVERLESS_POLL_SECONDS", 0)
    return config


def serve_workspace(client, location="eastus2"):
    """client.workspaces.get(name) -> a Workspace in `location` with a workspace GUID, as the service returns it."""
    from azure.ai.ml.entities import Workspace

    client.workspaces.get.side_effect = lambda name=None, **kwargs: Workspace(name=name, location=location,
                                                                              workspace_id=FAKE_WORKSPACE_ID)


# The azureml registry's entries as Azure/azureml-assets describes them (assets/models/system/<model>/spec.yaml tags;
# the region list's text format is assumed). Phi-3.5-mini-instruct is retired: its spec says isArchived and
# retirement 2025-08-30.
PHI4_REGIONS = "eastus2, eastus, northcentralus, southcentralus, westus, westus3"
REGISTRY_MODELS = {
    "Phi-4-mini-instruct": {"version": "7", "tags": {"maas-finetuning-deploy-regions": PHI4_REGIONS}},
    "Phi-3.5-mini-instruct": {"version": "6", "tags": {
        "FinetuneDeprecationDate": "2025-06-30", "FinetuneRetirementDate": "2025-08-30",
        "InferenceDeprecationDate": "2025-06-30", "InferenceRetirementDate": "2025-08-30",
        "maas-finetuning-deploy-regions": "eastus2"}},
}
# Curated environments (assets/training/finetune_acft_hf_nlp/environments/acpt: version 124 on Ubuntu 22.04, CUDA 12.6).
CURATED_ENVIRONMENTS = {"acft-hf-nlp-gpu": ["59", "124"], "minimal-py312-cuda12.4-inference": ["6"]}


def mock_registry_client(models=None, environments=None):
    """The azureml registry's MLClient (autospecced): models.get / environments.get answer from the entries above
    (a name or version not listed raises ResourceNotFoundError, as the registry does)."""
    from azure.ai.ml.entities import Environment, Model
    from azure.ai.ml.operations import EnvironmentOperations

    models = REGISTRY_MODELS if models is None else models
    environments = CURATED_ENVIRONMENTS if environments is None else environments
    registry = mock.create_autospec(MLClient, instance=True)
    registry.models = mock.create_autospec(ModelOperations, instance=True)
    registry.environments = mock.create_autospec(EnvironmentOperations, instance=True)

    def get_model(name, version=None, label=None):
        entry = models.get(name)
        if entry is None or (version and version != entry["version"]):
            raise ResourceNotFoundError(f"(UserError) Model {name} version {version or label} not found in registry azureml")
        model = Model(name=name, version=version or entry["version"], tags=dict(entry["tags"]))
        model._id = f"azureml://registries/azureml/models/{name}/versions/{model.version}"  # what the service fills in
        return model

    def get_environment(name, version=None, label=None):
        versions = environments.get(name, [])
        version = versions[-1] if label == "latest" and versions else version
        if version not in versions:
            raise ResourceNotFoundError(f"(UserError) Environment {name} version {version} not found in registry azureml")
        return Environment(name=name, version=version, image=f"mcr.microsoft.com/azureml/curated/{name}:{version}")

    registry.models.get.side_effect = get_model
    registry.environments.get.side_effect = get_environment
    return registry


def serve_serverless_endpoints(client, scoring_uri, endpoints=None, primary_key="fake-serverless-key"):
    """Make client.serverless_endpoints behave like the service over `endpoints` ({name: model_id}).

      get(name)                     -> a ServerlessEndpoint (succeeded, `scoring_uri`), or ResourceNotFoundError
      begin_create_or_update(ep)    -> stores ep.model_id; poller(the endpoint as get() returns it)
      get_keys(name)                -> EndpointAuthKeys(primary_key, ...)
      begin_delete(name)            -> forgets it; poller(None)
    """
    from azure.ai.ml.entities import EndpointAuthKeys, ServerlessEndpoint

    endpoints = {} if endpoints is None else endpoints

    def get(name, **kwargs):
        if name not in endpoints:
            raise ResourceNotFoundError(f"(UserError) Serverless endpoint {name} does not exist")
        return ServerlessEndpoint(name=name, model_id=endpoints[name], scoring_uri=scoring_uri,
                                  provisioning_state="succeeded", auth_mode="key")

    def create_or_update(endpoint, **kwargs):
        endpoints[endpoint.name] = endpoint.model_id
        return poller(get(endpoint.name))

    def delete(name, **kwargs):
        endpoints.pop(name, None)
        return poller(None)

    operations = client.serverless_endpoints
    operations.get.side_effect = get
    operations.begin_create_or_update.side_effect = create_or_update
    operations.get_keys.side_effect = lambda name, **kwargs: EndpointAuthKeys(primary_key=primary_key,
                                                                              secondary_key="fake-second")
    operations.begin_delete.side_effect = delete
    return endpoints
