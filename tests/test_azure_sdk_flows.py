"""setup_ml.py, deploy_model.py and cleanup.py against azure-ai-ml's own code, over a fake service at the HTTP layer.

Unlike tests/test_setup_ml_azure.py and tests/test_deploy_model_azure.py (an autospecced MLClient: our calls
checked against our own idea of the SDK), these run a real `azure.ai.ml.MLClient` (azure-ai-ml 1.35.2): its
request building, uploads, long-running-operation polling, job streaming, error mapping and entity parsing.
Only the network is replaced, by tests/azure_service.py's FakeAzureML, which also records every request, so a
test asserts what went over the wire. No socket is opened (a test that tries fails).

    .venv/bin/python -m pytest tests/test_azure_sdk_flows.py -q -p no:cacheprovider
"""

import json
import socket
from pathlib import Path

import pytest
from dotenv import dotenv_values

import azure_mocks
from azure_mocks import FAKE_DEPLOY_SETTINGS, FAKE_SUBSCRIPTION_ID, block_network, configure_azure, use_tmp_data
import azure_service
from azure_service import FakeAzureML, arm_error

import cleanup
import config  # azure_mocks puts the project folder on sys.path
from helpers.endpoint import smoke_request
import deploy_model
from helpers import job_record, preflight
from serverless import endpoint as serverless_endpoint, job as serverless_job
import setup_ml

pytestmark = [pytest.mark.filterwarnings(f) for f in (
    *azure_mocks.AZURE_WARNING_FILTERS,
    # azure-ai-ml's own calls into azure-storage-blob, deprecated there: the SDK's, not ours.
    "ignore:The use of a 'BlobProperties' instance for param blob is deprecated:DeprecationWarning",
    "ignore:content_as_bytes is deprecated:DeprecationWarning",
)]

JOB = "finetune-phi-sdk-test"
COMPUTE = "gpu-nc24s-a100-v4"
ENDPOINT = FAKE_DEPLOY_SETTINGS["AZURE_ENDPOINT_NAME"]
BLUE, GREEN = "finetune-phi-deployment-blue", "finetune-phi-deployment-green"
IDENTITY_ID = (f"/subscriptions/{FAKE_SUBSCRIPTION_ID}/resourceGroups/rg-phi3-tests"
               "/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id-phi3-tests")
# Pinned, so a developer's own .env or environment cannot change what these tests expect.
SETTINGS = {
    "AZURE_COMPUTE_NAME": COMPUTE,
    "AZURE_COMPUTE_INSTANCE_TYPE": "Standard_NC24ads_A100_v4",
    "AZURE_COMPUTE_LOCATION": "",
    "AZURE_ENVIRONMENT_NAME": "phi-3-training-environment",
    "AZURE_EXPERIMENT_NAME": "phi-3-fine-tuning",
    "USE_CPU_COMPUTE": False,
    "JOB_NAME": JOB,
    "INSTANCE_COUNT": 1,
    "PROCESSES_PER_NODE": 1,
    "AZURE_MODEL_NAME": "finetune-phi-3-5-mini",
    "AZURE_DEPLOYMENT_NAME": "finetune-phi-deployment",
    "AZURE_DEPLOYMENT_INSTANCE_TYPE": "Standard_E4s_v3",
    "AZURE_DEPLOYMENT_INSTANCE_COUNT": 1,
}
IMAGE_BUILD_FAILURE = "ImageBuildFailure: base image does not exist"
CONTAINER_CRASHED = "User container has crashed or terminated: Liveness probe failed. Please see troubleshooting guide."
SCORE_PY_ERROR = "ModuleNotFoundError: No module named 'transformers'"
NAME_TAKEN = ("There is already an endpoint with this name, Endpoint name needs to be unique within a region. "
              "Try some other name.")


def no_network(monkeypatch):
    """block_network, plus a list of the attempts: the SDK swallows some exceptions, so the test checks the list."""
    block_network(monkeypatch)
    attempts = []
    for owner, name in ((socket.socket, "connect"), (socket.socket, "connect_ex"), (socket, "getaddrinfo")):
        refuse = getattr(owner, name)

        def recorded(*args, _refuse=refuse, **kwargs):
            attempts.append(args)
            return _refuse(*args, **kwargs)

        monkeypatch.setattr(owner, name, recorded)
    return attempts


@pytest.fixture
def service(monkeypatch, tmp_path):
    """The fake service, and setup_ml / deploy_model / cleanup using a real MLClient over it (TARGET=azure)."""
    attempts = no_network(monkeypatch)
    configure_azure(monkeypatch, FAKE_DEPLOY_SETTINGS, **SETTINGS)
    monkeypatch.setattr(config, "AZURE_MANAGED_IDENTITY_RESOURCE_ID", IDENTITY_ID)  # derived at import
    use_tmp_data(monkeypatch, tmp_path)
    monkeypatch.setattr(config, "ENV_FILE", tmp_path / ".env")
    config.ENV_FILE.write_text("# my own settings\nTARGET=azure\n", encoding="utf-8")

    fake = FakeAzureML()
    fake.patch_blob_storage(monkeypatch)
    fake.patch_stream_waits(monkeypatch)
    client = fake.ml_client()
    for module in (setup_ml, deploy_model, cleanup):
        monkeypatch.setattr(module, "get_ml_client", lambda: client)
    monkeypatch.setattr(preflight, "get_registry_client", lambda name: fake.registry_client())  # the azureml registry
    yield fake
    assert not fake.unknown, f"requests the fake service does not know: {fake.unknown}"
    assert not attempts, f"network access attempted: {attempts}"


@pytest.fixture
def completed_job(service):
    """A fine-tuning job that completed in Azure (its model in outputs.model_output), recorded by setup_ml.py."""
    service.add_completed_job(JOB, compute=COMPUTE)
    job_record.record_job(JOB, "azure", "Completed", studio_url=service.studio_url(JOB),
                          workspace=config.AZURE_ML_WORKSPACE_NAME)
    return JOB


def run_main(capsys, module, *argv):
    """module.main(argv) -> (exit code, stdout, stderr)."""
    code = module.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def last_job():
    """outputs/last_job.json as setup_ml.py left it."""
    return json.loads(Path(config.LAST_JOB_FILE).read_text(encoding="utf-8"))


def index_of(calls, predicate, start=0):
    """The position of the first call from `start` on that matches `predicate` (fails the test if none)."""
    for position in range(start, len(calls)):
        if predicate(calls[position]):
            return position
    raise AssertionError(f"no such request after #{start}: {calls[start:]}")


def is_(method, path_end):
    """A predicate for index_of: this method, a path ending so."""
    return lambda call: call.method == method and call.path.endswith(path_end)


def datastore_blob(service, uri):
    """The bytes the SDK uploaded for an azureml://datastores/<name>/paths/<path> URI."""
    datastore, _, path = uri.removeprefix("azureml://datastores/").partition("/paths/")
    return service.blobs[(service.datastores[datastore], path)]["content"]


# --- setup_ml.py ---------------------------------------------------------------------------------------------
def test_job_submission_sends_environment_code_data_and_the_command(service, capsys):
    service.add_compute(COMPUTE)
    service.job_statuses = ["Queued", "Running", "Completed"]

    code, out, err = run_main(capsys, setup_ml)

    assert code == 0, err
    calls = service.calls(host_contains="management.azure.com")
    environment = index_of(calls, is_("PUT", "/environments/phi-3-training-environment/versions/1"))
    compute = index_of(calls, is_("GET", f"/computes/{COMPUTE}"))
    job = index_of(calls, is_("PUT", f"/jobs/{JOB}"))
    assert environment < compute < job
    assert not service.calls("PUT", "/computes/"), "an existing cluster must not be re-created"

    sent_environment = calls[environment].json["properties"]
    assert sent_environment["image"] == setup_ml.build_environment().image
    assert "trl==" in sent_environment["condaFile"]
    sent = calls[job].json["properties"]
    assert sent["jobType"] == "Command"
    assert sent["computeId"].endswith(f"/workspaces/ws-phi3-tests/computes/{COMPUTE}")
    assert sent["environmentId"] == calls[environment].path  # the version just registered, not a new one
    assert sent["command"].startswith("python fine_tune.py --config ${{inputs.recipe}} --train-file ${{inputs.train_file}}")
    assert "--model_output_dir ${{outputs.model_output}}" in sent["command"]
    assert sent["outputs"]["model_output"]["jobOutputType"] == "mlflow_model"
    assert sent["experimentName"] == "phi-3-fine-tuning"
    # Local files went to the workspace's blob storage before the job referenced them.
    assert service.calls("PUT", sent["codeId"].split("/workspaces/ws-phi3-tests", 1)[1])
    code_blobs = [name for (_, name) in service.blobs if name.endswith("finetuning_dir/fine_tune.py")]
    assert code_blobs, "finetuning_dir was not uploaded"
    for name, path in (("recipe", config.RECIPE), ("train_file", config.TRAIN_DATA_PATH),
                       ("eval_file", config.TEST_DATA_PATH)):  # the recipe travels like the data
        assert sent["inputs"][name]["jobInputType"] == "uri_file"
        assert datastore_blob(service, sent["inputs"][name]["uri"]) == Path(path).read_bytes()
    assert f"RunId: {JOB}" in out  # streamed by the SDK
    assert last_job()["status"] == "Completed"


def test_a_job_the_service_fails_exits_1_with_the_services_reason(service, capsys):
    service.add_compute(COMPUTE)
    service.job_statuses = ["Queued", "Preparing", "Failed"]
    service.job_error = {"code": "UserError", "message": IMAGE_BUILD_FAILURE}
    service.job_log_lines = ["Pulling the base image", "ERROR: manifest unknown"]

    code, out, err = run_main(capsys, setup_ml)

    assert code == 1
    assert f"Job {JOB} ended with status Failed" in err  # the status as Azure says it, not a Python enum
    assert IMAGE_BUILD_FAILURE in err  # only the SDK's JobException carries it
    assert "ERROR: manifest unknown" in err  # the log tail, downloaded from the workspace's artifact store
    assert last_job()["status"] == "Failed"
    assert not service.calls("POST", "/cancel")


def test_ctrl_c_while_streaming_leaves_the_job_running_and_deploy_waits_for_it(service, capsys):
    service.add_compute(COMPUTE)
    service.job_statuses = ["Queued", "Running", "Running", "Completed"]
    service.interrupt_on_poll = 3  # Ctrl+C while the SDK waits for run history's third answer

    try:  # the SDK raises JobException(...) from KeyboardInterrupt; a bare one escaping would stop pytest itself
        code, out, err = run_main(capsys, setup_ml)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped setup_ml.main()")

    assert code == 130, err
    assert "keeps running" in out
    assert f"az ml job cancel --name {JOB}" in out
    assert not service.calls("POST", "/cancel"), "Ctrl+C must not cancel the job"
    assert service.jobs[JOB]["properties"]["status"] == "Running"
    assert last_job()["status"] == "Running"  # what the service last said

    sent_before = len(service.calls_log)
    code, out, err = run_main(capsys, deploy_model)

    assert code == 1
    assert "still Running" in err and "deploy_model.py" in err
    assert "setup_ml.py" not in err, "rerunning setup_ml.py would start a second A100 job"
    assert len(service.calls_log) == sent_before, "nothing may be registered or deployed for an unfinished job"


# --- deploy_model.py -------------------------------------------------------------------------------------------
def test_a_failed_deployment_keeps_traffic_then_a_rerun_deletes_and_recreates_it(service, completed_job, capsys):
    service.deployment_outcomes = [("Failed", "ResourceNotReady", CONTAINER_CRASHED)]
    service.deployment_logs = "\n".join(["Starting AzureML Inference Server", "Traceback (most recent call last):",
                                         SCORE_PY_ERROR])

    code, out, err = run_main(capsys, deploy_model)

    assert code == 1
    assert CONTAINER_CRASHED in err
    assert SCORE_PY_ERROR in err  # the deployment's log tail
    calls = service.calls()
    created = index_of(calls, is_("PUT", f"/onlineEndpoints/{ENDPOINT}/deployments/{BLUE}"))
    index_of(calls, is_("POST", f"/deployments/{BLUE}/getLogs"), created)
    assert service.endpoints[ENDPOINT]["properties"]["traffic"] == {}
    assert len(service.calls("PUT", f"/onlineEndpoints/{ENDPOINT}")) == 2  # the endpoint, the deployment: no traffic
    assert service.deployment_state(ENDPOINT, BLUE) == "Failed"
    assert "AZURE_ML_API_KEY" not in dotenv_values(config.ENV_FILE)

    # azure-ai-ml returns the state as a DeploymentProvisioningState (a str Enum), not the string "Failed".
    rerun_from = len(service.calls_log)
    code, out, err = run_main(capsys, deploy_model)

    assert code == 0, err
    calls = service.calls()
    deleted = index_of(calls, is_("DELETE", f"/deployments/{BLUE}"), rerun_from)
    recreated = index_of(calls, is_("PUT", f"/deployments/{BLUE}"), deleted)
    smoke = index_of(calls, lambda call: call.path == "/score", recreated)
    traffic = index_of(calls, is_("PUT", f"/onlineEndpoints/{ENDPOINT}"), smoke)
    index_of(calls, is_("POST", f"/onlineEndpoints/{ENDPOINT}/listKeys"), traffic)
    assert calls[traffic].json["properties"]["traffic"] == {BLUE: 100}
    assert service.deployment_state(ENDPOINT, BLUE) == "Succeeded"
    written = dotenv_values(config.ENV_FILE)
    assert written["AZURE_ML_ENDPOINT"] == service.scoring_uri(ENDPOINT)
    assert written["AZURE_ML_API_KEY"] == service.endpoint_keys[ENDPOINT]["primaryKey"]
    assert written["TARGET"] == "azure"  # the user's own lines are kept


def test_a_taken_endpoint_name_names_the_setting_and_deploys_nothing(service, completed_job, capsys):
    validation = {"errors": {"": [NAME_TAKEN]}, "type": "https://tools.ietf.org/html/rfc7231#section-6.5.1",
                  "title": "One or more validation errors occurred.", "status": 400,
                  "traceId": "00-5e6f2b3c8d1a4f0e9b7c6d5a4b3c2d1e-1a2b3c4d5e6f7a8b-01"}
    service.endpoint_create_error = arm_error(400, "BadRequest", "The request is invalid.", [
        {"code": "InferencingClientCallFailed", "message": json.dumps(validation), "details": [],
         "additionalInfo": []}])

    code, out, err = run_main(capsys, deploy_model)

    assert code == 1
    assert "AZURE_ENDPOINT_NAME" in err and "choose another" in err
    assert "Traceback" not in err + out
    assert service.calls("PUT", f"/onlineEndpoints/{ENDPOINT}"), "the endpoint creation was not even tried"
    assert not service.calls(path_contains="/deployments/"), "no deployment may be requested"
    assert ENDPOINT not in service.endpoints


def test_green_is_smoke_tested_then_given_the_traffic_then_keys_are_written(service, completed_job, capsys):
    service.add_endpoint(ENDPOINT, traffic={BLUE: 100}, deployments={BLUE: "Succeeded"})

    code, out, err = run_main(capsys, deploy_model, "--keep-previous")

    assert code == 0, err
    calls = service.calls()
    deployed = index_of(calls, is_("PUT", f"/onlineEndpoints/{ENDPOINT}/deployments/{GREEN}"))
    smoke = index_of(calls, lambda call: call.path == "/score", deployed)
    traffic = index_of(calls, is_("PUT", f"/onlineEndpoints/{ENDPOINT}"), smoke)
    keys = index_of(calls, is_("POST", f"/onlineEndpoints/{ENDPOINT}/listKeys"), traffic)
    assert not service.calls("PUT", f"/deployments/{BLUE}"), "the serving slot must not be touched"

    deployment = calls[deployed].json
    assert deployment["sku"] == {"name": "Default", "capacity": 1}
    assert deployment["properties"]["instanceType"] == "Standard_E4s_v3"
    assert deployment["properties"]["codeConfiguration"]["scoringScript"] == "score.py"
    assert deployment["properties"]["model"].endswith("/models/finetune-phi-3-5-mini/versions/1")
    assert any(name.endswith("scoring_dir/score.py") for (_, name) in service.blobs), "score.py was not uploaded"

    request = calls[smoke]
    assert request.host == f"{ENDPOINT}.eastus2.inference.ml.azure.com"
    assert request.headers["azureml-model-deployment"] == GREEN  # straight to green, not through the traffic split
    assert request.headers["Authorization"] == f"Bearer {service.endpoint_keys[ENDPOINT]['primaryKey']}"
    assert request.json == smoke_request()  # the contract's smoke question (helpers/endpoint.py)
    assert "'an answer'" in out

    # deploy_model sets {green: 100, blue: 0}; azure-ai-ml strips the zero entries before sending.
    assert calls[traffic].json["properties"]["traffic"] == {GREEN: 100}
    assert service.endpoints[ENDPOINT]["properties"]["traffic"] == {GREEN: 100}
    assert keys == max(index for index, call in enumerate(calls) if call.path.endswith("/listKeys"))
    written = dotenv_values(config.ENV_FILE)
    assert written["AZURE_ML_ENDPOINT"] == service.scoring_uri(ENDPOINT)
    assert written["AZURE_ML_API_KEY"] == service.endpoint_keys[ENDPOINT]["primaryKey"]
    assert not service.calls("DELETE"), "--keep-previous keeps blue for a rollback"
    assert service.deployment_state(ENDPOINT, BLUE) == "Succeeded"


def test_the_previous_slot_is_deleted_once_the_new_one_has_the_traffic(service, completed_job, capsys):
    service.add_endpoint(ENDPOINT, traffic={BLUE: 100}, deployments={BLUE: "Succeeded"})

    code, out, err = run_main(capsys, deploy_model)

    assert code == 0, err
    calls = service.calls()
    traffic = index_of(calls, is_("PUT", f"/onlineEndpoints/{ENDPOINT}"))
    index_of(calls, is_("DELETE", f"/onlineEndpoints/{ENDPOINT}/deployments/{BLUE}"), traffic)
    assert service.deployment_state(ENDPOINT, BLUE) is None
    assert service.deployment_state(ENDPOINT, GREEN) == "Succeeded"
    assert service.endpoints[ENDPOINT]["properties"]["traffic"] == {GREEN: 100}


def test_an_endpoint_still_updating_is_named_with_azures_state_and_left_alone(service, completed_job, capsys):
    service.add_endpoint(ENDPOINT, traffic={BLUE: 100}, deployments={BLUE: "Succeeded"})
    service.endpoints[ENDPOINT]["properties"]["provisioningState"] = "Updating"

    code, out, err = run_main(capsys, deploy_model)

    assert code == 1
    # azure-ai-ml returns the state as an EndpointProvisioningState (a str Enum): the user reads Azure's word.
    assert f"Endpoint {ENDPOINT} is still Updating" in err
    assert not service.calls("PUT", "/onlineEndpoints/") and not service.calls("DELETE")


def test_a_job_streamed_to_completion_is_then_deployed(service, capsys):
    service.job_statuses = ["Queued", "Running", "Completed"]

    assert run_main(capsys, setup_ml)[0] == 0
    code, out, err = run_main(capsys, deploy_model)

    assert code == 0, err
    registered = service.calls("PUT", "/models/finetune-phi-3-5-mini/versions/1")[0].json["properties"]
    assert registered["modelUri"] == f"azureml://jobs/{JOB}/outputs/model_output"
    assert registered["modelType"] == "mlflow_model"
    assert service.endpoints[ENDPOINT]["properties"]["traffic"] == {BLUE: 100}


# --- cleanup.py ----------------------------------------------------------------------------------------------------
def test_cleanup_deletes_the_endpoint_and_says_so(service, capsys):
    service.add_endpoint(ENDPOINT, traffic={BLUE: 100}, deployments={BLUE: "Succeeded"})

    code, out, err = run_main(capsys, cleanup, "--yes")

    assert code == 0, err
    assert [call.path.rsplit("/", 2)[-2:] for call in service.calls("DELETE")] == [["onlineEndpoints", ENDPOINT]]
    assert ENDPOINT not in service.endpoints
    assert f"endpoint {ENDPOINT}: deleted" in out


def test_cleanup_of_an_endpoint_already_gone_deletes_nothing(service, capsys):
    code, out, err = run_main(capsys, cleanup, "--yes")

    assert code == 0, err
    assert not service.calls("DELETE")
    assert f"endpoint {ENDPOINT}: not found" in out


# --- A first run: the cluster is created (issue 23) ---------------------------------------------------------------
def test_a_first_run_creates_the_cluster_and_waits_for_it_as_recorded(service, capsys):
    service.job_statuses = ["Queued", "Running", "Completed"]

    code, out, err = run_main(capsys, setup_ml)

    assert code == 0, err
    (put,) = service.calls("PUT", f"/computes/{COMPUTE}")
    sent = put.json["properties"]
    assert sent["computeType"] == "AmlCompute" and sent["properties"]["vmSize"] == "Standard_NC24ads_A100_v4"
    assert sent["properties"]["scaleSettings"]["minNodeCount"] == 0
    polls = service.calls("GET", "/computeOperationsStatus/")
    assert polls, "the SDK waited on the operation the 201 named"
    assert service.computes[COMPUTE]["properties"]["provisioningState"] == "Succeeded"
    calls = service.calls_log
    assert index_of(calls, is_("PUT", f"/computes/{COMPUTE}")) < index_of(calls, lambda c: c.method == "PUT" and "/jobs/" in c.path)
    assert f"Creating compute cluster {COMPUTE}" in out


# --- The preflight against the fake service (issue 23) -------------------------------------------------------------
def test_check_prints_each_check_against_the_service_and_sends_nothing(service, capsys):
    code, out, err = run_main(capsys, setup_ml, "--check")

    assert code == 0, err
    assert "ok    sign-in: subscription Phi tests" in out
    assert "ok    providers: Microsoft.MachineLearningServices, Microsoft.ContainerRegistry registered" in out
    assert "ok    workspace: ws-phi3-tests in eastus2" in out
    assert ("ok    training quota: 24 vCPUs of Standard NCADSA100v4 Family Cluster Dedicated vCPUs needed, 24 free of 24"
            in out)
    assert "ok    training image: acft-hf-nlp-gpu:124 listed in the azureml registry" in out
    assert not [call for call in service.calls_log if call.method != "GET"], "a check must not change anything"


def test_deploy_check_prints_quota_identity_and_what_cannot_be_checked(service, capsys):
    code, out, err = run_main(capsys, deploy_model, "--check")

    assert code == 0, err
    # One Standard_E4s_v3: ceil(1 x 1.2) = 2 instances x 4 vCPUs.
    assert "ok    deployment quota: 8 vCPUs of Standard ESv3 Family Cluster Dedicated vCPUs needed" in out
    assert "ok    managed identity: id-phi3-tests found; AcrPull on the workspace's container registry; " \
           "Storage Blob Data Reader on the workspace's storage account" in out
    assert "n/a   inference image: mcr.microsoft.com/azureml/minimal-py312-inference:latest is not a curated" in out
    assert not [call for call in service.calls_log if call.method != "GET"]


@pytest.mark.parametrize("change, says", [
    (lambda s: s.quotas.update({"Standard NCADSA100v4 Family Cluster Dedicated vCPUs": (0, 0)}),
     "24 vCPUs needed (Standard_NC24ads_A100_v4), 0 free of 0: request more in the Azure portal"),
    (lambda s: s.registered_providers.discard("Microsoft.MachineLearningServices"),
     "`az provider register --namespace Microsoft.MachineLearningServices`"),
    (lambda s: setattr(s, "subscription_state", "Disabled"), "is Disabled: re-enable it"),
    (lambda s: setattr(s, "workspace_exists", False), "`az ml workspace list -g rg-phi3-tests -o table`"),
], ids=["quota", "provider", "subscription", "workspace"])
def test_each_refusal_stops_step_2_before_anything_is_billed(service, capsys, change, says):
    change(service)

    code, out, err = run_main(capsys, setup_ml)

    assert code == 1 and says in err and "FAIL" in out
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    assert not [call for call in service.calls_log if call.method in ("PUT", "POST", "DELETE")], "nothing billed"


def test_not_signed_in_is_the_one_refusal_and_nothing_else_is_asked(service, monkeypatch, capsys):
    from azure.ai.ml import MLClient
    from azure.identity import CredentialUnavailableError

    class SignedOut:
        def get_token(self, *scopes, **kwargs):
            raise CredentialUnavailableError("Please run 'az login' to set up an account")

    client = MLClient(credential=SignedOut(), subscription_id=service.subscription_id,
                      resource_group_name=service.resource_group, workspace_name=service.workspace, transport=service)
    monkeypatch.setattr(setup_ml, "get_ml_client", lambda: client)

    code, out, err = run_main(capsys, setup_ml, "--check")

    assert code == 1 and "run `az login`" in err and "FAIL  sign-in" in out
    assert out.count("not asked: needs the sign-in") == 4
    assert not service.calls_log, "nothing reached Azure without a token"


def test_a_gpu_deployment_checks_its_curated_cuda_image(service, monkeypatch, capsys):
    monkeypatch.setattr(config, "AZURE_DEPLOYMENT_INSTANCE_TYPE", "Standard_NC4as_T4_v3")
    service.quotas["Standard NCASv3_T4 Family Cluster Dedicated vCPUs"] = (0, 8)
    service.registry_environments["minimal-py312-cuda12.4-inference"] = []  # no longer listed

    code, out, err = run_main(capsys, deploy_model, "--check")

    assert code == 1 and "no longer lists environment minimal-py312-cuda12.4-inference version latest" in err
    assert "set AZURE_GPU_INFERENCE_IMAGE in .env" in err
    assert "ok    deployment quota: 8 vCPUs of Standard NCASv3_T4 Family Cluster Dedicated vCPUs needed" in out


def test_a_curated_image_no_longer_listed_is_refused_with_the_command(service, capsys):
    service.registry_environments["acft-hf-nlp-gpu"] = ["130"]  # 124 no longer listed

    code, out, err = run_main(capsys, setup_ml)

    assert code == 1 and "no longer lists environment acft-hf-nlp-gpu version 124" in err
    assert "az ml environment list --registry-name azureml --name acft-hf-nlp-gpu" in err
    assert not service.calls("PUT")


@pytest.mark.parametrize("change, says", [
    (lambda s: s.identities.clear(), "az identity create -n id-phi3-tests -g rg-phi3-tests"),
    (lambda s: s.identities[azure_service.IDENTITY].update(clientId="99999999-0000-0000-0000-000000000000"),
     "set AZURE_MANAGED_IDENTITY_CLIENT_ID in .env"),
    (lambda s: s.role_assignments.pop(0), '--role "AcrPull" --scope /subscriptions/'),
], ids=["no-identity", "wrong-client-id", "no-acrpull"])
def test_an_identity_that_cannot_pull_stops_step_3_before_anything_is_registered(service, completed_job, capsys,
                                                                                  change, says):
    change(service)

    code, out, err = run_main(capsys, deploy_model)

    assert code == 1 and says in err
    assert not service.calls("PUT"), "no model registered, no endpoint created"


def test_blue_green_needs_quota_for_both_slots(service, completed_job, capsys):
    service.add_endpoint(ENDPOINT, traffic={BLUE: 100}, deployments={BLUE: "Succeeded"})
    service.quotas["Standard ESv3 Family Cluster Dedicated vCPUs"] = (8, 20)  # blue holds 8 of 20

    code, out, err = run_main(capsys, deploy_model)

    assert code == 1 and "16 vCPUs needed (Standard_E4s_v3), 12 free of 20" in err
    assert not service.calls("PUT")


def test_endpoint_and_deployment_creation_follow_the_recorded_operation_shapes(service, completed_job, capsys):
    code, out, err = run_main(capsys, deploy_model)

    assert code == 0, err
    polls = [call for call in service.calls("GET", "/mfeOperationsStatus/")]
    assert polls, "the SDK polled Azure-AsyncOperation"
    assert service.deployment_state(ENDPOINT, BLUE) == "Succeeded"


def test_the_jobs_measured_speed_sets_concurrency_and_probes(service, capsys):
    # 50 tokens/s: a full request (4 x 128 tokens) takes ~10 s; 8 admitted (16 in flight) finish within 180 s.
    service.export_record = {"chosen": "int4", "candidates": {"int4": {"tokens_per_second": 50.0}}}
    service.add_completed_job(JOB, compute=COMPUTE)
    job_record.record_job(JOB, "azure", "Completed", studio_url=service.studio_url(JOB))

    code, out, err = run_main(capsys, deploy_model)

    assert code == 0, err
    sent = service.calls("PUT", f"/deployments/{BLUE}")[0].json["properties"]
    assert sent["requestSettings"]["maxConcurrentRequestsPerInstance"] == 8
    assert sent["livenessProbe"]["initialDelay"] == sent["readinessProbe"]["initialDelay"] == "PT10S"
    assert "onnxruntime-genai at 50 tokens/s (measured by the job (int4 ONNX export" in out


# --- The serverless road over HTTP (issue 23) -----------------------------------------------------------------------
SERVERLESS_JOB = "finetune-phi-serverless-http"


@pytest.fixture
def serverless_service(monkeypatch, tmp_path):
    """TARGET=serverless with a real MLClient (and registry client) over the fake service; the smoke request (sent
    with requests, not through azure-core) is recorded instead of sent."""
    attempts = no_network(monkeypatch)
    azure_mocks.configure_serverless(monkeypatch, tmp_path)
    fake = FakeAzureML()
    fake.patch_blob_storage(monkeypatch)
    client = fake.ml_client()
    for module in (serverless_job, serverless_endpoint):
        monkeypatch.setattr(module, "get_ml_client", lambda: client)
    monkeypatch.setattr(serverless_job, "get_registry_client", lambda name: fake.registry_client())
    fake.smoke_requests = []
    monkeypatch.setattr(serverless_endpoint, "smoke_test",
                        lambda url, key: fake.smoke_requests.append((url, key)) or "Bill Gates and Paul Allen.")
    yield fake
    assert not fake.unknown, f"requests the fake service does not know: {fake.unknown}"
    assert not attempts, f"network access attempted: {attempts}"


def test_the_serverless_road_end_to_end_over_http(serverless_service, capsys):
    serverless_service.job_statuses = ["Queued", "Running", "Completed"]

    code, out, err = run_main(capsys, setup_ml, "--job-name", SERVERLESS_JOB)

    assert code == 0, err
    (put,) = serverless_service.calls("PUT", f"/jobs/{SERVERLESS_JOB}")
    sent = put.json["properties"]
    assert sent["jobType"] == "FineTuning" and "computeId" not in sent  # no compute: serverless
    assert json.dumps(sent).count("azureml://registries/azureml/models/Phi-4-mini-instruct/versions/7") == 1
    assert "ok    base model: Phi-4-mini-instruct version 7 live; offered in eastus2" in out
    record = last_job()
    assert record["status"] == "Completed" and record["registered_model"]["version"] == "1"

    code, out, err = run_main(capsys, deploy_model)

    assert code == 0, err
    (put,) = serverless_service.calls("PUT", "/serverlessEndpoints/")
    model = record["registered_model"]["name"]
    assert put.json["properties"] == {"modelSettings": {"modelId": f"azureml://locations/eastus2/workspaces/"
                                                                    f"{azure_service.WORKSPACE_ID}/models/{model}/versions/1"}}
    assert put.json["sku"] == {"name": "Consumption"}
    assert serverless_service.calls("POST", "/listKeys")
    endpoint = config.SERVERLESS_ENDPOINT_NAME
    (url, key), = serverless_service.smoke_requests
    assert url == f"https://{endpoint}.eastus2.models.ai.azure.com/v1/chat/completions"
    env = dotenv_values(config.ENV_FILE)
    assert (env["AZURE_ML_ENDPOINT"], env["AZURE_ML_API_KEY"]) == (url, f"serverless-key-of-{endpoint}")


def test_a_retired_model_over_http_is_refused_before_any_job(serverless_service, monkeypatch, capsys):
    monkeypatch.setattr(config, "SERVERLESS_BASE_MODEL", "Phi-3.5-mini-instruct")  # archived: no latest version listed

    code, out, err = run_main(capsys, setup_ml, "--job-name", SERVERLESS_JOB)

    assert code == 1 and "no longer lists Phi-3.5-mini-instruct" in err
    assert "SERVERLESS_BASE_MODEL=Phi-4-mini-instruct" in err
    assert not serverless_service.calls("PUT"), "no upload, no job"


def test_a_pinned_retired_version_over_http_is_refused_by_its_retirement_date(serverless_service, monkeypatch, capsys):
    monkeypatch.setattr(config, "SERVERLESS_BASE_MODEL", "Phi-3.5-mini-instruct")
    monkeypatch.setattr(config, "SERVERLESS_BASE_MODEL_VERSION", "6")  # still there by number; its tags say retired

    code, out, err = run_main(capsys, setup_ml, "--job-name", SERVERLESS_JOB)

    assert code == 1 and "retired for serverless fine-tuning on 2025-08-30" in err
    assert "SERVERLESS_BASE_MODEL=Phi-4-mini-instruct" in err
    assert not serverless_service.calls("PUT")
