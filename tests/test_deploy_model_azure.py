"""deploy_model.py and cleanup.py with TARGET=azure: what they hand to azure-ai-ml, checked offline.

The MLClient is an autospecced mock (tests/azure_mocks.py): a wrong method or argument fails. Its
online_endpoints behave like the service (serve_online_endpoints): an endpoint exists or not, keeps its
traffic, has a scoring URI and keys. Nothing here signs in or opens a connection.
"""

import io
import json
import os
import re
import stat
import subprocess
import sys
from types import SimpleNamespace
from unittest import mock

import pytest
import yaml

import azure_mocks
from azure_mocks import (
    FAKE_DEPLOY_SETTINGS,
    FAKE_SUBSCRIPTION_ID,
    PROJECT_DIR,
    block_network,
    configure_azure,
    endpoint_round_trip,
    failing_poller,
    forbid_ml_client,
    mock_ml_client,
    only_call_arg,
    patch_get_ml_client,
    poller,
    schema_round_trip,
    serve_online_endpoints,
    validated_yaml_blocks,
)

# azure_mocks imported azure.ai.ml with its import-time warnings silenced; these imports are quiet.
from azure.ai.ml import load_model, load_online_deployment, load_online_endpoint
from azure.ai.ml.entities import ManagedIdentityConfiguration, ManagedOnlineDeployment, ManagedOnlineEndpoint, Model
from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ResourceNotFoundError

from helpers import azure_ml
import cleanup
import config  # azure_mocks puts the project folder on sys.path
import deploy_model
from helpers import job_record

pytestmark = [pytest.mark.filterwarnings(f) for f in azure_mocks.AZURE_WARNING_FILTERS]

JOB = "finetune-phi-20260101-120000"
ENDPOINT = FAKE_DEPLOY_SETTINGS["AZURE_ENDPOINT_NAME"]
BLUE, GREEN = "finetune-phi-deployment-blue", "finetune-phi-deployment-green"
KEY = "pRiMaRy-KeY-d3adb33f-never-printed"
SECONDARY_KEY = "sEcOnDaRy-KeY-never-written"
IDENTITY_ID = (f"/subscriptions/{FAKE_SUBSCRIPTION_ID}/resourceGroups/rg-phi3-tests"
               "/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id-phi3-tests")
SCORING_URI = azure_mocks.scoring_uri(ENDPOINT)
GOOD_ANSWER = json.dumps(["Bill Gates and Paul Allen founded Microsoft."])  # invoke() returns the body as text
# The defaults config.py has with no environment and no .env (test_config_defaults checks they are);
# pinned so a developer's own settings cannot change what these tests expect.
DEPLOY_DEFAULTS = {
    "AZURE_MODEL_NAME": "finetune-phi-3-5-mini",
    "AZURE_DEPLOYMENT_NAME": "finetune-phi-deployment",
    "AZURE_DEPLOYMENT_INSTANCE_TYPE": "Standard_E4s_v3",
    "AZURE_DEPLOYMENT_INSTANCE_COUNT": 1,
    "AZURE_INFERENCE_IMAGE": "mcr.microsoft.com/azureml/minimal-py312-inference:latest",
    "AZURE_GPU_INFERENCE_IMAGE": "mcr.microsoft.com/azureml/curated/minimal-py312-cuda12.4-inference:latest",
    "AZURE_DEPLOYMENT_HAS_GPU": "auto",
    "SERVING_RUNTIME": "auto",
    "MAX_CONCURRENT_REQUESTS_PER_INSTANCE": 3,
    "REQUEST_TIMEOUT_MS": 180000,
    "AZURE_COMPUTE_NAME": "gpu-nc24s-a100-v4",
}
ENV_BEFORE = "# my own settings\nTARGET=azure\nAZURE_ML_WORKSPACE_NAME=ws-phi3-tests\n"
DEPLOYMENT_LOG = ["Starting AzureML Inference Server", "Traceback (most recent call last):",
                  "safetensors_rust.SafetensorError: Error while deserializing header: incomplete metadata"]


@pytest.fixture
def azure(monkeypatch, tmp_path):
    """TARGET=azure, filled-in settings, a Completed Azure job in last_job.json, a .env with lines of its own."""
    configure_azure(monkeypatch, FAKE_DEPLOY_SETTINGS, **DEPLOY_DEFAULTS)
    monkeypatch.setattr(config, "AZURE_MANAGED_IDENTITY_RESOURCE_ID", IDENTITY_ID)  # derived at import
    monkeypatch.setattr(config, "LAST_JOB_FILE", tmp_path / "outputs" / "last_job.json")
    monkeypatch.setattr(config, "ENV_FILE", tmp_path / ".env")
    config.ENV_FILE.write_text(ENV_BEFORE, encoding="utf-8")
    job_record.record_job(JOB, "azure", "Completed", studio_url=azure_mocks.studio_url(JOB))
    return SimpleNamespace(env_file=config.ENV_FILE, last_job=config.LAST_JOB_FILE)


@pytest.fixture
def service(monkeypatch, azure):
    """The mocked MLClient deploy_model and cleanup get, with an endpoint that serves blue at 100%."""
    azure_mocks.skip_preflight(monkeypatch)  # run against the fake service in tests/test_azure_sdk_flows.py
    client = mock_ml_client()
    endpoints = serve_online_endpoints(client, {ENDPOINT: {BLUE: 100}}, primary_key=KEY, secondary_key=SECONDARY_KEY)
    client.online_endpoints.invoke.return_value = GOOD_ANSWER
    client.online_deployments.get_logs.return_value = "\n".join(DEPLOYMENT_LOG)
    patch_get_ml_client(monkeypatch, deploy_model, client)
    patch_get_ml_client(monkeypatch, cleanup, client)
    return SimpleNamespace(client=client, endpoints=endpoints)


def run_main(capsys, *argv, module=deploy_model):
    """module.main(argv) -> (exit code, stdout, stderr)."""
    code = module.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def deployed(client):
    """The deployment entity passed to online_deployments.begin_create_or_update."""
    return only_call_arg(client.online_deployments.begin_create_or_update)


def endpoint_updates(client):
    """The endpoints passed to online_endpoints.begin_create_or_update, in order."""
    return [args[0] for args, _kwargs in client.online_endpoints.begin_create_or_update.call_args_list]


def file_mode(path):
    """A file's permission bits."""
    return stat.S_IMODE(os.stat(path).st_mode)


# --- Settings config.py derives at import: run in a clean interpreter --------------------------------
def test_config_defaults(tmp_path):
    names = sorted(DEPLOY_DEFAULTS) + ["AZURE_MANAGED_IDENTITY_RESOURCE_ID"]
    env = {k: v for k, v in os.environ.items() if not (k.isupper() and hasattr(config, k))}  # no leaked settings
    env.update(FINETUNE_PHI_ENV_FILE=str(tmp_path / "absent.env"), **FAKE_DEPLOY_SETTINGS)
    code = f"import config, json; print(json.dumps({{n: getattr(config, n) for n in {names!r}}}))"
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_DIR, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {**DEPLOY_DEFAULTS, "AZURE_MANAGED_IDENTITY_RESOURCE_ID": IDENTITY_ID}


# --- Which job, which model -----------------------------------------------------------------------------
def test_model_is_registered_from_the_recorded_job(service, capsys):
    code, out, err = run_main(capsys)
    assert code == 0, err
    model = only_call_arg(service.client.models.create_or_update)
    assert isinstance(model, Model)
    assert model.name == "finetune-phi-3-5-mini"
    assert model.path == f"azureml://jobs/{JOB}/outputs/model_output"
    assert model.type == "mlflow_model"
    assert deployed(service.client).model is model  # the deployment serves what was just registered


def test_the_registered_name_follows_the_recipes_base_model(tmp_path):
    """Step 3 of a Phi-4-mini run registers finetune-phi-4-mini-instruct: the dry run's Model, validated by the SDK."""
    env = {k: v for k, v in os.environ.items() if not (k.isupper() and hasattr(config, k))}  # no leaked settings
    env.update(FINETUNE_PHI_ENV_FILE=str(tmp_path / "absent.env"), TARGET="azure",
               RECIPE="recipes/phi-4-mini/sft/config_full.yaml", **FAKE_DEPLOY_SETTINGS)
    result = subprocess.run([sys.executable, "deploy_model.py", "--dry-run", "--job-name", JOB], cwd=PROJECT_DIR,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert validated_yaml_blocks(result.stdout)["Model"]["name"] == "finetune-phi-4-mini-instruct"


@pytest.mark.parametrize("base_model", ["microsoft/Phi-4-mini-instruct", "../My_Model.v2/", "owner/" + "Long.Name-" * 40,
                                        "models/Ünïcode_Modell"], ids=["hub", "folder", "long", "unicode"])
def test_a_derived_name_keeps_azure_mls_model_name_rule(tmp_path, base_model):
    from azure.ai.ml._restclient.model_dataplane.operations import _models_operations as models_rest
    from msrest.exceptions import ValidationError

    env = {"FINETUNE_PHI_ENV_FILE": str(tmp_path / "absent.env"), "LOCAL_BASE_MODEL": base_model}
    result = subprocess.run([sys.executable, "-c", "import config; print(config.AZURE_MODEL_NAME)"], cwd=PROJECT_DIR,
                            env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    name = result.stdout.strip()
    assert re.fullmatch(r"finetune(-[a-z0-9]+)+", name) and len(name) <= 255, (name, result.stderr)
    # The SDK's own rule for a model's name (its REST client holds it; the client skips the check unless asked):
    with mock.patch.object(models_rest._SERIALIZER, "client_side_validation", True):
        models_rest.build_create_or_update_request_initial(name, "1", "sub", "rg", "registry")
        with pytest.raises(ValidationError, match="pattern"):  # the rule is real: a name may not end in a dot
            models_rest.build_create_or_update_request_initial(f"{name}.", "1", "sub", "rg", "registry")


def test_job_name_option_overrides_the_record(service, capsys):
    code, _out, err = run_main(capsys, "--job-name", "finetune-phi-other")
    assert code == 0, err
    assert only_call_arg(service.client.models.create_or_update).path == \
        "azureml://jobs/finetune-phi-other/outputs/model_output"


@pytest.mark.parametrize("status, target, expected", [
    ("Failed", "azure", "is Failed, not Completed"),
    ("Running", "azure", "is still Running: wait until it has completed"),
    ("Completed", "local", "ran with TARGET=local, not azure"),
], ids=["failed", "running", "local-job"])
def test_unusable_recorded_job_stops_before_azure(azure, monkeypatch, capsys, status, target, expected):
    job_record.record_job(JOB, target, status)
    forbid_ml_client(monkeypatch, deploy_model)
    code, out, err = run_main(capsys)
    assert code == 1
    assert f"The last job, {JOB}, {expected}" in err
    if status == "Running":  # rerunning setup_ml.py would start a second A100 job beside the running one
        assert "setup_ml.py" not in err and "then run `python deploy_model.py` again" in err
    else:
        assert "--job-name" in err
    assert "Traceback" not in out + err


def test_no_recorded_job_says_what_to_run(azure, monkeypatch, capsys):
    azure.last_job.unlink()
    forbid_ml_client(monkeypatch, deploy_model)
    code, _out, err = run_main(capsys)
    assert code == 1
    assert "python setup_ml.py" in err and "--job-name" in err


# --- The endpoint: reused, never deleted; created only when it does not exist -----------------------------
def test_existing_endpoint_is_reused_and_gets_the_other_slot(service, capsys):
    code, out, err = run_main(capsys, "--keep-previous")
    assert code == 0, err
    service.client.online_endpoints.begin_delete.assert_not_called()
    service.client.online_deployments.begin_delete.assert_not_called()
    # The only endpoint update is the traffic switch: the existing endpoint is not re-created.
    assert [dict(ep.traffic) for ep in endpoint_updates(service.client)] == [{GREEN: 100, BLUE: 0}]
    assert deployed(service.client).name == GREEN
    assert service.endpoints == {ENDPOINT: {GREEN: 100, BLUE: 0}}
    assert f"Using existing endpoint {ENDPOINT}" in out
    assert f"The previous deployment {BLUE} still runs at 0% traffic" in out  # it costs money: say so


def test_green_live_endpoint_gets_blue(service, capsys):
    service.endpoints[ENDPOINT] = {BLUE: 0, GREEN: 100}
    code, _out, err = run_main(capsys)
    assert code == 0, err
    assert deployed(service.client).name == BLUE
    assert service.endpoints[ENDPOINT] == {BLUE: 100, GREEN: 0}


def test_missing_endpoint_is_created_with_key_auth_and_the_identity(service, capsys):
    service.endpoints.clear()
    code, out, err = run_main(capsys)
    assert code == 0, err
    created, traffic_update = endpoint_updates(service.client)
    assert isinstance(created, ManagedOnlineEndpoint)
    assert created.name == ENDPOINT
    assert created.auth_mode == "key"
    assert created.identity.type == "user_assigned"
    identities = created.identity.user_assigned_identities
    assert [i.resource_id for i in identities] == [IDENTITY_ID] == [config.AZURE_MANAGED_IDENTITY_RESOURCE_ID]
    assert not created.traffic  # created empty; traffic only once a deployment has answered
    assert deployed(service.client).name == BLUE  # a new endpoint starts with blue
    assert dict(traffic_update.traffic) == {BLUE: 100}
    service.client.online_endpoints.begin_delete.assert_not_called()
    assert f"Creating endpoint {ENDPOINT}" in out


def test_auth_failure_on_endpoint_is_not_treated_as_missing(service, azure, capsys):
    service.client.online_endpoints.get.side_effect = ClientAuthenticationError(
        "AADSTS700082: The refresh token has expired")
    code, out, err = run_main(capsys)
    assert code == 1
    service.client.online_endpoints.begin_create_or_update.assert_not_called()
    service.client.online_deployments.begin_create_or_update.assert_not_called()
    assert "az login" in err and "AADSTS700082" in err
    assert "Traceback" not in out + err
    assert azure.env_file.read_text(encoding="utf-8") == ENV_BEFORE


# --- The deployment ---------------------------------------------------------------------------------------
def test_deployment_settings(service, capsys):
    code, _out, err = run_main(capsys)
    assert code == 0, err
    deployment = deployed(service.client)
    assert isinstance(deployment, ManagedOnlineDeployment)
    assert (deployment.endpoint_name, deployment.instance_type, deployment.instance_count) == \
        (ENDPOINT, "Standard_E4s_v3", 1)
    scoring_dir = PROJECT_DIR / "scoring_dir"
    assert deployment.code_configuration.code == str(scoring_dir)
    assert deployment.code_configuration.scoring_script == "score.py"
    assert (scoring_dir / "score.py").is_file()
    assert deployment.environment.image == DEPLOY_DEFAULTS["AZURE_INFERENCE_IMAGE"]
    conda_yml = yaml.safe_load((scoring_dir / "conda.yml").read_text(encoding="utf-8"))
    assert deployment.environment.conda_file == conda_yml
    variables = deployment.environment_variables
    assert variables["SERVING_RUNTIME"] == "auto"  # score.py serves the job's ONNX export on this CPU instance
    assert variables["SUBSCRIPTION_ID"] == FAKE_SUBSCRIPTION_ID
    assert variables["RESOURCE_GROUP_NAME"] == "rg-phi3-tests"
    assert variables["UAI_CLIENT_ID"] == FAKE_DEPLOY_SETTINGS["AZURE_MANAGED_IDENTITY_CLIENT_ID"]
    settings = deployment.request_settings
    # No export record here: transformers at the stated 1 token/s, 4 x 128 tokens = 512 s > the timeout alone, so 1.
    assert settings.max_concurrent_requests_per_instance == 1
    assert settings.request_timeout_ms == 180000
    assert settings.max_queue_wait_ms is None  # deprecated by Azure: not sent
    for probe in (deployment.liveness_probe, deployment.readiness_probe):
        assert (probe.failure_threshold, probe.success_threshold, probe.period, probe.initial_delay) == (30, 1, 100, 500)


def test_traffic_moves_only_after_the_deployment_and_the_smoke_request(service, capsys):
    client, lros, seen = service.client, [], {}

    def begin_deployment(deployment, **kwargs):
        lros.append(poller(deployment))
        return lros[-1]

    def invoke(endpoint_name, *, request_file=None, deployment_name=None, **kwargs):
        seen["deployment_waited_for"] = lros[-1].result.called
        seen["traffic_then"] = dict(service.endpoints[ENDPOINT])
        with open(request_file, encoding="utf-8") as handle:
            seen["request"] = json.load(handle)
        return GOOD_ANSWER

    client.online_deployments.begin_create_or_update.side_effect = begin_deployment
    client.online_endpoints.invoke.side_effect = invoke
    code, out, err = run_main(capsys)
    assert code == 0, err
    names = [name for name, _args, _kwargs in client.mock_calls]
    deploy = names.index("online_deployments.begin_create_or_update")
    smoke = names.index("online_endpoints.invoke")
    switch = names.index("online_endpoints.begin_create_or_update")
    assert deploy < smoke < switch
    assert seen["deployment_waited_for"]  # the smoke request waits for the deployment to succeed
    assert seen["traffic_then"] == {BLUE: 100}  # ... and goes to the new deployment while blue still serves
    client.online_endpoints.invoke.assert_called_once()
    _args, kwargs = client.online_endpoints.invoke.call_args
    assert (kwargs["endpoint_name"], kwargs["deployment_name"]) == (ENDPOINT, GREEN)
    assert isinstance(seen["request"]["input_data"], list) and len(seen["request"]["input_data"]) == 1
    assert "Bill Gates and Paul Allen founded Microsoft." in out


@pytest.mark.parametrize("failure", [
    "deployment-failed", '{"error": "model not loaded"}', '["one", "two"]', "[42]", "<html>502 Bad Gateway</html>",
], ids=["http-error", "error-object", "two-answers", "not-a-string", "not-json"])
def test_failed_deployment_prints_its_log_and_keeps_traffic(service, azure, capsys, failure):
    client = service.client
    if failure == "deployment-failed":
        client.online_deployments.begin_create_or_update.side_effect = lambda deployment, **kwargs: failing_poller(
            HttpResponseError(message="(ResourceOperationFailure) Resource provisioning failed: liveness probe"))
    else:
        client.online_endpoints.invoke.return_value = failure
    code, out, err = run_main(capsys)
    assert code == 1
    client.online_deployments.get_logs.assert_called_once()
    _args, kwargs = client.online_deployments.get_logs.call_args
    assert (kwargs["name"], kwargs["endpoint_name"]) == (GREEN, ENDPOINT)
    for line in DEPLOYMENT_LOG:
        assert line in err
    assert f"Deployment {GREEN} failed" in err
    client.online_endpoints.begin_create_or_update.assert_not_called()  # no traffic update
    assert service.endpoints == {ENDPOINT: {BLUE: 100}}
    client.online_endpoints.get_keys.assert_not_called()
    assert azure.env_file.read_text(encoding="utf-8") == ENV_BEFORE
    assert "Traceback (most recent call last)" not in out  # the log's traceback goes to stderr, as a tail


def test_unreadable_logs_do_not_hide_the_failure(service, capsys):
    service.client.online_endpoints.invoke.return_value = "[]"
    service.client.online_deployments.get_logs.side_effect = ResourceNotFoundError("no container yet")
    code, _out, err = run_main(capsys)
    assert code == 1
    assert "outside the contract" in err and "could not fetch the deployment's logs" in err


# --- .env and the key -------------------------------------------------------------------------------------
def test_success_writes_env_keeps_other_lines_and_never_prints_the_key(service, azure, capsys):
    code, out, err = run_main(capsys)
    assert code == 0, err
    text = azure.env_file.read_text(encoding="utf-8")
    assert text.startswith(ENV_BEFORE)  # the comment and the user's own lines survive, in place
    lines = text.splitlines()
    assert f"AZURE_ML_ENDPOINT={SCORING_URI}" in lines
    assert f"AZURE_ML_API_KEY={KEY}" in lines
    assert SECONDARY_KEY not in text
    assert file_mode(azure.env_file) == 0o600
    service.client.online_endpoints.get_keys.assert_called_once_with(ENDPOINT)
    assert KEY not in out + err
    assert SCORING_URI in out
    assert "python cleanup.py" in out


def test_redeploy_replaces_the_values_without_duplicating_them(service, azure, capsys):
    azure.env_file.write_text(ENV_BEFORE + "AZURE_ML_ENDPOINT=https://old/score\nAZURE_ML_API_KEY=old-key\n",
                              encoding="utf-8")
    code, _out, err = run_main(capsys)
    assert code == 0, err
    lines = azure.env_file.read_text(encoding="utf-8").splitlines()
    assert [line for line in lines if line.startswith("AZURE_ML_")] == [
        "AZURE_ML_WORKSPACE_NAME=ws-phi3-tests", f"AZURE_ML_ENDPOINT={SCORING_URI}", f"AZURE_ML_API_KEY={KEY}"]


# --- The entities pass azure-ai-ml's own schemas ----------------------------------------------------------
def test_entities_pass_the_sdk_schemas(service, tmp_path, capsys):
    service.endpoints.clear()  # so the endpoint entity is built (and created) too
    code, _out, err = run_main(capsys)
    assert code == 0, err
    model = only_call_arg(service.client.models.create_or_update)
    endpoint = endpoint_updates(service.client)[0]
    deployment = deployed(service.client)

    loaded_model = schema_round_trip(model, load_model, tmp_path, "model")
    assert (loaded_model.name, loaded_model.type, loaded_model.path) == (model.name, "mlflow_model", model.path)

    loaded_endpoint = endpoint_round_trip(endpoint, load_online_endpoint, tmp_path)
    assert (loaded_endpoint.name, loaded_endpoint.auth_mode) == (ENDPOINT, "key")
    assert [i.resource_id for i in loaded_endpoint.identity.user_assigned_identities] == [IDENTITY_ID]

    loaded_deployment = schema_round_trip(deployment, load_online_deployment, tmp_path, "deployment")
    assert (loaded_deployment.name, loaded_deployment.instance_type) == (BLUE, "Standard_E4s_v3")
    assert loaded_deployment.request_settings.request_timeout_ms == 180000
    assert loaded_deployment.liveness_probe.initial_delay == 500

    # dump() turns an endpoint's identities into dicts in place; the entity sent to Azure must not have been
    # dumped: the SDK's begin_create_or_update turns it into its REST body, which needs the real objects.
    assert all(isinstance(i, ManagedIdentityConfiguration) for i in endpoint.identity.user_assigned_identities)
    endpoint._to_rest_online_endpoint(location="eastus2")


# --- Dry run: builds and validates everything, touches nothing remote -----------------------------------
def test_dry_run_prints_validated_yaml_without_any_sdk_call(azure, monkeypatch, capsys):
    forbid_ml_client(monkeypatch, deploy_model)
    block_network(monkeypatch)
    built = []
    real_build_endpoint = deploy_model.build_endpoint
    monkeypatch.setattr(deploy_model, "build_endpoint",
                        lambda *args: built.append(real_build_endpoint(*args)) or built[-1])
    code, out, err = run_main(capsys, "--dry-run")
    assert code == 0, err
    assert "Dry run: nothing was registered or deployed." in out
    blocks = validated_yaml_blocks(out)
    assert set(blocks) == {"Model", "Endpoint", "Deployment"}
    assert blocks["Model"]["path"] == f"azureml://jobs/{JOB}/outputs/model_output"
    assert blocks["Model"]["type"] == "mlflow_model"
    assert blocks["Endpoint"]["auth_mode"] == "key"
    assert blocks["Endpoint"]["identity"]["user_assigned_identities"] == [{"resource_id": IDENTITY_ID}]
    deployment = blocks["Deployment"]
    assert (deployment["name"], deployment["endpoint_name"]) == (BLUE, ENDPOINT)
    assert deployment["instance_type"] == "Standard_E4s_v3"
    # Offline the job's record is not read: the stated default speed (1 token/s) admits 1.
    assert deployment["request_settings"] == {"max_concurrent_requests_per_instance": 1, "request_timeout_ms": 180000}
    assert deployment["environment"]["image"] == DEPLOY_DEFAULTS["AZURE_INFERENCE_IMAGE"]
    # Printing the endpoint left the entity usable (dump() would have turned its identities into dicts).
    assert all(isinstance(i, ManagedIdentityConfiguration) for i in built[0].identity.user_assigned_identities)
    assert azure.env_file.read_text(encoding="utf-8") == ENV_BEFORE


def test_dry_run_refuses_an_entity_that_does_not_validate(azure, monkeypatch, capsys):
    forbid_ml_client(monkeypatch, deploy_model)
    real_build_deployment = deploy_model.build_deployment

    def bad_deployment(*args, **kwargs):
        deployment = real_build_deployment(*args, **kwargs)
        deployment.egress_public_network_access = "maybe"  # only enabled or disabled: as a hand edit might make it
        return deployment

    monkeypatch.setattr(deploy_model, "build_deployment", bad_deployment)
    code, out, err = run_main(capsys, "--dry-run")
    assert code == 1
    assert "The deployment does not validate" in err and "'maybe'" in err and "enabled" in err
    assert "Traceback" not in out + err
    assert "Dry run: nothing was registered or deployed." not in out


@pytest.mark.parametrize("argv", [(), ("--dry-run",)], ids=["run", "dry-run"])
def test_missing_settings_are_named_before_any_sdk_call(azure, monkeypatch, capsys, argv):
    monkeypatch.setattr(config, "AZURE_ENDPOINT_NAME", "<your-endpoint-name>")
    monkeypatch.setattr(config, "AZURE_MANAGED_IDENTITY_CLIENT_ID", "<your-managed-identity-client-id>")
    forbid_ml_client(monkeypatch)  # the real get_ml_client stays: the step must stop before it
    block_network(monkeypatch)
    code, out, err = run_main(capsys, *argv)
    assert code == 1
    assert err.count("These settings are missing") == 1
    assert "AZURE_ENDPOINT_NAME" in err and "AZURE_MANAGED_IDENTITY_CLIENT_ID" in err
    assert "AZURE_ML_WORKSPACE_NAME" not in err  # filled in: not listed
    assert "Traceback" not in out + err


def test_wait_with_progress_reports_a_slow_operation(monkeypatch, capsys):
    lro = poller("the endpoint")
    lro.done.side_effect = [False, False, True]
    assert deploy_model.wait_with_progress(lro, "endpoint e") == "the endpoint"
    lro.wait.assert_called_once_with(timeout=azure_ml.PROGRESS_EVERY_S)
    assert "endpoint e: still working" in capsys.readouterr().out


# --- cleanup.py ---------------------------------------------------------------------------------------------
def test_cleanup_deletes_the_endpoint_and_says_what_still_costs(service, capsys):
    code, out, err = run_main(capsys, "--yes", module=cleanup)
    assert code == 0, err
    service.client.online_endpoints.begin_delete.assert_called_once_with(name=ENDPOINT)
    service.client.compute.begin_delete.assert_not_called()
    assert service.endpoints == {}
    assert f"endpoint {ENDPOINT}: deleted, with {BLUE}" in out
    assert f"compute cluster {DEPLOY_DEFAULTS['AZURE_COMPUTE_NAME']}" in out and "--compute deletes it" in out
    assert "billed" in out and "az group delete --name rg-phi3-tests" in out


def test_cleanup_of_a_deleted_endpoint_says_so(service, capsys):
    service.endpoints.clear()
    code, out, err = run_main(capsys, "--yes", module=cleanup)
    assert code == 0, err
    service.client.online_endpoints.begin_delete.assert_not_called()
    assert f"endpoint {ENDPOINT}: not found (already deleted)" in out


def test_cleanup_with_compute_deletes_the_cluster(service, capsys):
    code, out, err = run_main(capsys, "--yes", "--compute", module=cleanup)
    assert code == 0, err
    service.client.online_endpoints.begin_delete.assert_called_once_with(name=ENDPOINT)
    service.client.compute.begin_delete.assert_called_once()
    args, kwargs = service.client.compute.begin_delete.call_args
    assert (args[0] if args else kwargs["name"]) == DEPLOY_DEFAULTS["AZURE_COMPUTE_NAME"]
    assert f"compute cluster {DEPLOY_DEFAULTS['AZURE_COMPUTE_NAME']}: deleted" in out


def test_cleanup_without_yes_and_without_a_terminal_deletes_nothing(service, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))  # piped input is not a confirmation
    code, out, err = run_main(capsys, "--compute", module=cleanup)
    assert code == 0, err
    service.client.online_endpoints.begin_delete.assert_not_called()
    service.client.compute.begin_delete.assert_not_called()
    assert service.endpoints == {ENDPOINT: {BLUE: 100}}
    assert "not confirmed" in out and "--yes" in out
    assert f"endpoint {ENDPOINT}: kept" in out


def test_cleanup_auth_failure_is_explained(service, capsys):
    service.client.online_endpoints.get.side_effect = ClientAuthenticationError("AADSTS50173: grant expired")
    code, out, err = run_main(capsys, "--yes", module=cleanup)
    assert code == 1
    service.client.online_endpoints.begin_delete.assert_not_called()
    assert "az login" in err and "Traceback" not in out + err


# --- The Azure road (issue 15) -------------------------------------------------------------------------------
def test_the_deployment_image_is_a_supported_one(azure, monkeypatch, capsys):
    forbid_ml_client(monkeypatch, deploy_model)
    code, out, err = run_main(capsys, "--dry-run")
    assert code == 0, err
    image = validated_yaml_blocks(out)["Deployment"]["environment"]["image"]
    # Microsoft's supported Python 3.12 inference image; "...-py311-cpu-inference" does not exist (ImageBuildFailure).
    assert image == "mcr.microsoft.com/azureml/minimal-py312-inference:latest"


@pytest.mark.parametrize("instance_type, override, gpu", [
    ("Standard_E4s_v3", "auto", False),
    ("Standard_NC4as_T4_v3", "auto", True),
    ("Standard_NC24ads_A100_v4", "auto", True),
    ("Standard_ND96asr_v4", "auto", True),
    ("Standard_NV36ads_A10_v5", "auto", True),
    ("Standard_D4s_v3", "auto", False),
    ("Standard_NC24ads_A100_v4", "false", False),  # AZURE_DEPLOYMENT_HAS_GPU overrides the rule
    ("Standard_Custom_X", "true", True),
])
def test_a_gpu_instance_type_deploys_the_cuda_image_and_torch(azure, monkeypatch, capsys, instance_type, override, gpu):
    forbid_ml_client(monkeypatch, deploy_model)
    block_network(monkeypatch)
    monkeypatch.setattr(config, "AZURE_DEPLOYMENT_INSTANCE_TYPE", instance_type)
    monkeypatch.setattr(config, "AZURE_DEPLOYMENT_HAS_GPU", override)
    code, out, err = run_main(capsys, "--dry-run")
    assert code == 0, err
    deployment = validated_yaml_blocks(out)["Deployment"]  # passed azure-ai-ml's own schema
    assert deployment["instance_type"] == instance_type
    environment = deployment["environment"]
    image = DEPLOY_DEFAULTS["AZURE_GPU_INFERENCE_IMAGE" if gpu else "AZURE_INFERENCE_IMAGE"]
    assert environment["image"] == image
    conda_file = PROJECT_DIR / "scoring_dir" / ("conda_gpu.yml" if gpu else "conda.yml")
    assert environment["conda_file"] == yaml.safe_load(conda_file.read_text(encoding="utf-8"))
    pip = next(item["pip"] for item in environment["conda_file"]["dependencies"] if isinstance(item, dict))
    assert ("torch==2.13.0+cu126" if gpu else "torch==2.13.0+cpu") in pip


def test_the_default_images_in_config_are_supported_ones(tmp_path):
    env = {k: v for k, v in os.environ.items() if not (k.isupper() and hasattr(config, k))}
    env.update(FINETUNE_PHI_ENV_FILE=str(tmp_path / "absent.env"), USE_CPU_COMPUTE="true")
    code = "import config; print(config.AZURE_TRAINING_IMAGE, config.AZURE_INFERENCE_IMAGE, repr(config.AZURE_COMPUTE_LOCATION))"
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_DIR, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.stdout.split() == ["mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04:latest",
                                     "mcr.microsoft.com/azureml/minimal-py312-inference:latest", "''"]


def test_a_slot_whose_first_provisioning_failed_is_deleted_and_re_created(service, capsys):
    # As the service returns it (provisioning_state is read-only on the entity).
    failed = mock.NonCallableMagicMock(spec=ManagedOnlineDeployment, provisioning_state="Failed")
    service.client.online_deployments.get.side_effect = lambda name, endpoint_name: failed
    code, out, err = run_main(capsys)
    assert code == 0, err
    names = [name for name, _args, _kwargs in service.client.mock_calls]
    delete = names.index("online_deployments.begin_delete")
    assert delete < names.index("online_deployments.begin_create_or_update")
    assert service.client.mock_calls[delete].kwargs == {"name": GREEN, "endpoint_name": ENDPOINT}
    assert f"Deployment {GREEN} failed before and cannot be updated" in out


def test_a_slot_that_carries_traffic_is_never_deleted_even_if_failed(service, capsys):
    service.endpoints[ENDPOINT] = {BLUE: 5, GREEN: 95}  # blue is live: the new one goes to green
    failed = mock.NonCallableMagicMock(spec=ManagedOnlineDeployment, provisioning_state="Failed")
    service.client.online_deployments.get.side_effect = lambda name, endpoint_name: failed
    code, _out, err = run_main(capsys, "--keep-previous")
    assert code == 0, err
    service.client.online_deployments.begin_delete.assert_not_called()


@pytest.mark.parametrize("error", [
    "MlException", "ServiceResponseError", "ServiceRequestError", "ValidationException",
])
def test_sdk_and_transport_errors_keep_the_traffic_and_show_the_log(service, azure, capsys, error):
    from azure.ai.ml.exceptions import ErrorTarget, MlException, ValidationException
    from azure.core.exceptions import ServiceRequestError, ServiceResponseError

    raised = {"MlException": MlException(message="invoke failed", no_personal_data_message="invoke failed"),
              "ServiceResponseError": ServiceResponseError("Connection aborted"),
              "ServiceRequestError": ServiceRequestError("read timed out"),
              "ValidationException": ValidationException(message="bad deployment", no_personal_data_message="bad",
                                                         target=ErrorTarget.ONLINE_DEPLOYMENT)}
    if error == "ValidationException":
        service.client.online_deployments.begin_create_or_update.side_effect = raised[error]
    else:
        service.client.online_endpoints.invoke.side_effect = raised[error]
    code, out, err = run_main(capsys)
    assert code == 1
    assert f"Deployment {GREEN} failed: {error}" in err and DEPLOYMENT_LOG[-1] in err
    assert "Traffic was left as it was" in err
    assert "Traceback" not in out + err.replace(DEPLOYMENT_LOG[1], "")  # only the deployment log's own traceback
    assert service.endpoints == {ENDPOINT: {BLUE: 100}}
    assert azure.env_file.read_text(encoding="utf-8") == ENV_BEFORE


def test_ctrl_c_during_the_deployment_says_azure_goes_on(service, capsys):
    service.client.online_deployments.begin_create_or_update.side_effect = KeyboardInterrupt
    code, out, err = run_main(capsys)
    assert code == 130
    assert f"Azure goes on with {GREEN}" in err and "Traffic was left as it was" in err
    assert "Traceback" not in out + err and service.endpoints == {ENDPOINT: {BLUE: 100}}


@pytest.mark.parametrize("setting, value", [
    ("AZURE_ENDPOINT_NAME", "an-endpoint-name-that-is-33-chars"),
    ("AZURE_ENDPOINT_NAME", "ep"),
    ("AZURE_ENDPOINT_NAME", "phi3_endpoint"),
    ("AZURE_DEPLOYMENT_NAME", "a-deployment-name-of-27-cha"),  # -blue fits in 32, -green does not
])
def test_bad_names_are_refused_before_any_call_and_in_the_dry_run(azure, monkeypatch, capsys, setting, value):
    monkeypatch.setattr(config, setting, value)
    forbid_ml_client(monkeypatch, deploy_model)
    for argv in ((), ("--dry-run",)):
        code, out, err = run_main(capsys, *argv)
        assert code == 1 and setting in err and "3 to 32 characters" in err and "Traceback" not in out + err


def test_a_taken_endpoint_name_says_choose_another(service, capsys):
    service.endpoints.clear()
    response = mock.Mock(status_code=400, reason="Bad Request")
    response.text.return_value = ""
    taken = HttpResponseError(response=response, message=(
        "(BadRequest) The request is invalid.\nCode: BadRequest\nException Details:\t(InferencingClientCallFailed) "
        '{"errors":{"":["There is already an endpoint with this name, Endpoint name needs to be unique within a '
        'region. Try some other name."]},"title":"One or more validation errors occurred."}'))
    service.client.online_endpoints.begin_create_or_update.side_effect = taken
    code, out, err = run_main(capsys)
    assert code == 1
    assert f"The endpoint name {ENDPOINT} is taken" in err and "choose another AZURE_ENDPOINT_NAME" in err
    assert "Traceback" not in out + err
    service.client.online_deployments.begin_create_or_update.assert_not_called()


def test_the_previous_slot_is_retired_after_the_new_one_has_the_traffic(service, capsys):
    code, out, err = run_main(capsys)
    assert code == 0, err
    names = [name for name, _args, _kwargs in service.client.mock_calls]
    switch = names.index("online_endpoints.begin_create_or_update")
    delete = names.index("online_deployments.begin_delete")
    assert switch < delete
    assert service.client.mock_calls[delete].kwargs == {"name": BLUE, "endpoint_name": ENDPOINT}
    assert f"Deleted the previous deployment {BLUE}" in out and "--keep-previous" in out


@pytest.mark.parametrize("state, auth_mode, says", [
    ("Failed", "key", "is in state Failed"),
    ("Creating", "key", "is still Creating"),
    ("Succeeded", "aml_token", "uses auth_mode aml_token"),
])
def test_an_existing_endpoint_that_cannot_be_used_is_refused(service, capsys, state, auth_mode, says):
    service.client.online_endpoints.get.side_effect = lambda name, **kwargs: ManagedOnlineEndpoint(
        name=name, auth_mode=auth_mode, traffic={BLUE: 100}, provisioning_state=state)
    code, out, err = run_main(capsys)
    assert code == 1 and says in err and "Traceback" not in out + err
    service.client.online_deployments.begin_create_or_update.assert_not_called()


# --- Concurrency and probes from the measured speed (issue 23) -------------------------------------------------------
def export_record(tokens_per_second, chosen="int4"):
    """model_output/onnx_export.json as finetuning_dir/onnx_export.py writes it (the fields read)."""
    return {"chosen": chosen, "max_new_tokens": 128, "candidates": {chosen: {"tokens_per_second": tokens_per_second}}}


@pytest.mark.parametrize("tokens_per_second, concurrent", [(50.0, 8), (5.0, 1), (200.0, 35)])
def test_concurrency_lets_every_admitted_request_finish_inside_the_timeout(azure, tokens_per_second, concurrent):
    from helpers.serving_speed import endpoint_settings

    settings = endpoint_settings(export_record(tokens_per_second))
    assert (settings.runtime, settings.max_concurrent_requests) == ("onnxruntime-genai", concurrent)
    # Azure admits ~2 x c per instance; the last admitted waits for all before it, one worker.
    last_done_s = 2 * settings.max_concurrent_requests * config.MAX_INPUTS_PER_REQUEST * 128 / tokens_per_second
    assert last_done_s <= config.REQUEST_TIMEOUT_MS / 1000 or settings.max_concurrent_requests == 1
    assert (settings.probe_initial_delay_s, settings.probe_period_s) == (10, 10)  # the export loads in under a second


def test_a_gpu_instance_or_no_export_uses_the_stated_default(azure):
    from helpers.serving_speed import DEFAULT_TOKENS_PER_SECOND, endpoint_settings

    for settings in (endpoint_settings(export_record(50.0), has_gpu=True), endpoint_settings(None)):
        assert settings.runtime == "transformers" and settings.tokens_per_second == DEFAULT_TOKENS_PER_SECOND
        assert "default" in settings.source and settings.probe_initial_delay_s == 500


def test_a_set_max_concurrent_requests_overrides_the_derived_one(service, monkeypatch, capsys):
    monkeypatch.setenv("MAX_CONCURRENT_REQUESTS_PER_INSTANCE", "3")
    monkeypatch.setattr(config, "MAX_CONCURRENT_REQUESTS_PER_INSTANCE", 3)
    code, out, err = run_main(capsys)
    assert code == 0, err
    assert deployed(service.client).request_settings.max_concurrent_requests_per_instance == 3
