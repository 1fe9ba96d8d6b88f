"""The serverless road (TARGET=serverless): steps 1-3 and cleanup, Azure mocked, entities checked by azure-ai-ml.

The MLClient and the azureml registry's client are autospecced mocks (tests/azure_mocks.py): a wrong method or
argument fails. The serverless endpoint's URL points at a small HTTP server on this machine that answers the
chat-completions contract, so step 3's smoke request and its .env are real. Nothing signs in or leaves the machine.
"""

import json
import os
import stat
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from unittest import mock

import pytest

import azure_mocks
from azure_mocks import (
    FAKE_WORKSPACE_ID,
    block_network,
    configure_serverless,
    forbid_ml_client,
    mock_ml_client,
    mock_registry_client,
    only_call_arg,
    serve_serverless_endpoints,
    serve_workspace,
    submitted_job,
    validated_yaml_blocks,
)

from azure.ai.ml import Output, load_job, load_serverless_endpoint
from azure.ai.ml.entities import Model
from azure.core.exceptions import HttpResponseError

import cleanup
import config
from conftest import run_script
import deploy_model
import download_dataset
from serverless import endpoint as serverless_endpoint, job as serverless_job
import setup_ml
from finetuning_dir.chat_data import read_chat_jsonl
from helpers.job_record import read_last_job, record_job

pytestmark = [pytest.mark.filterwarnings(f) for f in azure_mocks.AZURE_WARNING_FILTERS]

JOB = "finetune-phi-serverless-test"
ENDPOINT = azure_mocks.FAKE_SERVERLESS_SETTINGS["SERVERLESS_ENDPOINT_NAME"]
KEY = "fake-serverless-key"
FINE_TUNED = {"name": "phi-ft-serverless-abc", "version": "1"}
MODEL_ID = f"azureml://locations/eastus2/workspaces/{FAKE_WORKSPACE_ID}/models/phi-ft-serverless-abc/versions/1"


@pytest.fixture
def road(monkeypatch, tmp_path):
    """TARGET=serverless with fake settings and files under tmp_path."""
    return configure_serverless(monkeypatch, tmp_path)


@pytest.fixture
def client(monkeypatch, road):
    """The mocked MLClient (and registry client) the serverless steps get; the workspace is in East US 2."""
    ml_client = mock_ml_client()
    serve_workspace(ml_client)
    monkeypatch.setattr(serverless_job, "get_ml_client", lambda: ml_client)
    monkeypatch.setattr(serverless_endpoint, "get_ml_client", lambda: ml_client)
    monkeypatch.setattr(serverless_job, "get_registry_client", lambda name: mock_registry_client())
    azure_mocks.serve_arm_reads(monkeypatch)  # the preflight's subscription and provider reads
    return ml_client


class ChatHandler(BaseHTTPRequestHandler):
    """A serverless endpoint's chat completions, as scripted: (status, JSON body); records what it received."""

    reply = (200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Bill Gates and Paul Allen."}}]})
    received = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.received.append({"path": self.path, "authorization": self.headers.get("Authorization"), "body": body})
        status, answer = self.reply
        payload = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def chat_server(monkeypatch):
    """A chat-completions server on a loopback port; yields its base URL (the endpoint's scoring URI)."""
    monkeypatch.setattr(ChatHandler, "received", [])
    server = ThreadingHTTPServer(("127.0.0.1", 0), ChatHandler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def run(main, capsys, *argv):
    """main(argv) -> (exit code, stdout, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def finetuning_job_status(client, *statuses, model_name=FINE_TUNED["name"]):
    """jobs.get answers these statuses in turn (the last repeated), with the registered_model output."""
    answers = iter(statuses)
    last = [statuses[-1]]

    def get(name, **kwargs):
        last[0] = next(answers, last[0])
        job = submitted_job(name, last[0])
        job.outputs = {"registered_model": Output(type="mlflow_model", name=model_name)}
        return job

    client.jobs.get.side_effect = get
    client.models.get.side_effect = lambda name, version=None, label=None: Model(name=name, version=FINE_TUNED["version"])


# --- config ----------------------------------------------------------------------------------------------
def test_config_names_both_phi_models_with_their_registry_ids():
    assert config.SERVERLESS_MODELS == {
        "Phi-4-mini-instruct": "azureml://registries/azureml/models/Phi-4-mini-instruct",
        "Phi-3.5-mini-instruct": "azureml://registries/azureml/models/Phi-3.5-mini-instruct",
    }
    assert config.SERVERLESS_BASE_MODEL in config.SERVERLESS_MODELS
    # The regions come from the registry's model tags; SERVERLESS_REGIONS only narrows them, and is empty by default.
    assert config.SERVERLESS_REGIONS == () or "SERVERLESS_REGIONS" in os.environ


def test_an_unknown_target_or_model_is_refused_by_name():
    for name, value in (("TARGET", "cloud"), ("SERVERLESS_BASE_MODEL", "Phi-9")):
        result = run_script("-c", "import config", env={name: value})
        assert result.returncode == 1 and f"{name}={value!r} is not known" in result.stderr


# --- Step 1: chat-completions JSONL ---------------------------------------------------------------------------
def test_step_1_writes_messages_only_chat_completions_files(monkeypatch, tmp_path, capsys):
    paths = {name: tmp_path / f"{name}.jsonl" for name in ("train", "test", "train_chat", "test_chat")}
    for name, path in (("TRAIN_DATA_PATH", "train"), ("TEST_DATA_PATH", "test"), ("CHAT_TRAIN_DATA_PATH", "train_chat"),
                       ("CHAT_TEST_DATA_PATH", "test_chat")):
        monkeypatch.setattr(config, name, paths[path])
    code, out, err = run(download_dataset.main, capsys, "--source", "sample", "--chat-completions")
    assert code == 0, err
    for plain, chat in (("train", "train_chat"), ("test", "test_chat")):
        rows = [json.loads(line) for line in paths[chat].read_text(encoding="utf-8").splitlines()]
        assert all(set(row) == {"messages"} for row in rows)
        assert all(set(message) == {"role", "content"} for row in rows for message in row["messages"])
        read_chat_jsonl(paths[chat])  # the training data checks pass too
        originals = [json.loads(line)["messages"] for line in paths[plain].read_text(encoding="utf-8").splitlines()]
        assert [row["messages"] for row in rows] == originals  # the same split, the same chats
    paths["train_chat"].write_text('{"messages": []}\n')  # edited by hand: kept without --force
    code, out, err = run(download_dataset.main, capsys, "--source", "sample", "--chat-completions")
    assert code == 1 and "--force" in err and paths["train_chat"].read_text() == '{"messages": []}\n'


def test_step_1_writes_no_chat_files_unless_asked(monkeypatch, tmp_path, capsys):
    for name in ("TRAIN_DATA_PATH", "TEST_DATA_PATH", "CHAT_TRAIN_DATA_PATH", "CHAT_TEST_DATA_PATH"):
        monkeypatch.setattr(config, name, tmp_path / f"{name}.jsonl")
    code, out, err = run(download_dataset.main, capsys, "--source", "sample", "--no-chat-completions")
    assert code == 0, err
    assert not (tmp_path / "CHAT_TRAIN_DATA_PATH.jsonl").exists()


# --- Step 2: the fine-tuning job ----------------------------------------------------------------------------
def test_dry_run_prints_the_validated_job_offline(road, monkeypatch, capsys):
    forbid_ml_client(monkeypatch, serverless_job)
    forbid_ml_client(monkeypatch, serverless_endpoint)
    block_network(monkeypatch)
    code, out, err = run(setup_ml.main, capsys, "--job-name", JOB, "--dry-run")
    assert code == 0, err
    job = validated_yaml_blocks(out)["Serverless fine-tuning job"]
    assert (job["type"], job["task"], job["name"]) == ("finetuning", "chatCompletion", JOB)
    assert job["model"] == {"path": "azureml://registries/azureml/models/Phi-4-mini-instruct/labels/latest",
                            "type": "mlflow_model"}
    assert job["hyperparameters"] == {"num_train_epochs": "3", "learning_rate": "5e-06", "per_device_train_batch_size": "4"}
    # The local files the SDK uploads on submit, not "azureml:/tmp/..." as dump() writes them.
    assert job["training_data"]["path"] == str(road.CHAT_TRAIN_DATA_PATH)
    assert job["validation_data"]["path"] == str(road.CHAT_TEST_DATA_PATH)
    assert job["outputs"]["registered_model"]["name"] == "phi-ft-serverless"
    assert "compute" not in job  # no compute: Azure runs it serverless
    assert "experimental" in err and err.count("\n") < 5  # one note, not azure-ai-ml's ten
    assert not road.LAST_JOB_FILE.exists()


def test_a_pinned_version_and_the_other_phi_are_used_as_set(road, monkeypatch, capsys):
    monkeypatch.setattr(config, "SERVERLESS_BASE_MODEL", "Phi-3.5-mini-instruct")
    monkeypatch.setattr(config, "SERVERLESS_BASE_MODEL_VERSION", "4")
    code, out, err = run(setup_ml.main, capsys, "--job-name", JOB, "--dry-run")
    assert code == 0, err
    path = validated_yaml_blocks(out)["Serverless fine-tuning job"]["model"]["path"]
    assert path == "azureml://registries/azureml/models/Phi-3.5-mini-instruct/versions/4"


@pytest.mark.parametrize("main, argv", [
    (setup_ml.main, ()), (setup_ml.main, ("--dry-run",)), (deploy_model.main, ()), (deploy_model.main, ("--dry-run",)),
    (cleanup.main, ()),
], ids=["setup", "setup-dry-run", "deploy", "deploy-dry-run", "cleanup"])
def test_missing_settings_are_named_before_any_call(road, monkeypatch, capsys, main, argv):
    monkeypatch.setattr(config, "AZURE_SUBSCRIPTION_ID", "<your-subscription-id>")
    monkeypatch.setattr(config, "SERVERLESS_ENDPOINT_NAME", "<your-serverless-endpoint-name>")
    forbid_ml_client(monkeypatch, serverless_job)
    forbid_ml_client(monkeypatch, serverless_endpoint)
    block_network(monkeypatch)
    code, out, err = run(main, capsys, *argv)
    assert code == 1 and "AZURE_SUBSCRIPTION_ID" in err and "Traceback" not in err
    assert ("SERVERLESS_ENDPOINT_NAME" in err) == (main is not setup_ml.main)


def test_step_2_without_step_1_says_what_to_run(road, monkeypatch, capsys):
    monkeypatch.setattr(config, "CHAT_TRAIN_DATA_PATH", road.CHAT_TRAIN_DATA_PATH.with_name("missing.jsonl"))
    forbid_ml_client(monkeypatch, serverless_job)
    forbid_ml_client(monkeypatch, serverless_endpoint)
    code, out, err = run(setup_ml.main, capsys, "--dry-run")
    assert code == 1 and "TARGET=serverless python download_dataset.py" in err


def test_the_job_is_submitted_followed_and_recorded_with_its_model(client, road, capsys, tmp_path):
    finetuning_job_status(client, "Queued", "Queued", "Running", "Completed")
    code, out, err = run(setup_ml.main, capsys, "--job-name", JOB)
    assert code == 0, err
    job = only_call_arg(client.jobs.create_or_update)
    loaded = azure_mocks.schema_round_trip(job, load_job, tmp_path)  # what was sent passes the SDK's schema
    assert loaded.model.path == "azureml://registries/azureml/models/Phi-4-mini-instruct/versions/7"  # latest, resolved
    assert loaded.compute is None and loaded.training_data.path.endswith("train_chat.jsonl")
    assert [line.split()[-1] for line in out.splitlines() if line.startswith("  ") and " s  " in line] == [
        "Queued", "Running", "Completed"]  # each change once
    record = read_last_job()
    assert (record["name"], record["target"], record["status"]) == (JOB, "serverless", "Completed")
    assert record["registered_model"] == FINE_TUNED
    assert record["base_model"].endswith("Phi-4-mini-instruct/versions/7")


def test_a_project_outside_the_serverless_regions_is_refused_before_submitting(client, road, capsys):
    serve_workspace(client, location="westeurope")
    code, out, err = run(setup_ml.main, capsys, "--job-name", JOB)
    assert code == 1 and "westeurope" in err and "eastus2" in err and "AZURE_ML_WORKSPACE_NAME" in err
    client.jobs.create_or_update.assert_not_called()


# --- Facts read from the azureml registry (issue 23) ------------------------------------------------------------
def test_a_retired_base_model_is_refused_before_any_job_with_the_model_to_use(client, road, monkeypatch, capsys):
    monkeypatch.setattr(config, "SERVERLESS_BASE_MODEL", "Phi-3.5-mini-instruct")  # retired 2025-08-30 (its tags)
    code, out, err = run(setup_ml.main, capsys, "--job-name", JOB)
    assert code == 1 and "retired" in err and "2025-08-30" in err
    assert "SERVERLESS_BASE_MODEL=Phi-4-mini-instruct" in err
    client.jobs.create_or_update.assert_not_called()
    assert not road.LAST_JOB_FILE.exists()


def test_a_base_model_the_registry_no_longer_lists_is_refused(client, road, monkeypatch, capsys):
    monkeypatch.setattr(serverless_job, "get_registry_client",
                        lambda name: mock_registry_client(models={"Phi-4-mini-instruct": azure_mocks.REGISTRY_MODELS[
                            "Phi-4-mini-instruct"]}))
    monkeypatch.setattr(config, "SERVERLESS_BASE_MODEL", "Phi-3.5-mini-instruct")
    code, out, err = run(setup_ml.main, capsys, "--job-name", JOB)
    assert code == 1 and "no longer lists Phi-3.5-mini-instruct" in err and "Phi-4-mini-instruct" in err
    client.jobs.create_or_update.assert_not_called()


@pytest.mark.parametrize("region", ["westus3", "East US", "northcentralus"])
def test_every_region_the_models_tag_lists_is_accepted(client, road, capsys, region):
    serve_workspace(client, location=region)  # eastus2 was once the only region this project allowed
    finetuning_job_status(client, "Completed")
    code, out, err = run(setup_ml.main, capsys, "--job-name", JOB)
    assert code == 0, err
    assert f"Phi-4-mini-instruct version 7 live; offered in {region}" in out


def test_serverless_regions_only_narrows_what_the_registry_lists(client, road, monkeypatch, capsys):
    monkeypatch.setattr(config, "SERVERLESS_REGIONS", ("eastus2",))
    serve_workspace(client, location="westus3")  # the model's tag lists it; the user's own list does not
    code, out, err = run(setup_ml.main, capsys, "--job-name", JOB)
    assert code == 1 and "westus3" in err and "fine-tunes serverless in eastus2" in err
    client.jobs.create_or_update.assert_not_called()


def test_check_prints_each_check_and_submits_nothing(client, road, capsys):
    code, out, err = run(setup_ml.main, capsys, "--check")
    assert code == 0, err
    for line in ("ok    sign-in: subscription Phi tests", "ok    providers: Microsoft.MachineLearningServices, "
                 "Microsoft.ContainerRegistry, Microsoft.Network registered", "ok    project: ",
                 "ok    base model: Phi-4-mini-instruct version 7 live; offered in eastus2"):
        assert line in out
    client.jobs.create_or_update.assert_not_called()


def test_an_unregistered_network_provider_is_refused_with_the_command(client, road, monkeypatch, capsys):
    azure_mocks.serve_arm_reads(monkeypatch, registered=("Microsoft.MachineLearningServices",
                                                         "Microsoft.ContainerRegistry"))
    code, out, err = run(setup_ml.main, capsys, "--job-name", JOB)
    assert code == 1 and "FAIL  providers" in out and "az provider register --namespace Microsoft.Network" in err
    client.jobs.create_or_update.assert_not_called()


@pytest.mark.parametrize("message, advice", [
    ("(MissingSubscriptionRegistration) The subscription is not registered to use namespace 'Microsoft.Network'.",
     "az provider register --namespace Microsoft.Network"),
    # fine-tune-serverless.md (2026-01-28): Owner or Contributor on the subscription.
    ("(AuthorizationFailed) The client does not have authorization to perform action",
     "--role Contributor --scope /subscriptions/"),
    ("(QuotaExceeded) Quota exceeded for serverless fine-tuning", "quota"),
    ("(BadRequest) Model Phi-4-mini-instruct fine-tuning is not supported in region westus", "setup_ml.py --check"),
], ids=["provider", "role", "quota", "region"])
def test_azures_refusals_become_one_actionable_sentence(client, road, capsys, message, advice):
    client.jobs.create_or_update.side_effect = HttpResponseError(message=message)
    code, out, err = run(setup_ml.main, capsys, "--job-name", JOB)
    assert code == 1 and advice in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1


def test_a_failed_job_exits_non_zero_and_is_recorded(client, road, capsys):
    finetuning_job_status(client, "Running", "Failed")
    code, out, err = run(setup_ml.main, capsys, "--job-name", JOB)
    assert code == 1 and "ended with status Failed" in err
    assert read_last_job()["status"] == "Failed"
    client.models.get.assert_not_called()


def test_ctrl_c_leaves_the_job_running_and_says_how_to_cancel_it(client, road, capsys, monkeypatch):
    finetuning_job_status(client, "Running")
    monkeypatch.setattr(serverless_job.time, "sleep", mock.Mock(side_effect=KeyboardInterrupt))
    code, out, err = run(setup_ml.main, capsys, "--job-name", JOB)
    assert code == 130 and f"az ml job cancel --name {JOB}" in out
    assert read_last_job()["status"] == "Running"


# --- Step 3: the serverless endpoint --------------------------------------------------------------------------
def completed_job():
    """What step 2 recorded."""
    record_job(JOB, "serverless", "Completed", registered_model=FINE_TUNED)


def test_deploy_dry_run_prints_the_validated_endpoint_offline(road, monkeypatch, capsys):
    completed_job()
    forbid_ml_client(monkeypatch, serverless_job)
    forbid_ml_client(monkeypatch, serverless_endpoint)
    block_network(monkeypatch)
    code, out, err = run(deploy_model.main, capsys, "--dry-run")
    assert code == 0, err
    endpoint = validated_yaml_blocks(out)["Serverless endpoint"]
    # Only what azure-ai-ml sends (ServerlessEndpoint._to_rest_object: model id, tags, sku, location).
    assert endpoint["name"] == ENDPOINT and "auth_mode" not in endpoint and "description" not in endpoint
    assert endpoint["model_id"].endswith("/models/phi-ft-serverless-abc/versions/1")
    assert "Dry run: nothing was deployed." in out


def test_a_bad_endpoint_name_is_refused_before_any_call(road, monkeypatch, capsys):
    monkeypatch.setattr(config, "SERVERLESS_ENDPOINT_NAME", "phi_ft")
    forbid_ml_client(monkeypatch, serverless_job)
    forbid_ml_client(monkeypatch, serverless_endpoint)
    code, out, err = run(deploy_model.main, capsys, "--dry-run")
    assert code == 1 and "SERVERLESS_ENDPOINT_NAME" in err


def test_deploy_creates_the_endpoint_smoke_tests_it_and_writes_env(client, road, chat_server, capsys):
    completed_job()
    road.ENV_FILE.write_text("AZURE_ML_ENDPOINT=http://127.0.0.1:5001/score\nOTHER=kept\n")
    endpoints = serve_serverless_endpoints(client, chat_server)
    code, out, err = run(deploy_model.main, capsys)
    assert code == 0, err
    assert endpoints == {ENDPOINT: MODEL_ID}
    sent = only_call_arg(client.serverless_endpoints.begin_create_or_update)
    assert (sent.name, sent.model_id) == (ENDPOINT, MODEL_ID)
    rest = sent._to_rest_object().as_dict()  # what the SDK sends: no auth mode (Azure gives key authentication)
    assert rest["properties"] == {"modelSettings": {"modelId": MODEL_ID}} and rest["sku"] == {"name": "Consumption"}
    (request,) = ChatHandler.received
    assert request["path"] == "/v1/chat/completions" and request["authorization"] == f"Bearer {KEY}"
    assert request["body"]["messages"] == [{"role": "user", "content": "Who founded Microsoft?"}]
    env = road.ENV_FILE.read_text()
    assert f"AZURE_ML_ENDPOINT={chat_server}/v1/chat/completions" in env and f"AZURE_ML_API_KEY={KEY}" in env
    assert "OTHER=kept" in env and "5001/score" not in env
    assert stat.S_IMODE(os.stat(road.ENV_FILE).st_mode) == 0o600
    assert KEY not in out + err and "Bill Gates" in out


def test_the_sent_endpoint_passes_the_sdks_own_checks(client, road, chat_server, capsys):
    completed_job()
    serve_serverless_endpoints(client, chat_server)
    assert run(deploy_model.main, capsys)[0] == 0
    sent = only_call_arg(client.serverless_endpoints.begin_create_or_update)
    text = serverless_endpoint.validate_rest_entity(sent, load_serverless_endpoint, "Serverless endpoint")
    assert f"model_id: {MODEL_ID}" in text


def test_an_endpoint_serving_another_model_is_never_deleted_or_changed(client, road, chat_server, capsys):
    completed_job()
    road.ENV_FILE.write_text("AZURE_ML_ENDPOINT=http://127.0.0.1:5001/score\n")
    endpoints = serve_serverless_endpoints(client, chat_server, {ENDPOINT: "azureml://.../models/other/versions/3"})
    code, out, err = run(deploy_model.main, capsys)
    assert code == 1 and "already serves" in err and "SERVERLESS_ENDPOINT_NAME" in err
    client.serverless_endpoints.begin_create_or_update.assert_not_called()
    client.serverless_endpoints.begin_delete.assert_not_called()
    assert endpoints == {ENDPOINT: "azureml://.../models/other/versions/3"}
    assert road.ENV_FILE.read_text() == "AZURE_ML_ENDPOINT=http://127.0.0.1:5001/score\n"


def test_an_endpoint_already_serving_the_model_is_reused(client, road, chat_server, capsys):
    completed_job()
    serve_serverless_endpoints(client, chat_server, {ENDPOINT: MODEL_ID})
    code, out, err = run(deploy_model.main, capsys)
    assert code == 0, err
    client.serverless_endpoints.begin_create_or_update.assert_not_called()
    assert "Using existing serverless endpoint" in out


def test_a_failed_smoke_request_leaves_env_alone_and_shows_no_key(client, road, chat_server, capsys, monkeypatch):
    completed_job()
    monkeypatch.setattr(ChatHandler, "reply", (500, {"error": {"message": f"bad key {KEY}"}}))
    serve_serverless_endpoints(client, chat_server)
    code, out, err = run(deploy_model.main, capsys)
    assert code == 1 and "HTTP 500" in err and "cleanup.py" in err
    assert not road.ENV_FILE.exists()
    assert KEY not in out + err


def test_deploy_needs_a_completed_serverless_job(client, road, capsys):
    record_job(JOB, "azure", "Completed")
    code, out, err = run(deploy_model.main, capsys)
    assert code == 1 and "TARGET=azure, not serverless" in err


# --- Cleanup ---------------------------------------------------------------------------------------------------
def test_cleanup_deletes_the_endpoint_only_when_confirmed(client, road, chat_server, capsys, monkeypatch):
    endpoints = serve_serverless_endpoints(client, chat_server, {ENDPOINT: MODEL_ID})
    monkeypatch.setattr("sys.stdin", None)  # no terminal: not confirmed
    code, out, err = run(cleanup.main, capsys)
    assert code == 0 and "kept" in out and endpoints
    code, out, err = run(cleanup.main, capsys, "--yes")
    assert code == 0 and f"serverless endpoint {ENDPOINT}: deleted" in out and not endpoints
    code, out, err = run(cleanup.main, capsys, "--yes")
    assert "not found (already deleted)" in out


def test_deploy_by_job_name_finds_the_model_the_job_registered(client, road, chat_server, capsys):
    finetuning_job_status(client, "Completed")  # no record: the job and its registered_model come from Azure
    serve_serverless_endpoints(client, chat_server)
    code, out, err = run(deploy_model.main, capsys, "--job-name", JOB)
    assert code == 0, err
    assert only_call_arg(client.serverless_endpoints.begin_create_or_update).model_id == MODEL_ID


# --- The local endpoint's translation of chat completions (its HTTP side: tests/test_local_endpoint.py) ----------
def test_chat_completions_requests_become_score_py_requests():
    from stand_ins.chat_completions import as_score_request

    class Bad(ValueError):
        pass

    def translated(body):
        return json.loads(as_score_request(json.dumps(body).encode(), Bad))

    hi = [{"role": "user", "content": "Hi"}]
    assert translated({"model": "phi", "max_tokens": 5, "temperature": 0, "messages": [
        {"role": "developer", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}) == {
        "input_data": [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]],
        "params": {"max_new_tokens": 5, "do_sample": False}}  # temperature 0: greedy
    assert translated({"messages": hi, "temperature": 0.5, "top_p": 0.9})["params"] == {
        "do_sample": True, "temperature": 0.5, "top_p": 0.9}
    assert translated({"messages": hi, "max_completion_tokens": 7})["params"] == {"max_new_tokens": 7}
    assert translated({"messages": hi})["params"] == {}  # score.py's defaults: greedy, 128 tokens
    for body, reason in (({"messages": hi, "n": 2}, "n must be 1"), ({"messages": hi, "stream": True}, "streaming"),
                         ({"messages": []}, "non-empty list"), ({"messages": hi, "tools": []}, "tools"),
                         ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "must be text")):
        with pytest.raises(Bad, match=reason):
            translated(body)


def test_deploy_check_asks_before_any_endpoint_is_made(client, road, capsys):
    code, out, err = run(deploy_model.main, capsys, "--check")
    assert code == 0, err
    assert "ok    project: " in out and "Preflight passed: nothing was deployed." in out
    client.serverless_endpoints.begin_create_or_update.assert_not_called()
