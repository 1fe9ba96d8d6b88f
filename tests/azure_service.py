"""A fake Azure Machine Learning service under azure-ai-ml's own code: the network is replaced at the HTTP layer.

    service = FakeAzureML()                                  # a workspace with its two datastores
    client = service.ml_client()                             # a real azure.ai.ml.MLClient over it
    service.add_compute("gpu-nc24s-a100-v4")                 # state the service starts with (else step 2 creates it)
    service.quotas[...] = (used, limit)                      # what the preflight finds (also providers, identities)
    service.job_statuses = ["Queued", "Running", "Failed"]   # what run history reports, one status per poll
    ... run a step's main() with get_ml_client patched to return `client` ...
    service.calls("PUT", "/jobs/")                           # the requests azure-ai-ml sent, with their JSON

How it plugs in (azure-ai-ml 1.35.2):
- `MLClient(..., transport=FakeAzureML(...))`: MLClient forwards its keyword arguments to every generated
  client it builds (the ARM clients of each api-version, the workspace data plane, and the `HttpPipeline` that
  fetches the discovery document, streams job logs and calls the scoring URI); JobOperations keeps them
  (`_service_client_kwargs`) for the run-history and data-plane clients it builds on first use. One client
  does not get them: `MLClient._preflight` (`_utils/_preflight_utils.py`, ARM template validation of
  components, which these flows never use). The fake refuses any request it does not know and keeps it in
  `unknown`, since the SDK swallows some exceptions.
- Blob storage (uploads of local code and data, job logs): azure-ai-ml builds its own
  `BlobServiceClient(account_url, credential)` and `ContainerClient.from_container_url(sas_uri)` in
  `azure/ai/ml/_artifacts/_blob_storage_helper.py` and forwards no transport to them. `patch_blob_storage()`
  replaces those two names there with versions that add `transport=` this fake, so the storage SDK's own
  requests (HEAD/PUT blob, set metadata, list and GET blobs) are answered here too. Only the blob datastore
  type is faked (a workspace's default); ADLS Gen2 and file-share datastores are not.
- Waiting: long-running operations answer 201/202 with `Azure-AsyncOperation` (and `Location` for deletes)
  and `Retry-After: 0`; azure-core pollers sleep through the transport, and this one's `sleep()` returns at
  once. `jobs.stream()` waits `time.sleep(_wait_before_polling(...))` in
  `azure/ai/ml/operations/_job_ops_helper.py` between polls: `patch_stream_waits()` makes that 0 s.

Which answer follows what. Payload shapes follow the SDK's generated models (azure/ai/ml/_restclient/arm_ml_service/
models, _restclient/runhistory/models) and, where named, Microsoft's recorded sessions (Azure/azure-sdk-assets,
python/sdk/ml/azure-ai-ml/tests/recordings/...) or the REST specification's examples (Azure/azure-rest-api-specs,
specification/machinelearningservices/resource-manager/Microsoft.MachineLearningServices/stable/2024-04-01/examples):
- cluster creation (`PUT computes/<name>`): compute/e2etests/test_compute.pyTestComputetest_aml_compute_create_and_delete
  .json: 201, provisioningState Creating, vmSize upper-cased, Azure-AsyncOperation to computeOperationsStatus, whose
  polls carry only {"status": "InProgress"} then "Succeeded";
- online endpoint and deployment PUT: recordings/online_services/e2etests/test_online_endpoint.pyTestOnlineEndpoint
  test_online_endpoint_e2e.json and test_online_deployment.pyTestOnlineDeploymenttest_online_deployment_create.json:
  201 with Azure-AsyncOperation, Location and x-ms-async-operation-timeout; mfeOperationsStatus polls say "Updating";
- VM sizes (`locations/<region>/vmSizes`) and quotas (`locations/<region>/usages`): examples/Usage/list.json (a row
  per VM family, type .../vmFamily/usages, name {value, localizedValue}, currentValue, limit, unit Count);
- the azureml registry: recordings/model/e2etests/test_model.pyTestModeltest_create_get_download_model_registry.json
  (discovery on eastus.api.azureml.ms, then the data plane under primaryRegionResourceProviderUri + mferp/
  managementfrontend; "latest" is the versions list with $orderBy=createdtime desc&$top=1); the models' tags follow
  Azure/azureml-assets assets/models/system/<model>/spec.yaml (Phi-3.5-mini-instruct: isArchived, retired
  2025-08-30); curated environment versions follow assets/training/finetune_acft_hf_nlp/environments/acpt;
- serverless endpoints: examples/Workspace/ServerlessEndpoint/createOrUpdate.json, get.json, listKeys.json, delete.json.
Assumed, not taken from a recording or example (marked where they are answered):
- every operation ends after one in-progress poll, and a test decides how (`deployment_outcomes`);
- the subscription, resource provider, user-assigned identity and role-assignment bodies carry the fields the
  preflight reads, in the shapes of their public REST references, not copied from a recording;
- archived registry versions are left out of the versions list (so "latest" finds none); the region tag's text
  format ("eastus2, eastus, ...");
- a serverless fine-tuning job moves through `job_statuses` on its own GETs and, on Completed, registers its model
  as version "1" under its registered_model output's name; the serverless endpoint's operation is polled through
  Azure-AsyncOperation like the workspace's others; its inferenceEndpoint.uri is `serverless_scoring_uri`;
- a model registered from `azureml://jobs/<job>/outputs/<output>` comes back with the output's datastore path
  (`.../datastores/workspaceblobstore/paths/azureml/<job>/<output>/`), and registering one whose output holds
  no files answers ModelAssetPathNotFoundInStorage (the error users report in public issue threads);
- updating a deployment whose creation failed answers 400 ("unrecoverable state": delete and re-create it);
- deleting a deployment that still has traffic answers 400; traffic naming a missing deployment answers 400.
"""

import base64
import copy
import email.utils
import hashlib
import http
import itertools
import json
import re
import threading
import time
import uuid
import xml.sax.saxutils
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

import requests
from azure.core.credentials import AccessToken
from azure.core.pipeline.transport import HttpTransport
from azure.core.pipeline.transport import HttpRequest as LegacyHttpRequest
from azure.core.pipeline.transport._requests_basic import RequestsTransportResponse
from azure.core.rest._requests_basic import RestRequestsTransportResponse
from requests.structures import CaseInsensitiveDict

SUBSCRIPTION_ID = "00000000-0000-0000-0000-000000000000"
RESOURCE_GROUP = "rg-phi3-tests"
WORKSPACE = "ws-phi3-tests"
LOCATION = "eastus2"
WORKSPACE_ID = "5e7a1c3e-0000-4000-8000-0000000000a1"  # the workspace's GUID (discovery, container names)
STORAGE_ACCOUNT = "stphi3tests"
TENANT_ID = "33333333-3333-3333-3333-333333333333"
ARM_HOST = "management.azure.com"
API_HOST = f"{LOCATION}.api.azureml.ms"  # discovery, run history
PROVIDER = "Microsoft.MachineLearningServices"
# A few rows of GET .../locations/<region>/vmSizes (VirtualMachineSize), the sizes the tutorial uses.
VM_SIZES = [
    {"name": name, "family": family, "vCPUs": cpus, "gpus": gpus, "memoryGB": memory, "osVhdSizeMB": 1047552,
     "maxResourceVolumeMB": disk, "lowPriorityCapable": True, "premiumIO": True,
     "supportedComputeTypes": ["ComputeInstance", "AmlCompute"]}
    for name, family, cpus, gpus, memory, disk in [
        ("Standard_NC24ads_A100_v4", "standardNCADSA100v4Family", 24, 1, 220.0, 65536),
        ("Standard_ND96asr_v4", "standardNDASv4_A100Family", 96, 8, 900.0, 6291456),
        ("Standard_NC4as_T4_v3", "standardNCASv3_T4Family", 4, 1, 28.0, 180224),
        ("Standard_E16s_v3", "standardESv3Family", 16, 0, 128.0, 262144),
        ("Standard_E4s_v3", "standardESv3Family", 4, 0, 32.0, 65536)]]
# Usage/list (the vCPU quota per VM family in a region): (currentValue, limit), as in the REST example's rows.
QUOTAS = {"Standard NCADSA100v4 Family Cluster Dedicated vCPUs": (0, 24),
          "Standard NDASv4_A100 Family Cluster Dedicated vCPUs": (0, 0),
          "Standard ESv3 Family Cluster Dedicated vCPUs": (0, 32),
          "Standard NCADSA100v4 Family Cluster LowPriority vCPUs": (0, 100)}
IDENTITY = "id-phi3-tests"  # the endpoint's user-assigned identity (tests/azure_mocks.FAKE_DEPLOY_SETTINGS)
IDENTITY_CLIENT_ID = "11111111-1111-1111-1111-111111111111"
IDENTITY_PRINCIPAL_ID = "44444444-4444-4444-4444-444444444444"
CONTAINER_REGISTRY = "crphi3tests"
# The azureml registry (the model catalogue and curated environments), answered by its data plane (MFE).
REGISTRY = "azureml"
REGISTRY_HOST = f"cert-{LOCATION}.experiments.azureml.net"
REGISTRY_SUBSCRIPTION = "99999999-9999-9999-9999-999999999999"
REGISTRY_RESOURCE_GROUP = "azureml-rg"
# assets/models/system/<model>/spec.yaml of Azure/azureml-assets: Phi-3.5-mini-instruct is archived (isArchived: true)
# and retired (Finetune/InferenceRetirementDate 2025-08-30); the region tag's text format is assumed.
REGISTRY_MODELS = {
    "Phi-4-mini-instruct": {"version": "7", "isArchived": False, "tags": {
        "maas-finetuning-deploy-regions": "eastus2, eastus, northcentralus, southcentralus, westus, westus3"}},
    "Phi-3.5-mini-instruct": {"version": "6", "isArchived": True, "tags": {
        "FinetuneDeprecationDate": "2025-06-30", "FinetuneRetirementDate": "2025-08-30",
        "InferenceDeprecationDate": "2025-06-30", "InferenceRetirementDate": "2025-08-30",
        "maas-finetuning-deploy-regions": "eastus2"}},
}
REGISTRY_ENVIRONMENTS = {"acft-hf-nlp-gpu": ["59", "124"], "minimal-py312-cuda12.4-inference": ["6"]}
# A managed online deployment's properties as the service fills them in when a request leaves them out.
DEPLOYMENT_DEFAULTS = {
    "endpointComputeType": "Managed", "scaleSettings": {"scaleType": "Default"}, "appInsightsEnabled": False,
    "egressPublicNetworkAccess": "Enabled", "properties": {}, "environmentVariables": {},
    "requestSettings": {"requestTimeout": "PT5S", "maxConcurrentRequestsPerInstance": 1},
    "livenessProbe": {"failureThreshold": 30, "successThreshold": 1, "timeout": "PT2S", "period": "PT10S",
                      "initialDelay": "PT10S"},
    "readinessProbe": {"failureThreshold": 30, "successThreshold": 1, "timeout": "PT2S", "period": "PT10S",
                       "initialDelay": "PT10S"},
}
TERMINAL_JOB_STATUSES = ("Completed", "Failed", "Canceled", "NotResponding", "Paused")


def _jwt(claims):
    """An unsigned JWT: azure-ai-ml decodes (never verifies) tokens in a few places."""
    def encode(data):
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
    return f"{encode({'alg': 'none', 'typ': 'JWT'})}.{encode(claims)}.c2lnbmF0dXJl"


class FakeCredential:
    """A TokenCredential that hands out a fake token; it never signs in."""

    def get_token(self, *scopes, **kwargs):
        expires = int(time.time()) + 3600
        claims = {"oid": "22222222-2222-2222-2222-222222222222", "tid": TENANT_ID, "upn": "tester@example.com",
                  "exp": expires}
        return AccessToken(_jwt(claims), expires)


@dataclass
class Call:
    """One request the SDK sent: method, host, path (unquoted), query ({name: value}), headers and body."""

    method: str
    url: str
    host: str
    path: str
    query: dict
    headers: dict
    body: bytes = b""
    json: object = None

    def __repr__(self):
        return f"{self.method} {self.host}{self.path}"


@dataclass
class Operation:
    """A long-running operation: one 'InProgress' answer, then `status`; `finish` runs when it ends."""

    status: str = "Succeeded"
    error: dict = None
    progress: str = "InProgress"  # what a poll says before the end (recorded endpoint/deployment polls say Updating)
    polls_left: int = 1
    finish: object = None
    done: bool = False


class ServiceAnswer(Exception):
    """Raised inside a handler to answer with an error status and an ARM error body."""

    def __init__(self, status, code, message, details=()):
        super().__init__(message)
        self.status = status
        self.body = {"error": {"code": code, "message": message, "details": list(details), "additionalInfo": []}}


def arm_error(status, code, message, details=()):
    """A ServiceAnswer with the ARM error body {"error": {"code", "message", "details", "additionalInfo"}}."""
    return ServiceAnswer(status, code, message, details)


def _metadata(headers):
    """A blob's metadata from its x-ms-meta-* request headers."""
    return {header[len("x-ms-meta-"):]: value for header, value in headers.items()
            if header.lower().startswith("x-ms-meta-")}


def _now():
    """A timestamp as ARM writes them."""
    return time.strftime("%Y-%m-%dT%H:%M:%S.0000000+00:00", time.gmtime())


def _http_date():
    """A timestamp as HTTP headers (and blob storage) write them."""
    return email.utils.formatdate(usegmt=True)


class FakeAzureML(HttpTransport):
    """An azure-core HTTP transport that answers like Azure ML (ARM, discovery, run history, blob, scoring)."""

    def __init__(self, subscription_id=SUBSCRIPTION_ID, resource_group=RESOURCE_GROUP, workspace=WORKSPACE,
                 location=LOCATION):
        self.subscription_id, self.resource_group, self.workspace, self.location = (
            subscription_id, resource_group, workspace, location)
        self.calls_log = []
        self.unknown = []  # requests no route answered (a test checks there are none)
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        # Workspace state, as ARM bodies ({"id", "name", "type", "properties", "systemData"}).
        self.computes = {}
        self.assets = {}  # ("environments" | "codes" | "models", name) -> {version: body}
        self.jobs = {}
        self.endpoints = {}
        self.deployments = {}  # (endpoint, deployment) -> body
        self.endpoint_keys = {}
        self.operations = {}
        self.blobs = {}  # (container, blob name) -> {"content": bytes, "metadata": {...}}
        self.datastores = {
            "workspaceblobstore": f"azureml-blobstore-{WORKSPACE_ID}",
            "workspaceartifactstore": "azureml",
        }
        # What the service does next; tests set these.
        self.job_statuses = ["Queued", "Running", "Completed"]  # run history's answer, one per poll
        self.job_error = None  # {"code": ..., "message": ...} for a Failed job
        self.job_log_lines = ["Loading the dataset", "Training ..."]  # user_logs/std_log.txt, one line per poll
        self.interrupt_on_poll = None  # n: the n-th run-details request raises KeyboardInterrupt (Ctrl+C)
        self.deployment_outcomes = []  # one per deployment PUT: "Succeeded" or ("Failed", code, message)
        self.deployment_logs = "Starting AzureML Inference Server\n"  # getLogs' answer
        self.endpoint_create_error = None  # a ServiceAnswer for the next endpoint creation
        self.export_record = None  # model_output/onnx_export.json a completed job wrote (None: no export)
        self.serverless_endpoints = {}
        self.serverless_scoring_uri = "https://{name}.eastus2.models.ai.azure.com"  # inferenceEndpoint.uri, per name
        self.registry_models = copy.deepcopy(REGISTRY_MODELS)
        self.registry_environments = copy.deepcopy(REGISTRY_ENVIRONMENTS)
        self.scoring_answer = ["an answer"]
        self._run_polls = {}
        # What the preflight reads (helpers/preflight.py); tests change these to see each refusal.
        self.subscription_state = "Enabled"
        self.workspace_exists = True  # False: the workspace (or project) GET answers 404, as for a wrong name
        self.registered_providers = {"Microsoft.MachineLearningServices", "Microsoft.ContainerRegistry",
                                     "Microsoft.Network"}
        self.quotas = dict(QUOTAS)  # usage name -> (currentValue, limit), per region
        self.identities = {IDENTITY: {"clientId": IDENTITY_CLIENT_ID, "principalId": IDENTITY_PRINCIPAL_ID}}
        self.role_assignments = [  # (scope, principalId, role definition GUID)
            (self.registry_id(), IDENTITY_PRINCIPAL_ID, "7f951dda-4ed3-4680-a7ca-43fe172d538d"),  # AcrPull
            (self.storage_id(), IDENTITY_PRINCIPAL_ID, "2a2b9908-6ea1-4ae2-8e65-a410df84e7d1")]  # Storage Blob Data Reader

    # --- azure-core's HttpTransport ------------------------------------------------------------------
    def open(self):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        pass

    def sleep(self, duration):
        """Pollers sleep through their transport: the fake service never makes them wait."""

    def send(self, request, **kwargs):
        """Record the request and answer it as the service would (an error status for a ServiceAnswer)."""
        call = self._record(request)
        with self._lock:
            try:
                status, body, headers = self._route(call)
            except ServiceAnswer as answer:
                status, body, headers = answer.status, answer.body, {}
            except AssertionError:  # a request this fake does not know; kept, since the SDK may swallow it
                self.unknown.append(call)
                raise
        return self._response(request, status, body, headers)

    # --- what tests read --------------------------------------------------------------------------------
    def calls(self, method=None, path_contains="", host_contains=""):
        """The recorded requests, optionally those with this method and path/host fragments."""
        with self._lock:
            return [call for call in self.calls_log
                    if (method is None or call.method == method) and path_contains in call.path
                    and host_contains in call.host]

    # --- state a test starts from ----------------------------------------------------------------------
    def workspace_path(self):
        """The workspace's ARM resource path."""
        return (f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}"
                f"/providers/{PROVIDER}/workspaces/{self.workspace}")

    def registry_id(self):
        """The workspace's container registry (where its images are built and the endpoint pulls from)."""
        return (f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}"
                f"/providers/Microsoft.ContainerRegistry/registries/{CONTAINER_REGISTRY}")

    def storage_id(self):
        """The workspace's storage account."""
        return (f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}"
                f"/providers/Microsoft.Storage/storageAccounts/{STORAGE_ACCOUNT}")

    def add_compute(self, name, size="Standard_NC24ads_A100_v4"):
        """An AmlCompute cluster that exists (scaled to 0 nodes)."""
        self.computes[name] = self._resource(f"computes/{name}", name, "computes", {
            "computeType": "AmlCompute", "computeLocation": self.location, "provisioningState": "Succeeded",
            "disableLocalAuth": True, "isAttachedCompute": False,
            "properties": {"vmSize": size, "vmPriority": "Dedicated", "scaleSettings": {
                "maxNodeCount": 1, "minNodeCount": 0, "nodeIdleTimeBeforeScaleDown": "PT300S"},
                "currentNodeCount": 0, "targetNodeCount": 0, "allocationState": "Steady", "osType": "Linux"}},
            location=self.location)

    def add_endpoint(self, name, traffic=None, deployments=None):
        """A managed online endpoint that exists, with its deployments ({name: provisioning state})."""
        body = self._endpoint_body(name, {"authMode": "Key", "traffic": dict(traffic or {}), "mirrorTraffic": {}})
        body["properties"]["provisioningState"] = "Succeeded"
        body["properties"]["scoringUri"] = self.scoring_uri(name)
        body["properties"]["swaggerUri"] = self.scoring_uri(name).replace("/score", "/swagger.json")
        self.endpoints[name] = body
        self.endpoint_keys[name] = {"primaryKey": f"primary-key-of-{name}", "secondaryKey": f"secondary-key-of-{name}"}
        for deployment, state in (deployments or {}).items():
            self.deployments[(name, deployment)] = self._deployment_body(name, deployment, {
                "endpointComputeType": "Managed", "instanceType": "Standard_E4s_v3", "provisioningState": state,
                "model": f"{self.workspace_path()}/models/finetune-phi-3-5-mini/versions/1"})

    def scoring_uri(self, endpoint):
        """A managed online endpoint's scoring URI."""
        return f"https://{endpoint}.{self.location}.inference.ml.azure.com/score"

    def add_blob(self, container, name, content, metadata=None):
        """A blob in the workspace's storage account."""
        self.blobs[(container, name)] = {"content": content if isinstance(content, bytes) else content.encode(),
                                         "metadata": dict(metadata or {}), "modified": _http_date()}

    def add_completed_job(self, name, compute="gpu-nc24s-a100-v4"):
        """A fine-tuning job that completed and wrote its MLflow model to outputs.model_output."""
        self.jobs[name] = self._resource(f"jobs/{name}", name, "jobs", {
            "jobType": "Command", "status": "Completed", "computeId": f"{self.workspace_path()}/computes/{compute}",
            "experimentName": "phi-3-fine-tuning", "command": "python fine_tune.py", "environmentId": "",
            "outputs": {"model_output": {"jobOutputType": "mlflow_model", "mode": "ReadWriteMount",
                                         "uri": f"azureml://datastores/workspaceblobstore/paths/azureml/{name}/"
                                                "model_output/"}},
            "services": {"Studio": {"jobServiceType": "Studio", "endpoint": self.studio_url(name)}}})
        self._put_model_output(name)

    def _put_model_output(self, name):
        """The files fine_tune.py writes to outputs.model_output (what the model registry checks exists)."""
        container = self.datastores["workspaceblobstore"]
        for file_name in ("MLmodel", "conda.yaml", "model/model.safetensors"):
            self.add_blob(container, f"azureml/{name}/model_output/{file_name}", b"fake " + file_name.encode())
        if self.export_record is not None:
            self.add_blob(container, f"azureml/{name}/model_output/onnx_export.json", json.dumps(self.export_record))

    def deployment_state(self, endpoint, deployment):
        """A deployment's provisioning state as the service holds it (None: no such deployment)."""
        body = self.deployments.get((endpoint, deployment))
        return body and body["properties"]["provisioningState"]

    # --- plumbing into azure-ai-ml -------------------------------------------------------------------------
    def ml_client(self):
        """A real MLClient whose every generated client sends through this transport."""
        from azure.ai.ml import MLClient

        return MLClient(credential=FakeCredential(), subscription_id=self.subscription_id,
                        resource_group_name=self.resource_group, workspace_name=self.workspace, transport=self)

    def patch_blob_storage(self, monkeypatch):
        """Give azure-ai-ml's blob clients this transport (it forwards none of MLClient's to them)."""
        from azure.ai.ml._artifacts import _blob_storage_helper
        from azure.storage.blob import BlobServiceClient, ContainerClient

        transport = self

        class WithTransport:
            """BlobServiceClient(...) and ContainerClient.from_container_url(...), plus transport=."""

            def __init__(self, cls):
                self.cls = cls

            def __call__(self, *args, **kwargs):
                return self.cls(*args, transport=transport, **kwargs)

            def from_container_url(self, url, **kwargs):
                return self.cls.from_container_url(url, transport=transport, **kwargs)

        monkeypatch.setattr(_blob_storage_helper, "BlobServiceClient", WithTransport(BlobServiceClient))
        monkeypatch.setattr(_blob_storage_helper, "ContainerClient", WithTransport(ContainerClient))

    @staticmethod
    def patch_stream_waits(monkeypatch):
        """jobs.stream() waits 1 s to 3 min between polls with time.sleep in _job_ops_helper: make it 0 s."""
        from azure.ai.ml.operations import _job_ops_helper

        monkeypatch.setattr(_job_ops_helper, "_wait_before_polling", lambda seconds: 0)

    # --- requests and responses -------------------------------------------------------------------------------
    def _record(self, request):
        """A Call for this request (legacy or azure.core.rest; a body may be bytes, text or a stream), kept."""
        if isinstance(request, LegacyHttpRequest):
            body = request.body if request.body is not None else request.data
        else:
            body = request.content
        if hasattr(body, "read"):
            body = body.read()
        elif body is not None and not isinstance(body, (bytes, str, dict, list)):
            body = b"".join(chunk if isinstance(chunk, bytes) else chunk.encode() for chunk in body)
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        body = body.encode() if isinstance(body, str) else (body or b"")
        parsed = None
        if body and "json" in (request.headers.get("Content-Type") or ""):
            parsed = json.loads(body)
        parts = urlsplit(request.url)
        query = {name: values[-1] for name, values in parse_qs(parts.query, keep_blank_values=True).items()}
        call = Call(request.method, request.url, parts.netloc, unquote(parts.path), query, dict(request.headers),
                    body, parsed)
        with self._lock:
            self.calls_log.append(call)
        return call

    @staticmethod
    def _response(request, status, body, headers):
        """The response class azure-core's requests transport returns for this kind of request, with `body`."""
        raw = requests.Response()
        raw.status_code = status
        raw.reason = http.HTTPStatus(status).phrase
        if isinstance(body, (dict, list)):
            content, content_type = json.dumps(body).encode(), "application/json; charset=utf-8"
        elif isinstance(body, str):
            content, content_type = body.encode(), "text/plain; charset=utf-8"
        else:
            content, content_type = body or b"", "application/octet-stream"
        raw._content = content
        raw._content_consumed = True
        raw.headers = CaseInsensitiveDict({"Content-Type": content_type, "Content-Length": str(len(content)),
                                           "Date": _http_date(), "x-ms-request-id": str(uuid.uuid4()),
                                           **(headers or {})})
        if not content and status in (202, 204):
            raw.headers.pop("Content-Type")
        raw.url = request.url
        if isinstance(request, LegacyHttpRequest):
            return RequestsTransportResponse(request, raw)
        response = RestRequestsTransportResponse(request=request, internal_response=raw)
        response.read()  # the body is here already; the requests transport reads non-streamed ones the same way
        return response

    def _route(self, call):
        """(status, body, headers) from the handler for the request's host."""
        if call.host == ARM_HOST:
            return self._arm(call)
        if call.host == API_HOST:
            return self._api(call)
        if call.host == REGISTRY_HOST:
            return self._registry(call)
        discovery = re.fullmatch(r"/registrymanagement/v1\.0/registries/([^/]+)/discovery", call.path)
        if call.host.endswith(".api.azureml.ms") and call.method == "GET" and discovery:  # the SDK asks eastus
            return self._registry_discovery(discovery.group(1))
        if call.host.endswith(".blob.core.windows.net"):
            return self._blob(call)
        if call.host.endswith(".inference.ml.azure.com"):
            return self._score(call)
        raise AssertionError(f"the fake Azure ML service does not know {call.method} {call.url}")

    # --- ARM ---------------------------------------------------------------------------------------------------
    def _resource(self, relative, name, resource_type, properties, **extra):
        """An ARM resource body: id, name, type, properties, systemData (and `extra` top-level fields)."""
        return {"id": f"{self.workspace_path()}/{relative}", "name": name,
                "type": f"{PROVIDER}/workspaces/{resource_type}", "properties": properties,
                "systemData": {"createdAt": _now(), "createdBy": "tester@example.com", "createdByType": "User",
                               "lastModifiedAt": _now(), "lastModifiedBy": "tester@example.com",
                               "lastModifiedByType": "User"}, **extra}

    def _arm(self, call):
        """Azure Resource Manager: operation status, VM sizes, and the workspace's resources by path pattern."""
        operation = re.fullmatch(rf"/subscriptions/[^/]+/providers/{PROVIDER}/locations/[^/]+/"
                                 r"(mfeOperationsStatus|mfeOperationResults)/(.+)", call.path, re.IGNORECASE)
        if operation:
            return self._operation(operation.group(1), operation.group(2))
        if operation is None:
            operation = re.fullmatch(rf"/subscriptions/[^/]+/providers/{PROVIDER}/locations/[^/]+/"
                                     r"(computeOperationsStatus)/(.+)", call.path, re.IGNORECASE)
            if operation:
                return self._operation(operation.group(1), operation.group(2))
        if call.method == "GET" and re.fullmatch(rf"/subscriptions/[^/]+/providers/{PROVIDER}/locations/[^/]+/vmSizes",
                                                 call.path, re.IGNORECASE):
            return 200, {"value": VM_SIZES}, {}
        if call.method == "GET":
            answer = self._subscription_level(call)
            if answer is not None:
                return answer
        prefix = self.workspace_path()
        if not call.path.lower().startswith(prefix.lower()):
            raise AssertionError(f"the fake Azure ML service does not know {call.method} {call.url}")
        parts = [part for part in call.path[len(prefix):].split("/") if part]
        route = (call.method, *(part if index % 2 == 0 else "*" for index, part in enumerate(parts)))
        handlers = {
            ("GET",): self._workspace,
            ("GET", "computes", "*"): self._get_compute,
            ("PUT", "computes", "*"): self._put_compute,
            ("GET", "datastores"): self._list_datastores,
            ("GET", "datastores", "*"): self._get_datastore,
            ("POST", "datastores", "*", "listSecrets"): self._datastore_secrets,
            ("GET", "environments", "*"): self._get_container,
            ("GET", "codes", "*"): self._get_container,
            ("GET", "models", "*"): self._get_container,
            ("GET", "environments", "*", "versions", "*"): self._get_version,
            ("GET", "codes", "*", "versions", "*"): self._get_version,
            ("GET", "models", "*", "versions", "*"): self._get_version,
            ("GET", "codes", "*", "versions"): self._list_versions,
            ("GET", "models", "*", "versions"): self._list_versions,
            ("GET", "environments", "*", "versions"): self._list_versions,
            ("POST", "codes", "*", "versions", "*", "startPendingUpload"): self._start_pending_upload,
            ("PUT", "environments", "*", "versions", "*"): self._put_version,
            ("PUT", "codes", "*", "versions", "*"): self._put_version,
            ("PUT", "models", "*", "versions", "*"): self._put_version,
            ("PUT", "jobs", "*"): self._put_job,
            ("GET", "jobs", "*"): self._get_job,
            ("POST", "jobs", "*", "cancel"): self._cancel_job,
            ("GET", "onlineEndpoints", "*"): self._get_endpoint,
            ("PUT", "onlineEndpoints", "*"): self._put_endpoint,
            ("DELETE", "onlineEndpoints", "*"): self._delete_endpoint,
            ("POST", "onlineEndpoints", "*", "listKeys"): self._list_keys,
            ("GET", "onlineEndpoints", "*", "deployments"): self._list_deployments,
            ("GET", "onlineEndpoints", "*", "deployments", "*"): self._get_deployment,
            ("PUT", "onlineEndpoints", "*", "deployments", "*"): self._put_deployment,
            ("DELETE", "onlineEndpoints", "*", "deployments", "*"): self._delete_deployment,
            ("POST", "onlineEndpoints", "*", "deployments", "*", "getLogs"): self._get_logs,
            ("GET", "serverlessEndpoints", "*"): self._get_serverless_endpoint,
            ("PUT", "serverlessEndpoints", "*"): self._put_serverless_endpoint,
            ("DELETE", "serverlessEndpoints", "*"): self._delete_serverless_endpoint,
            ("POST", "serverlessEndpoints", "*", "listKeys"): self._serverless_keys,
        }
        handler = handlers.get(route)
        if handler is None:
            raise AssertionError(f"the fake Azure ML service does not know {call.method} {call.url}")
        return handler(call, parts)

    def _workspace(self, call, parts):
        prefix = self.workspace_path()
        if not self.workspace_exists:
            raise arm_error(404, "ResourceNotFound", f"The Resource '{PROVIDER}/workspaces/{self.workspace}' under "
                            f"resource group '{self.resource_group}' was not found.")
        return 200, {
            "id": prefix, "name": self.workspace, "type": f"{PROVIDER}/workspaces", "location": self.location,
            "tags": {}, "kind": "Default", "identity": {"type": "SystemAssigned"},
            "sku": {"name": "Basic", "tier": "Basic"},
            "properties": {
                "friendlyName": self.workspace, "workspaceId": WORKSPACE_ID, "provisioningState": "Succeeded",
                "storageAccount": f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}"
                                  f"/providers/Microsoft.Storage/storageAccounts/{STORAGE_ACCOUNT}",
                "discoveryUrl": f"https://{API_HOST}/discovery", "containerRegistry": self.registry_id(),
                "mlFlowTrackingUri": f"azureml://{API_HOST}/mlflow/v1.0{prefix}",
                "publicNetworkAccess": "Enabled", "v1LegacyMode": False, "hbiWorkspace": False}}, {}

    def _get_compute(self, call, parts):
        if parts[1] not in self.computes:
            raise arm_error(404, "NotFound", f"The compute {parts[1]} was not found in workspace {self.workspace}.")
        return 200, self.computes[parts[1]], {}

    def _put_compute(self, call, parts):
        """Cluster creation as recorded: 201, provisioningState Creating, vmSize upper-cased, Azure-AsyncOperation
        to computeOperationsStatus (polls say InProgress, then Succeeded); an update of an existing one answers 200."""
        name, body = parts[1], copy.deepcopy(call.json)
        creating = name not in self.computes
        inner = body["properties"].get("properties") or {}
        inner["vmSize"] = str(inner.get("vmSize", "")).upper()
        inner.update(currentNodeCount=None, targetNodeCount=None, allocationState=None, errors=None)
        properties = {**body["properties"], "properties": inner, "provisioningState": "Creating" if creating else "Updating",
                      "isAttachedCompute": False, "computeLocation": body.get("location") or self.location}
        self.computes[name] = self._resource(f"computes/{name}", name, "computes", properties,
                                             location=body.get("location") or self.location, tags=None)
        operation = Operation(finish=lambda: properties.update(provisioningState="Succeeded"))
        return self._start_operation(201 if creating else 200, self.computes[name], operation,
                                     status_path="computeOperationsStatus")

    def _subscription_level(self, call):
        """The subscription, its resource providers, the region's usages, the identity and role assignments (the
        preflight's GETs); None for a path that is none of them."""
        subscription = f"/subscriptions/{self.subscription_id}"
        path = call.path
        if path == subscription:  # Subscriptions_Get (azure-rest-api-specs, resources/.../getSubscription.json)
            return 200, {"id": subscription, "subscriptionId": self.subscription_id, "displayName": "Phi tests",
                         "state": self.subscription_state, "tenantId": TENANT_ID,
                         "subscriptionPolicies": {"locationPlacementId": "Public_2014-09-01", "quotaId": "PayAsYouGo_2014-09-01",
                                                  "spendingLimit": "Off"}}, {}
        match = re.fullmatch(rf"{subscription}/providers/([^/]+)", path, re.IGNORECASE)
        if match:  # Providers_Get (assumed body: the namespace and its registrationState, the fields read)
            namespace = match.group(1)
            state = "Registered" if namespace in self.registered_providers else "NotRegistered"
            return 200, {"id": f"{subscription}/providers/{namespace}", "namespace": namespace,
                         "registrationState": state, "registrationPolicy": "RegistrationRequired",
                         "resourceTypes": []}, {}
        match = re.fullmatch(rf"{subscription}/providers/{PROVIDER}/locations/([^/]+)/usages", path, re.IGNORECASE)
        if match:
            return 200, {"value": self._usages()}, {}
        identity = re.fullmatch(rf"{subscription}/resourceGroups/{self.resource_group}/providers/"
                                r"Microsoft\.ManagedIdentity/userAssignedIdentities/([^/]+)", path, re.IGNORECASE)
        if identity:  # UserAssignedIdentities_Get (assumed body: id, name, location, properties.{clientId,principalId,tenantId})
            found = self.identities.get(identity.group(1))
            if found is None:
                raise arm_error(404, "ResourceNotFound", f"The Resource 'Microsoft.ManagedIdentity/userAssignedIdentities/"
                                f"{identity.group(1)}' under resource group '{self.resource_group}' was not found.")
            return 200, {"id": path, "name": identity.group(1), "location": self.location,
                         "type": "Microsoft.ManagedIdentity/userAssignedIdentities",
                         "properties": {**found, "tenantId": TENANT_ID}}, {}
        if path.endswith("/providers/Microsoft.Authorization/roleAssignments"):
            return 200, {"value": self._role_assignments(path.rsplit("/providers/Microsoft.Authorization", 1)[0],
                                                         call.query.get("$filter", ""))}, {}
        return None

    def _usages(self):
        """Usage/list as the REST example answers it (stable/2024-04-01/examples/Usage/list.json): a row per VM
        family (type .../vmFamily/usages), its id naming the family with underscores."""
        rows = []
        for name, (current, limit) in self.quotas.items():
            rows.append({"id": f"/subscriptions/{self.subscription_id}/usages/{name.replace(' ', '_')}",
                         "type": f"{PROVIDER}/vmFamily/usages", "currentValue": current, "limit": limit,
                         "name": {"value": name, "localizedValue": name}, "unit": "Count"})
        rows.append({"id": f"/subscriptions/{self.subscription_id}/usages", "type": f"{PROVIDER}/dedicatedCores/usages",
                     "currentValue": 0, "limit": 100, "unit": "Count",
                     "name": {"value": "Total Cluster Dedicated Regional vCPUs",
                              "localizedValue": "Total Cluster Dedicated Regional vCPUs"}})
        return rows

    def _role_assignments(self, scope, query):
        """RoleAssignments_ListForScope with $filter=principalId eq '...': assignments at the scope or above it."""
        wanted = re.search(r"principalId eq '([^']+)'", query)
        return [{"id": f"{assigned}/providers/Microsoft.Authorization/roleAssignments/{uuid.uuid5(uuid.NAMESPACE_URL, assigned + role)}",
                 "type": "Microsoft.Authorization/roleAssignments", "name": str(uuid.uuid5(uuid.NAMESPACE_URL, assigned + role)),
                 "properties": {"roleDefinitionId": f"/subscriptions/{self.subscription_id}/providers/"
                                                    f"Microsoft.Authorization/roleDefinitions/{role}",
                                "principalId": principal, "principalType": "ServicePrincipal", "scope": assigned}}
                for assigned, principal, role in self.role_assignments
                if scope.lower().startswith(assigned.lower()) and (not wanted or wanted.group(1) == principal)]

    def _datastore_body(self, name):
        return self._resource(f"datastores/{name}", name, "datastores", {
            "datastoreType": "AzureBlob", "accountName": STORAGE_ACCOUNT, "containerName": self.datastores[name],
            "endpoint": "core.windows.net", "protocol": "https", "isDefault": name == "workspaceblobstore",
            "credentials": {"credentialsType": "AccountKey"},
            "serviceDataAccessAuthIdentity": "WorkspaceSystemAssignedIdentity", "tags": {}, "properties": {}})

    def _list_datastores(self, call, parts):
        names = [name for name in self.datastores
                 if call.query.get("isDefault", "").lower() != "true" or name == "workspaceblobstore"]
        return 200, {"value": [self._datastore_body(name) for name in names]}, {}

    def _get_datastore(self, call, parts):
        if parts[1] not in self.datastores:
            raise arm_error(404, "UserError", f"Datastore {parts[1]} not found.")
        return 200, self._datastore_body(parts[1]), {}

    def _datastore_secrets(self, call, parts):
        return 200, {"secretsType": "AccountKey", "key": base64.b64encode(b"fake-storage-account-key").decode()}, {}

    # --- versioned assets: environments, codes, models ---
    def _get_container(self, call, parts):
        versions = self.assets.get((parts[0], parts[1]))
        if not versions:
            raise arm_error(404, "UserError", f"Could not find asset with ID: azureml:{parts[1]}")
        latest = max(versions, key=lambda version: int(version) if version.isdigit() else 0)
        return 200, self._resource(f"{parts[0]}/{parts[1]}", parts[1], parts[0], {
            "latestVersion": latest, "nextVersion": str(int(latest) + 1) if latest.isdigit() else None,
            "isArchived": False, "provisioningState": "Succeeded", "tags": {}, "properties": {}}), {}

    def _get_version(self, call, parts):
        body = self.assets.get((parts[0], parts[1]), {}).get(parts[3])
        if body is None:
            raise arm_error(404, "UserError", f"Could not find asset with ID: azureml:{parts[1]}:{parts[3]}")
        return 200, body, {}

    def _put_version(self, call, parts):
        kind, name, version = parts[0], parts[1], parts[3]
        versions = self.assets.setdefault((kind, name), {})
        properties = copy.deepcopy(call.json["properties"])
        if version in versions:
            known = {key: value for key, value in versions[version]["properties"].items() if key in properties}
            if known != properties:  # asset versions are immutable
                raise arm_error(409, "UserError", f"Conflict: {kind[:-1]} {name}:{version} already exists "
                                "with different content; asset versions are immutable.")
            return 200, versions[version], {}
        properties.setdefault("isAnonymous", False)
        properties.setdefault("isArchived", False)
        properties["provisioningState"] = "Succeeded"
        if kind == "environments":
            properties.update(environmentType="UserCreated", osType="Linux", autoRebuild="OnBaseImageUpdate")
        if kind == "models":
            properties.update(self._resolve_model_uri(properties.get("modelUri") or ""))
            # the service reads an MLflow model's MLmodel file for its flavors
            properties.setdefault("flavors", {
                "python_function": {"data": {"loader_module": "mlflow.transformers", "python_version": "3.11.9"}},
                "transformers": {"data": {"task": "text-generation", "transformers_version": "5.23.0"}},
            } if properties.get("modelType") == "mlflow_model" else {})
            properties.setdefault("stage", "Development")
        versions[version] = self._resource(f"{kind}/{name}/versions/{version}", version, f"{kind}/versions",
                                           properties)
        return 201, versions[version], {}

    def _resolve_model_uri(self, uri):
        """The model registry turns a job output URI into the output's datastore path, and checks it has files."""
        match = re.fullmatch(r"azureml://jobs/([^/]+)/outputs/([^/]+)/?(?:paths/(.*))?", uri)
        if not match:
            return {}
        job, output, sub_path = match.group(1), match.group(2), match.group(3) or ""
        path = f"azureml/{job}/{output}/{sub_path}"
        if not any(container == self.datastores["workspaceblobstore"] and name.startswith(path)
                   for container, name in self.blobs):
            raise arm_error(400, "BadRequest", "The request is invalid.", [
                {"code": "ModelAssetPathNotFoundInStorage",
                 "message": f"No blobs found in storage at model asset path: {path}", "details": [],
                 "additionalInfo": []}])
        return {"modelUri": f"azureml://subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}"
                            f"/workspaces/{self.workspace}/datastores/workspaceblobstore/paths/{path}",
                "jobName": job}

    def _list_versions(self, call, parts):
        """An asset's versions, newest first; `hash` filters code by content (how the SDK finds code it uploaded)."""
        versions = list(self.assets.get((parts[0], parts[1]), {}).values())
        if "hash" in call.query:
            versions = [body for body in versions
                        if body["properties"].get("properties", {}).get("hash_sha256") == call.query["hash"]]
        versions.reverse()
        return 200, {"value": versions[:int(call.query.get("$top", len(versions)))]}, {}

    def _start_pending_upload(self, call, parts):
        """A temporary container and its SAS URI for a code upload (PendingUploadResponseDto)."""
        container = str(uuid.uuid4())
        blob_uri = f"https://{STORAGE_ACCOUNT}.blob.core.windows.net/{container}"
        return 200, {"pendingUploadId": str(uuid.uuid4()), "pendingUploadType": "TemporaryBlobReference",
                     "blobReferenceForConsumption": {
                         "blobUri": blob_uri,
                         "storageAccountArmId": f"/subscriptions/{self.subscription_id}/resourceGroups/"
                                                f"{self.resource_group}/providers/Microsoft.Storage/storageAccounts/"
                                                f"{STORAGE_ACCOUNT}",
                         "credential": {"credentialType": "SAS",
                                        "sasUri": f"{blob_uri}?sv=2021-10-04&se=2099-01-01T00%3A00%3A00Z&sr=c"
                                                  "&sp=rcwl&sig=ZmFrZQ%3D%3D"}}}, {}

    # --- jobs ---
    def _put_job(self, call, parts):
        name = parts[1]
        properties = copy.deepcopy(call.json["properties"])
        properties["outputs"] = {
            **(properties.get("outputs") or {}),
            "default": {"jobOutputType": "uri_folder", "mode": "ReadWriteMount",
                        "uri": f"azureml://datastores/workspaceartifactstore/ExperimentRun/dcid.{name}"}}
        for output_name, output in properties["outputs"].items():
            output.setdefault("uri", f"azureml://datastores/workspaceblobstore/paths/azureml/{name}/{output_name}/")
        properties.update(status="Starting", services={
            "Studio": {"jobServiceType": "Studio", "endpoint": self.studio_url(name)},
            "Tracking": {"jobServiceType": "Tracking", "endpoint": f"azureml://{API_HOST}/mlflow/v1.0"
                                                                    f"{self.workspace_path()}?"}})
        self.jobs[name] = self._resource(f"jobs/{name}", name, "jobs", properties)
        self._run_polls[name] = 0
        return 201, self.jobs[name], {}

    def studio_url(self, job_name):
        return f"https://ml.azure.com/runs/{job_name}?wsid={self.workspace_path()}"

    def _get_job(self, call, parts):
        if parts[1] not in self.jobs:
            raise arm_error(404, "UserError", f"The specified resource {parts[1]} was not found.")
        job = self.jobs[parts[1]]
        if job["properties"].get("jobType") == "FineTuning":  # serverless: the job's own GET says how it goes
            self._advance_finetuning_job(parts[1])
        return 200, job, {}

    def _advance_finetuning_job(self, name):
        """One step further through job_statuses per GET; on Completed, the fine-tuned model is registered in the
        workspace under the output's name (assumed: a first version "1", as Foundry shows it)."""
        polls = self._run_polls[name] = self._run_polls.get(name, 0) + 1
        status = self.job_statuses[min(polls - 1, len(self.job_statuses) - 1)]
        properties = self.jobs[name]["properties"]
        properties["status"] = status
        if status == "Failed" and self.job_error:
            properties["error"] = {"code": self.job_error["code"], "message": self.job_error["message"]}
        output = properties["outputs"].get("registered_model") or {}
        model = output.get("assetName")
        if status == "Completed" and model and ("models", model) not in self.assets:
            self.assets[("models", model)] = {"1": self._resource(f"models/{model}/versions/1", "1", "models/versions", {
                "modelType": "mlflow_model", "modelUri": f"azureml://jobs/{name}/outputs/registered_model",
                "jobName": name, "isArchived": False, "isAnonymous": False, "flavors": {}, "tags": {},
                "properties": {}, "provisioningState": "Succeeded", "stage": "Development"})}

    def _cancel_job(self, call, parts):
        job = self.jobs[parts[1]]
        job["properties"]["status"] = "CancelRequested"
        return self._start_operation(202, None, Operation(
            finish=lambda: job["properties"].update(status="Canceled")), location=True)

    # --- online endpoints and deployments ---
    def _endpoint_body(self, name, properties):
        properties.setdefault("properties", {})["azureml.onlineendpointid"] = (
            f"{self.workspace_path()}/onlineEndpoints/{name}".lower())
        properties.setdefault("publicNetworkAccess", "Enabled")
        body = self._resource(f"onlineEndpoints/{name}", name, "onlineEndpoints", properties,
                              location=self.location, kind="Managed", tags={})
        body["identity"] = {"type": "SystemAssigned", "principalId": str(uuid.uuid4()),
                            "tenantId": TENANT_ID}
        return body

    def _get_endpoint(self, call, parts):
        if parts[1] not in self.endpoints:
            raise arm_error(404, "UserError", f"Resource {PROVIDER}/workspaces/onlineEndpoints/{parts[1]} not found.")
        return 200, self.endpoints[parts[1]], {}

    def _put_endpoint(self, call, parts):
        name = parts[1]
        creating = name not in self.endpoints
        if creating and self.endpoint_create_error is not None:
            error, self.endpoint_create_error = self.endpoint_create_error, None
            raise error
        properties = copy.deepcopy(call.json["properties"])
        unknown = [deployment for deployment in properties.get("traffic") or {}
                   if (name, deployment) not in self.deployments]
        if unknown:
            raise arm_error(400, "BadArgument", f"Traffic cannot be set for deployments that do not exist: {unknown}")
        if creating:
            body = self._endpoint_body(name, properties)
            if call.json.get("identity"):
                body["identity"] = copy.deepcopy(call.json["identity"])
            body["properties"].update(provisioningState="Creating", scoringUri=None, swaggerUri=None)
            self.endpoints[name] = body
            self.endpoint_keys[name] = {"primaryKey": f"primary-key-of-{name}",
                                        "secondaryKey": f"secondary-key-of-{name}"}
        else:
            body = self.endpoints[name]
            body["properties"].update(properties, provisioningState="Updating")

        def finish():
            body["properties"].update(provisioningState="Succeeded", scoringUri=self.scoring_uri(name),
                                      swaggerUri=self.scoring_uri(name).replace("/score", "/swagger.json"))
        return self._start_operation(201 if creating else 200, body, Operation(finish=finish, progress="Updating"),
                                     location=True)

    def _delete_endpoint(self, call, parts):
        name = parts[1]
        if name not in self.endpoints:
            return 204, None, {}
        self.endpoints[name]["properties"]["provisioningState"] = "Deleting"

        def finish():
            self.endpoints.pop(name, None)
            for key in [key for key in self.deployments if key[0] == name]:
                del self.deployments[key]
        return self._start_operation(202, None, Operation(finish=finish), location=True)

    def _list_keys(self, call, parts):
        if parts[1] not in self.endpoints:
            raise arm_error(404, "UserError", f"Resource {PROVIDER}/workspaces/onlineEndpoints/{parts[1]} not found.")
        return 200, self.endpoint_keys[parts[1]], {}

    def _deployment_body(self, endpoint, name, properties):
        for key, value in DEPLOYMENT_DEFAULTS.items():  # what the service fills in when the request left it out
            properties.setdefault(key, copy.deepcopy(value))
        return self._resource(f"onlineEndpoints/{endpoint}/deployments/{name}", name,
                              "onlineEndpoints/deployments", properties, location=self.location, kind="Managed",
                              tags={}, sku={"name": "Default", "capacity": 1})

    def _list_deployments(self, call, parts):
        return 200, {"value": [body for (endpoint, _), body in self.deployments.items() if endpoint == parts[1]]}, {}

    def _get_deployment(self, call, parts):
        body = self.deployments.get((parts[1], parts[3]))
        if body is None:
            raise arm_error(404, "UserError", f"Deployment {parts[3]} not found in endpoint {parts[1]}.")
        return 200, body, {}

    def _put_deployment(self, call, parts):
        endpoint, name = parts[1], parts[3]
        if endpoint not in self.endpoints:
            raise arm_error(404, "UserError", f"Endpoint {endpoint} not found.")
        existing = self.deployments.get((endpoint, name))
        if existing and existing["properties"]["provisioningState"] == "Failed":
            # What Azure answers for an update of a deployment whose creation failed.
            raise arm_error(400, "BadRequest", f"Deployment {name} is in an unrecoverable state: delete it and "
                            "create it again.")
        properties = copy.deepcopy(call.json["properties"])
        properties["provisioningState"] = "Updating" if existing else "Creating"
        body = self._deployment_body(endpoint, name, properties)
        if call.json.get("sku"):
            body["sku"] = copy.deepcopy(call.json["sku"])
        self.deployments[(endpoint, name)] = body
        outcome = self.deployment_outcomes.pop(0) if self.deployment_outcomes else "Succeeded"
        if outcome == "Succeeded":
            operation = Operation(finish=lambda: properties.update(provisioningState="Succeeded"), progress="Updating")
        else:
            _, code, message = outcome
            operation = Operation(status="Failed", error={"code": code, "message": message}, progress="Updating",
                                  finish=lambda: properties.update(provisioningState="Failed"))
        body["properties"] = properties
        return self._start_operation(200 if existing else 201, body, operation, location=True)

    def _delete_deployment(self, call, parts):
        key = (parts[1], parts[3])
        if key not in self.deployments:
            return 204, None, {}
        if self.endpoints.get(parts[1], {}).get("properties", {}).get("traffic", {}).get(parts[3]):
            raise arm_error(400, "BadRequest", f"Deployment {parts[3]} has traffic; set its traffic to 0 first.")
        self.deployments[key]["properties"]["provisioningState"] = "Deleting"
        return self._start_operation(202, None, Operation(finish=lambda: self.deployments.pop(key, None)),
                                     location=True)

    # --- serverless endpoints (azure-rest-api-specs, stable/2024-04-01/examples/Workspace/ServerlessEndpoint) ---
    def _serverless_body(self, name, sent, state):
        """createOrUpdate.json's response: properties.authMode, inferenceEndpoint.uri, modelSettings, provisioningState;
        the Consumption sku and the location as sent."""
        return self._resource(f"serverlessEndpoints/{name}", name, "serverlessEndpoints", {
            "authMode": "Key", "provisioningState": state,
            "modelSettings": copy.deepcopy(sent["properties"].get("modelSettings") or {}),
            "inferenceEndpoint": {"uri": self.serverless_scoring_uri.format(name=name), "headers": {}},
            "contentSafety": {"contentSafetyStatus": "Enabled"}},
            location=sent.get("location") or self.location, tags=dict(sent.get("tags") or {}), kind="ServerlessEndpoint",
            sku=copy.deepcopy(sent.get("sku") or {"name": "Consumption"}))

    def _get_serverless_endpoint(self, call, parts):
        """get.json."""
        if parts[1] not in self.serverless_endpoints:
            raise arm_error(404, "UserError", f"Serverless endpoint {parts[1]} not found.")
        return 200, self.serverless_endpoints[parts[1]], {}

    def _put_serverless_endpoint(self, call, parts):
        """createOrUpdate.json: 201 for a new endpoint (200 for an update), then the operation (assumed: polled through
        Azure-AsyncOperation like the workspace's other long-running operations)."""
        name, creating = parts[1], parts[1] not in self.serverless_endpoints
        body = self._serverless_body(name, call.json, "Creating" if creating else "Updating")
        self.serverless_endpoints[name] = body
        operation = Operation(finish=lambda: body["properties"].update(provisioningState="Succeeded"))
        return self._start_operation(201 if creating else 200, body, operation)

    def _delete_serverless_endpoint(self, call, parts):
        """delete.json: 202 with Location, then gone."""
        if parts[1] not in self.serverless_endpoints:
            return 204, None, {}
        return self._start_operation(202, None, Operation(finish=lambda: self.serverless_endpoints.pop(parts[1], None)),
                                     location=True)

    def _serverless_keys(self, call, parts):
        """listKeys.json: {"primaryKey", "secondaryKey"}."""
        if parts[1] not in self.serverless_endpoints:
            raise arm_error(404, "UserError", f"Serverless endpoint {parts[1]} not found.")
        return 200, {"primaryKey": f"serverless-key-of-{parts[1]}", "secondaryKey": f"second-key-of-{parts[1]}"}, {}

    def _get_logs(self, call, parts):
        if (parts[1], parts[3]) not in self.deployments:
            raise arm_error(404, "UserError", f"Deployment {parts[3]} not found in endpoint {parts[1]}.")
        return 200, {"content": self.deployment_logs}, {}

    # --- long-running operations ---
    def _start_operation(self, status, body, operation, location=False, status_path="mfeOperationsStatus"):
        """Answer a PUT/DELETE/POST that starts an operation; polling its URL says how it goes."""
        operation_id = f"oe:{WORKSPACE_ID}:{next(self._ids):08d}-0000-0000-0000-000000000000"
        self.operations[operation_id] = operation
        base = f"https://{ARM_HOST}/subscriptions/{self.subscription_id}/providers/{PROVIDER}/locations/{self.location}"
        headers = {"Azure-AsyncOperation": f"{base}/{status_path}/{operation_id}?api-version=2023-04-01-preview",
                   "Retry-After": "0", "x-ms-async-operation-timeout": "PT1H"}
        if location:
            headers["Location"] = f"{base}/mfeOperationResults/{operation_id}?api-version=2023-04-01-preview"
        return status, body, headers

    def _operation(self, kind, operation_id):
        operation = self.operations.get(operation_id)
        if operation is None:
            raise arm_error(404, "NotFound", f"Operation {operation_id} not found.")
        if kind == "mfeOperationResults":
            return (202, None, {"Retry-After": "0"}) if not operation.done else (200, None, {})
        if operation.polls_left > 0:
            operation.polls_left -= 1
            status = operation.progress
        else:
            if not operation.done:
                operation.done = True
                if operation.finish:
                    operation.finish()
            status = operation.status
        if kind == "computeOperationsStatus":  # the recorded compute polls carry the status alone
            return 200, {"status": status}, {}
        body = {"id": f"/subscriptions/{self.subscription_id}/providers/{PROVIDER}/locations/{self.location}"
                      f"/mfeOperationsStatus/{operation_id}", "name": operation_id, "status": status,
                "startTime": _now()}
        if status != operation.progress:
            body["endTime"] = _now()
        if status == "Failed":
            body["error"] = {**operation.error, "details": [], "additionalInfo": []}
        return 200, body, {"Retry-After": "0"}

    # --- discovery and run history (the workspace's data plane) -----------------------------------------
    # --- the azureml registry (model catalogue, curated environments) ------------------------------------------------
    def registry_client(self):
        """A real MLClient for the azureml registry over this transport (discovery, then its data plane)."""
        from azure.ai.ml import MLClient

        return MLClient(credential=FakeCredential(), registry_name=REGISTRY, transport=self)

    def _registry_discovery(self, name):
        """Registry discovery as recorded (test_model.pyTestModeltest_create_get_download_model_registry.json)."""
        if name != REGISTRY:
            raise arm_error(404, "NotFound", f"Registry {name} not found.")
        return 200, {"registryId": "3b513a6b-0000-4000-8000-000000000001", "registryName": name, "tenantId": TENANT_ID,
                     "primaryRegion": self.location, "regions": [self.location],
                     "subscriptionId": REGISTRY_SUBSCRIPTION, "resourceGroup": REGISTRY_RESOURCE_GROUP,
                     "workspaceName": None, "primaryRegionResourceProviderUri": f"https://{REGISTRY_HOST}/",
                     "registryFqdns": {self.location: {"uri": f"https://{API_HOST}"}},
                     "intellectualPropertyPublisher": None}, {}

    def _registry(self, call):
        """The registry's models and environments: a version by number, or the versions list ($orderBy createdtime
        desc, $top=1: how the SDK resolves the label latest, as recorded). Archived versions are left out of the
        list (assumed: the default list view is active versions only)."""
        match = re.fullmatch(rf"/mferp/managementfrontend/subscriptions/[^/]+/resourceGroups/[^/]+/providers/{PROVIDER}"
                             r"/registries/([^/]+)/(models|environments)/([^/]+)/versions(?:/([^/]+))?", call.path)
        if call.method != "GET" or not match:
            raise AssertionError(f"the fake registry does not know {call.method} {call.url}")
        _, kind, name, version = match.groups()
        versions = self._registry_versions(kind, name)
        if version is None:
            listed = [body for body in versions if not body["properties"].get("isArchived")]
            return 200, {"value": listed[:int(call.query.get("$top", len(listed)))]}, {}
        found = [body for body in versions if body["name"] == version]
        if not found:
            raise arm_error(404, "UserError", f"Could not find asset with ID: azureml://registries/{REGISTRY}/"
                            f"{kind}/{name}/versions/{version}")
        return 200, found[0], {}

    def _registry_versions(self, kind, name):
        """The registry's versions of an asset, newest first, as ARM-shaped bodies."""
        def body(version, properties):
            return {"id": f"azureml://registries/{REGISTRY}/{kind}/{name}/versions/{version}", "name": version,
                    "type": f"{PROVIDER}/registries/{kind}/versions", "properties": properties,
                    "systemData": {"createdAt": _now(), "createdBy": "azureml", "createdByType": "Application"}}
        if kind == "models":
            entry = self.registry_models.get(name)
            if not entry:
                return []
            return [body(entry["version"], {"tags": dict(entry["tags"]), "properties": {}, "isArchived": entry["isArchived"],
                                            "isAnonymous": False, "modelType": "mlflow_model", "flavors": {},
                                            "modelUri": f"azureml://registries/{REGISTRY}/models/{name}/versions/"
                                                        f"{entry['version']}", "stage": "Production"})]
        return [body(version, {"image": f"mcr.microsoft.com/azureml/curated/{name}:{version}", "tags": {},
                               "properties": {}, "isArchived": False, "isAnonymous": False, "osType": "Linux"})
                for version in reversed(self.registry_environments.get(name, []))]

    def _api(self, call):
        if call.path == "/discovery":
            base = f"https://{API_HOST}"
            return 200, {"api": base, "catalog": base, "experimentation": base, "gallery": base,
                         "history": base, "hyperdrive": base, "labeling": base, "modelmanagement": base,
                         "pipelines": base, "studio": "https://ml.azure.com"}, {}
        match = re.fullmatch(r"/history/v1\.0/subscriptions/[^/]+/resourceGroups/[^/]+/providers/"
                             rf"{PROVIDER}/workspaces/[^/]+/runs/([^/]+)/details", call.path, re.IGNORECASE)
        if call.method == "GET" and match:
            return 200, self._run_details(match.group(1)), {}
        if call.method == "POST" and re.fullmatch(r"/history/v1\.0/subscriptions/[^/]+/resourceGroups/[^/]+/providers/"
                                                  rf"{PROVIDER}/workspaces/[^/]+/rundata", call.path, re.IGNORECASE):
            return self._run_data(call.json["runId"])
        raise AssertionError(f"the fake Azure ML service does not know {call.method} {call.url}")

    def _run_details(self, name):
        """Run history's view of a job: one step further through job_statuses on every request."""
        if name not in self.jobs:
            raise arm_error(404, "UserError", f"Run {name} was not found.")
        polls = self._run_polls[name] = self._run_polls.get(name, 0) + 1
        if self.interrupt_on_poll is not None and polls >= self.interrupt_on_poll:
            raise KeyboardInterrupt  # the user's Ctrl+C, while the SDK waits for this answer
        status = self.job_statuses[min(polls - 1, len(self.job_statuses) - 1)]
        self.jobs[name]["properties"]["status"] = status
        log = "\n".join(self.job_log_lines[:polls]) + "\n"
        self.add_blob("azureml", f"ExperimentRun/dcid.{name}/user_logs/std_log.txt", log)
        details = {"runId": name, "runUuid": str(uuid.uuid5(uuid.NAMESPACE_URL, name)), "status": status,
                   "target": self.jobs[name]["properties"].get("computeId", "").rsplit("/", 1)[-1],
                   "startTimeUtc": _now(), "warnings": [], "logFiles": {}, "properties": {}, "inputDatasets": [],
                   "outputDatasets": []}
        if status in TERMINAL_JOB_STATUSES:
            details["endTimeUtc"] = _now()
        if status == "Completed":
            self._put_model_output(name)
        if status == "Failed" and self.job_error:
            details["error"] = {"error": {"code": self.job_error["code"], "message": self.job_error["message"],
                                          "messageParameters": {}, "details": []},
                                "correlation": {"operation": str(uuid.uuid4()), "request": str(uuid.uuid4())},
                                "environment": self.location, "location": self.location, "time": _now(),
                                "componentName": "execution-service"}
        return details

    def _run_data(self, name):
        """GetRunDataResult: the run's metadata; outputs only once the job registered them (none here)."""
        if name not in self.jobs:
            raise arm_error(404, "UserError", f"Run {name} was not found.")
        status = self.jobs[name]["properties"]["status"]
        return 200, {"runMetadata": {"runId": name, "status": status, "outputs": {}, "properties": {}},
                     "runDefinition": None, "jobSpecification": None}, {}

    # --- blob storage (workspace datastores) ---------------------------------------------------------------
    def _blob(self, call):
        path = call.path.lstrip("/")
        container, _, name = path.partition("/")
        restype, comp = call.query.get("restype"), call.query.get("comp")
        if call.method == "GET" and restype == "container" and comp == "list":
            return self._list_blobs(container, call.query.get("prefix", ""))
        key = (container, name)
        blob = self.blobs.get(key)
        if call.method == "HEAD" or (call.method == "GET" and comp is None):
            if blob is None:
                return 404, b"", {"x-ms-error-code": "BlobNotFound"}
            headers = {"ETag": '"0x8DC0000000000000"', "Last-Modified": blob["modified"],
                       "x-ms-blob-type": "BlockBlob", "Accept-Ranges": "bytes",
                       "x-ms-creation-time": blob["modified"], "x-ms-server-encrypted": "true",
                       "Content-Type": "application/octet-stream",
                       **{f"x-ms-meta-{key}": value for key, value in blob["metadata"].items()}}
            content = blob["content"]
            if call.method == "HEAD":
                headers["Content-Length"] = str(len(content))
                return 200, b"", headers
            status, requested = 200, call.headers.get("x-ms-range") or call.headers.get("Range")
            if requested:
                start, _, end = requested.split("=", 1)[1].partition("-")
                end = min(int(end) if end else len(content) - 1, len(content) - 1)
                headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
                content, status = content[int(start):end + 1], 206
            return status, content, headers
        if call.method == "PUT" and comp == "metadata":
            if blob is None:
                return 404, b"", {"x-ms-error-code": "BlobNotFound"}
            blob["metadata"] = _metadata(call.headers)
            return 200, b"", {"ETag": '"0x8DC0000000000001"', "Last-Modified": _http_date()}
        if call.method == "PUT" and comp is None and call.headers.get("x-ms-blob-type") == "BlockBlob":
            self.add_blob(container, name, call.body, _metadata(call.headers))
            return 201, b"", {"ETag": '"0x8DC0000000000002"', "Last-Modified": _http_date(),
                              "Content-MD5": base64.b64encode(hashlib.md5(call.body).digest()).decode(),
                              "x-ms-request-server-encrypted": "true"}
        raise AssertionError(f"the fake blob storage does not know {call.method} {call.url}")

    def _list_blobs(self, container, prefix):
        names = sorted(name for (owner, name) in self.blobs if owner == container and name.startswith(prefix))
        escape = xml.sax.saxutils.escape
        items = "".join(
            f"<Blob><Name>{escape(name)}</Name><Properties><Last-Modified>{self.blobs[(container, name)]['modified']}"
            f"</Last-Modified><Etag>0x8DC0000000000000</Etag><Content-Length>"
            f"{len(self.blobs[(container, name)]['content'])}</Content-Length>"
            "<Content-Type>application/octet-stream</Content-Type><BlobType>BlockBlob</BlobType>"
            "<ServerEncrypted>true</ServerEncrypted></Properties><Metadata />"
            "<OrMetadata /></Blob>" for name in names)
        body = (f'<?xml version="1.0" encoding="utf-8"?><EnumerationResults ServiceEndpoint='
                f'"https://{STORAGE_ACCOUNT}.blob.core.windows.net/" ContainerName="{escape(container)}">'
                f"<Prefix>{escape(prefix)}</Prefix><Blobs>{items}</Blobs><NextMarker /></EnumerationResults>")
        return 200, body.encode(), {"Content-Type": "application/xml"}

    # --- the endpoint's scoring URI --------------------------------------------------------------------------
    def _score(self, call):
        endpoint = call.host.split(".", 1)[0]
        if endpoint not in self.endpoints or call.path != "/score":
            return 404, {"message": "Not found"}, {}
        if call.headers.get("Authorization") != f"Bearer {self.endpoint_keys[endpoint]['primaryKey']}":
            return 401, {"message": "Unauthorized"}, {}
        deployment = call.headers.get("azureml-model-deployment")
        if deployment and self.deployment_state(endpoint, deployment) != "Succeeded":
            return 404, {"message": f"No deployment {deployment} in a ready state"}, {}
        return 200, self.scoring_answer, {}
