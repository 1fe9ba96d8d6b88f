"""setup_ml.py with TARGET=azure: what it hands to azure-ai-ml, checked offline against the SDK's own schemas.

The MLClient is an autospecced mock (tests/azure_mocks.py): a wrong method or argument fails. Nothing here
signs in or opens a connection.
"""

import json
import os
import subprocess
import sys
from types import SimpleNamespace
from unittest import mock

import pytest
import yaml

import azure_mocks
from azure_mocks import (
    PROJECT_DIR,
    block_network,
    configure_azure,
    download_writes_log,
    forbid_ml_client,
    mock_ml_client,
    only_call_arg,
    patch_get_ml_client,
    poller,
    schema_round_trip,
    use_tmp_data,
    validated_yaml_blocks,
)

# azure_mocks imported azure.ai.ml with its import-time warnings silenced; these imports are quiet.
from azure.ai.ml import Input, PyTorchDistribution, command, load_compute, load_environment, load_job
from azure.ai.ml.entities import AmlCompute, Environment
from azure.ai.ml.exceptions import JobException
from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ResourceNotFoundError
from azure.identity import CredentialUnavailableError

import config  # azure_mocks puts the project folder on sys.path
from helpers import azure_ml as ml_client
import setup_ml

pytestmark = [pytest.mark.filterwarnings(f) for f in azure_mocks.AZURE_WARNING_FILTERS]

JOB = "finetune-phi-test"
GPU_SIZE = "Standard_NC24ads_A100_v4"
GPU_COMPUTE = "gpu-nc24s-a100-v4"
GPU_IMAGE = "mcr.microsoft.com/azureml/curated/acft-hf-nlp-gpu:124"  # Ubuntu 22.04, CUDA 12.6 (config.py)
BASE_MODEL = "microsoft/Phi-3.5-mini-instruct"
# The defaults config.py derives with no environment and no .env (test_config_defaults checks they are).
# Pinned here so a developer's own .env or environment cannot change what these tests expect.
GPU_DEFAULTS = {
    "AZURE_COMPUTE_INSTANCE_TYPE": GPU_SIZE,
    "AZURE_COMPUTE_NAME": GPU_COMPUTE,
    "AZURE_TRAINING_IMAGE": GPU_IMAGE,
    "AZURE_COMPUTE_LOCATION": "",
    "AZURE_COMPUTE_TIER": "dedicated",
    "AZURE_COMPUTE_MIN_INSTANCES": 0,
    "AZURE_COMPUTE_MAX_INSTANCES": 1,
    "AZURE_COMPUTE_IDLE_SECONDS": 300,
    "AZURE_ENVIRONMENT_NAME": "phi-3-training-environment",
    "AZURE_EXPERIMENT_NAME": "phi-3-fine-tuning",
    "JOB_NAME": "",
    "INSTANCE_COUNT": 1,
    "PROCESSES_PER_NODE": 1,
}
CPU_DEFAULTS = {
    "AZURE_COMPUTE_INSTANCE_TYPE": "Standard_E16s_v3",
    "AZURE_COMPUTE_NAME": "cpu-e16s-v3",
    "AZURE_TRAINING_IMAGE": "mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04:latest",
}
LOG_LINES = [f"step {i}: loss {2.0 - i / 100:.2f}" for i in range(40)] + ["LAST LINE: the job was canceled by the user"]


@pytest.fixture
def azure(monkeypatch, tmp_path):
    """TARGET=azure, filled-in workspace settings, the GPU defaults, data files and last_job.json in tmp_path."""
    configure_azure(monkeypatch, **GPU_DEFAULTS)
    train, test, last_job = use_tmp_data(monkeypatch, tmp_path)
    return SimpleNamespace(train=train, test=test, last_job=last_job)


@pytest.fixture
def client(monkeypatch, azure):
    """The mocked MLClient setup_ml.run_azure_job gets from get_ml_client() (the preflight runs against the fake
    service in tests/test_azure_sdk_flows.py)."""
    azure_mocks.skip_preflight(monkeypatch)
    return patch_get_ml_client(monkeypatch, setup_ml, mock_ml_client())


def run_main(capsys, *argv):
    """setup_ml.main(argv) -> (exit code, stdout, stderr); a KeyboardInterrupt must not escape it."""
    try:
        code = setup_ml.main(["--job-name", JOB, *argv])
    except KeyboardInterrupt:  # would stop the whole pytest session otherwise
        pytest.fail("KeyboardInterrupt escaped setup_ml.main")
    out, err = capsys.readouterr()
    return code, out, err


def submitted(client):
    """The job entity setup_ml passed to jobs.create_or_update."""
    return only_call_arg(client.jobs.create_or_update)


# --- Settings config.py derives at import: run in a clean interpreter --------------------------------
@pytest.mark.parametrize("use_cpu, expected", [("false", GPU_DEFAULTS), ("true", CPU_DEFAULTS)], ids=["gpu", "cpu"])
def test_config_defaults(tmp_path, use_cpu, expected):
    names = sorted(expected)
    env = {k: v for k, v in os.environ.items() if not (k.isupper() and hasattr(config, k))}  # no leaked settings
    env.update(USE_CPU_COMPUTE=use_cpu, FINETUNE_PHI_ENV_FILE=str(tmp_path / "absent.env"))
    code = f"import config, json; print(json.dumps({{n: getattr(config, n) for n in {names!r}}}))"
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_DIR, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == expected


# --- Environment ----------------------------------------------------------------------------------------
def test_environment_is_registered_from_conda_yml(client, capsys):
    registered = Environment(name="phi-3-training-environment", version="3", image=GPU_IMAGE)
    client.environments.create_or_update.side_effect = None
    client.environments.create_or_update.return_value = registered
    code, _out, err = run_main(capsys)
    assert code == 0, err
    environment = only_call_arg(client.environments.create_or_update)
    assert isinstance(environment, Environment)
    assert environment.name == "phi-3-training-environment"
    assert environment.image == GPU_IMAGE
    conda_yml = PROJECT_DIR / "conda.yml"
    assert setup_ml.CONDA_FILE == conda_yml
    assert environment.conda_file == yaml.safe_load(conda_yml.read_text(encoding="utf-8"))
    # The job runs in what the workspace registered (the call's return value), not a second copy.
    assert submitted(client).environment is registered


# --- Compute --------------------------------------------------------------------------------------------
def test_missing_compute_is_created_and_waited_for(client, capsys):
    client.compute.get.side_effect = ResourceNotFoundError("ComputeNotFound: gpu-nc24s-a100-v4")
    lro = poller(None)
    client.compute.begin_create_or_update.side_effect = None
    client.compute.begin_create_or_update.return_value = lro
    code, out, err = run_main(capsys)
    assert code == 0, err
    client.compute.get.assert_called_once_with(GPU_COMPUTE)
    cluster = only_call_arg(client.compute.begin_create_or_update)
    assert isinstance(cluster, AmlCompute)
    # No forced region: the SDK then uses the workspace's (a location makes a cross-region cluster).
    assert (cluster.name, cluster.size, cluster.location, cluster.tier) == (GPU_COMPUTE, GPU_SIZE, None, "dedicated")
    assert cluster.min_instances == 0
    assert cluster.max_instances >= config.INSTANCE_COUNT >= 1
    lro.result.assert_called_once_with()  # the cluster exists before the job is submitted
    assert submitted(client).compute == GPU_COMPUTE
    assert f"Creating compute cluster {GPU_COMPUTE}" in out


def test_existing_compute_is_reused(client, capsys):
    code, out, err = run_main(capsys)
    assert code == 0, err
    client.compute.get.assert_called_once_with(GPU_COMPUTE)
    client.compute.begin_create_or_update.assert_not_called()
    assert submitted(client).compute == GPU_COMPUTE
    assert f"Using compute cluster {GPU_COMPUTE}" in out


def test_auth_failure_on_compute_is_not_treated_as_missing(client, capsys):
    client.compute.get.side_effect = ClientAuthenticationError("AADSTS700082: The refresh token has expired")
    code, out, err = run_main(capsys)
    assert code != 0
    client.compute.begin_create_or_update.assert_not_called()
    client.jobs.create_or_update.assert_not_called()
    assert "az login" in err and "permission" in err
    assert "AADSTS700082" in err
    assert "Traceback" not in out + err


def test_permission_denied_on_compute_is_explained(client, capsys):
    """ARM answers 403 (HttpResponseError, not ClientAuthenticationError) when the signed-in user has no role."""
    response = mock.Mock(status_code=403, reason="Forbidden")
    response.text.return_value = ""
    client.compute.get.side_effect = HttpResponseError(
        message="(AuthorizationFailed) The client 'me@contoso.com' does not have authorization to perform action "
                "'Microsoft.MachineLearningServices/workspaces/computes/read'", response=response)
    try:
        code, out, err = run_main(capsys)
    except HttpResponseError as error:
        pytest.fail(f"a 403 escaped setup_ml.main as a traceback: {error.message[:60]}")
    assert code == 1
    client.compute.begin_create_or_update.assert_not_called()
    client.jobs.create_or_update.assert_not_called()
    assert "permission" in err and "AuthorizationFailed" in err
    assert "Traceback" not in out + err


# --- The command job ------------------------------------------------------------------------------------
def test_job_command_inputs_outputs(client, azure, capsys):
    code, _out, err = run_main(capsys)
    assert code == 0, err
    job = submitted(client)
    assert job.name == JOB
    assert job.command.startswith("python fine_tune.py ")
    for part in ("--config ${{inputs.recipe}}", "--train-file ${{inputs.train_file}}",
                 "--eval-file ${{inputs.eval_file}}", "--model_output_dir ${{outputs.model_output}}"):
        assert part in job.command
    assert "--model-name" not in job.command  # the recipe names the model
    assert {k: (v.type, v.path) for k, v in job.inputs.items()} == {
        "recipe": ("uri_file", str(PROJECT_DIR / "recipes/phi-3.5-mini/sft/config_tutorial.yaml")),
        "train_file": ("uri_file", str(azure.train)),
        "eval_file": ("uri_file", str(azure.test)),
    }
    assert {k: v.type for k, v in job.outputs.items()} == {"model_output": "mlflow_model"}
    assert job.compute == GPU_COMPUTE
    assert job.code == str(setup_ml.FINETUNING_DIR) == str(PROJECT_DIR / "finetuning_dir")
    assert (PROJECT_DIR / "finetuning_dir" / "fine_tune.py").is_file()
    assert job.experiment_name == "phi-3-fine-tuning"
    assert job.distribution is None  # 1 node x 1 process: a plain process, no torchrun
    assert job.resources.instance_count == 1


def test_multi_node_job_is_distributed(client, monkeypatch, capsys):
    monkeypatch.setattr(config, "INSTANCE_COUNT", 2)
    monkeypatch.setattr(config, "PROCESSES_PER_NODE", 4)  # AZURE_COMPUTE_MAX_INSTANCES stays 1
    client.compute.get.side_effect = ResourceNotFoundError("ComputeNotFound")
    code, _out, err = run_main(capsys)
    assert code == 0, err
    job = submitted(client)
    assert isinstance(job.distribution, PyTorchDistribution)
    assert job.distribution.process_count_per_instance == 4
    assert job.resources.instance_count == 2
    assert only_call_arg(client.compute.begin_create_or_update).max_instances >= 2


@pytest.mark.parametrize("nodes, processes", [(1, 1), (2, 4)], ids=["single", "distributed"])
def test_entities_pass_the_sdk_schemas(client, monkeypatch, tmp_path, capsys, nodes, processes):
    monkeypatch.setattr(config, "INSTANCE_COUNT", nodes)
    monkeypatch.setattr(config, "PROCESSES_PER_NODE", processes)
    client.compute.get.side_effect = ResourceNotFoundError("ComputeNotFound")
    code, _out, err = run_main(capsys)
    assert code == 0, err
    environment = only_call_arg(client.environments.create_or_update)
    cluster = only_call_arg(client.compute.begin_create_or_update)
    job = submitted(client)

    loaded_environment = schema_round_trip(environment, load_environment, tmp_path, "environment")
    assert (loaded_environment.name, loaded_environment.image) == (environment.name, GPU_IMAGE)
    assert loaded_environment.conda_file == environment.conda_file

    loaded_cluster = schema_round_trip(cluster, load_compute, tmp_path, "compute")
    assert (loaded_cluster.type, loaded_cluster.size, loaded_cluster.tier) == ("amlcompute", GPU_SIZE, "dedicated")
    assert (loaded_cluster.min_instances, loaded_cluster.max_instances) == (0, max(1, nodes))

    loaded_job = schema_round_trip(job, load_job, tmp_path, "job")
    assert loaded_job.type == "command"
    assert loaded_job.command == job.command
    assert loaded_job.resources.instance_count == nodes
    assert set(loaded_job.inputs) == {"recipe", "train_file", "eval_file"} and set(loaded_job.outputs) == {"model_output"}
    if processes > 1:
        assert loaded_job.distribution.process_count_per_instance == processes

    # What jobs.create_or_update runs before it submits:
    assert job._validate().passed, job._validate().error_messages
    # The bindings check (${{inputs.x}} / ${{outputs.x}} must name a declared input/output). The component's
    # naming rule (no hyphens) is left out: a command() job's component is anonymous when submitted, and job
    # names like finetune-phi-20260101-120000 are valid job names.
    result = job.component._validate()
    assert {path: message for path, message in result.error_messages.items() if path != "name"} == {}


def test_validator_rejects_an_unknown_binding(azure):
    """The bindings check is real: a command naming an input the job lacks fails it."""
    job = command(
        command="python fine_tune.py --train-file ${{inputs.train_file}} --extra ${{inputs.nope}}",
        inputs={"train_file": Input(type="uri_file", path=str(azure.train))},
        environment=setup_ml.build_environment(),
        compute=GPU_COMPUTE,
        code=str(setup_ml.FINETUNING_DIR),
    )
    result = job.component._validate()
    assert not result.passed
    assert "inputs.nope" in str(result.error_messages)


def test_dry_run_refuses_a_job_with_an_unknown_binding(azure, monkeypatch, capsys):
    real_command = setup_ml.training_command
    monkeypatch.setattr(setup_ml, "training_command", lambda *a, **k: [*real_command(*a, **k), "--x", "${{inputs.nope}}"])
    forbid_ml_client(monkeypatch, setup_ml)
    code, out, err = run_main(capsys, "--dry-run")
    assert code == 1
    assert "does not validate" in err and "inputs.nope" in err
    assert "Dry run: nothing was submitted." not in out


def test_the_azure_job_and_the_local_job_run_the_same_recipe_command(client, azure, capsys, monkeypatch):
    import yaml

    from stand_ins import job_runner

    assert run_main(capsys)[0] == 0
    azure_command = submitted(client).command.split()
    local = job_runner.local_job_command("j", setup_ml.training_command(config.shown(config.RECIPE), "t", "e", "o"),
                                         build=False)
    assert azure_command[1:4] == ["fine_tune.py", "--config", "${{inputs.recipe}}"]
    assert local[1].endswith("finetuning_dir/fine_tune.py") and local[2:4] == ["--config", config.shown(config.RECIPE)]
    assert yaml.safe_load(config.RECIPE.read_text())["model_name"] == BASE_MODEL  # TARGET=azure: the tutorial's


def test_max_steps_reaches_the_azure_job_and_the_local_job(client, azure, capsys, monkeypatch, tmp_path):
    from finetuning_dir import fine_tune
    from stand_ins import job_runner

    assert config.MAX_STEPS is None  # the default: the recipe's (every epoch)
    assert run_main(capsys)[0] == 0
    assert "--max-steps" not in submitted(client).command
    client.jobs.create_or_update.reset_mock()

    monkeypatch.setattr(config, "MAX_STEPS", 20)
    assert run_main(capsys)[0] == 0
    job = submitted(client)
    assert " --max-steps 20 " in f"{job.command} "
    assert schema_round_trip(job, load_job, tmp_path, "job").command == job.command  # the SDK's schema takes it
    assert job._validate().passed, job._validate().error_messages
    local = job_runner.local_job_command("j", setup_ml.training_command(config.shown(config.RECIPE), "t", "e", "o"),
                                         build=False)
    assert local[local.index("--max-steps") + 1] == "20"
    # fine_tune.py takes it over the recipe's value (the recipe as defaults, the command line wins):
    args = fine_tune.parse_args(setup_ml.training_command(str(config.RECIPE), "t", "e", "o")[1:])
    assert args.max_steps == 20 and args.model_name == BASE_MODEL


@pytest.mark.parametrize("value", ["ten", "0", "-5", "2.5"])
def test_a_bad_max_steps_is_named_before_any_azure_call(value, tmp_path):
    env = {"FINETUNE_PHI_ENV_FILE": str(tmp_path / "absent.env"), "TARGET": "azure", "MAX_STEPS": value,
           "AZURE_SUBSCRIPTION_ID": "sub", "AZURE_RESOURCE_GROUP_NAME": "rg", "AZURE_ML_WORKSPACE_NAME": "ws"}
    result = subprocess.run([sys.executable, "setup_ml.py", "--dry-run"], cwd=PROJECT_DIR, capture_output=True,
                            text=True, timeout=60, env={**os.environ, **env})
    assert result.returncode != 0 and result.stdout == ""
    assert f"MAX_STEPS={value!r} is not a whole number above 0" in result.stderr


# --- Streaming and how the job ended --------------------------------------------------------------------
def test_completed_job_is_recorded(client, azure, capsys):
    code, out, err = run_main(capsys)
    assert code == 0, err
    client.jobs.stream.assert_called_once_with(JOB)
    client.jobs.get.assert_called_once_with(JOB)
    client.jobs.download.assert_not_called()
    assert azure_mocks.studio_url(JOB) in out
    record = json.loads(azure.last_job.read_text(encoding="utf-8"))
    assert (record["name"], record["target"], record["status"]) == (JOB, "azure", "Completed")
    assert record["studio_url"] == azure_mocks.studio_url(JOB)
    assert record["workspace"] == azure_mocks.FAKE_WORKSPACE_SETTINGS["AZURE_ML_WORKSPACE_NAME"]


def test_submitted_job_name_comes_from_the_service(client, azure, capsys):
    """The service may rename the job: stream, record and print the name it returned."""
    client.jobs.create_or_update.side_effect = lambda job, **kwargs: azure_mocks.submitted_job("svc-name-42")
    code, out, err = run_main(capsys)
    assert code == 0, err
    client.jobs.stream.assert_called_once_with("svc-name-42")
    assert azure_mocks.studio_url("svc-name-42") in out
    assert json.loads(azure.last_job.read_text(encoding="utf-8"))["name"] == "svc-name-42"


def test_canceled_job_exits_non_zero_with_the_log_tail(client, azure, capsys):
    client.jobs.get.side_effect = lambda name: azure_mocks.submitted_job(name, "Canceled")
    client.jobs.download.side_effect = download_writes_log(LOG_LINES)
    code, out, err = run_main(capsys)  # jobs.stream returned normally, as it does for a canceled job
    assert code != 0
    assert "Canceled" in err
    client.jobs.download.assert_called_once()
    args, kwargs = client.jobs.download.call_args
    assert (args[0] if args else kwargs["name"]) == JOB
    assert kwargs.get("all") is False  # the logs, not the outputs: a cancelled job's model is gigabytes
    assert err.rstrip().splitlines()[-1] == LOG_LINES[-1]
    assert LOG_LINES[0] not in err  # a tail, not the whole log
    assert json.loads(azure.last_job.read_text(encoding="utf-8"))["status"] == "Canceled"


def test_failed_job_exits_non_zero(client, azure, capsys):
    client.jobs.stream.side_effect = JobException("Job failed: exit code 1", "Job failed")
    client.jobs.get.side_effect = lambda name: azure_mocks.submitted_job(name, "Failed")
    client.jobs.download.side_effect = download_writes_log(["Traceback (most recent call last):", "OOM on GPU 0"])
    code, out, err = run_main(capsys)
    assert code != 0
    assert f"Job {JOB} ended with status Failed" in err
    assert "OOM on GPU 0" in err
    assert json.loads(azure.last_job.read_text(encoding="utf-8"))["status"] == "Failed"


def test_ctrl_c_while_streaming_leaves_the_job_running(client, capsys):
    client.jobs.stream.side_effect = KeyboardInterrupt
    code, out, err = run_main(capsys)
    assert code == 130
    message = out + err
    assert "keeps running" in message
    assert f"az ml job cancel --name {JOB}" in message
    client.jobs.begin_cancel.assert_not_called()


# --- Dry run: builds and validates everything, touches nothing remote -----------------------------------
def test_dry_run_prints_validated_yaml_without_any_sdk_call(azure, monkeypatch, capsys):
    forbid_ml_client(monkeypatch, setup_ml)
    block_network(monkeypatch)
    code, out, err = run_main(capsys, "--dry-run")  # JOB has hyphens, like the generated names
    assert code == 0, err
    assert "Dry run: nothing was submitted." in out
    blocks = validated_yaml_blocks(out)
    assert set(blocks) == {"Environment", "Compute cluster", "Command job"}
    assert (blocks["Environment"]["name"], blocks["Environment"]["image"]) == ("phi-3-training-environment", GPU_IMAGE)
    cluster = blocks["Compute cluster"]
    assert (cluster["name"], cluster["size"], cluster["type"]) == (GPU_COMPUTE, GPU_SIZE, "amlcompute")
    assert "location" not in cluster  # the workspace's region: no cross-region cluster
    job = blocks["Command job"]  # the YAML of a command job (`az ml job create -f` reads it), not a pipeline node
    assert job["type"] == "command"
    assert "--train-file ${{inputs.train_file}}" in job["command"]
    assert "component" not in job
    # What is sent: the local files (uploaded on submit), not "azureml:/tmp/..." (an asset name) as dump() writes them.
    assert job["inputs"]["train_file"]["path"] == str(azure.train)
    assert job["inputs"]["eval_file"]["path"] == str(azure.test)
    assert not azure.last_job.exists()


def test_dry_run_accepts_the_generated_job_name(azure, monkeypatch, capsys):
    forbid_ml_client(monkeypatch, setup_ml)
    try:
        code = setup_ml.main(["--dry-run"])  # finetune-phi-<date>-<time>
    finally:
        out, err = capsys.readouterr()
    assert code == 0, err
    assert "name: finetune-phi-" in out


# --- Settings and sign-in problems ----------------------------------------------------------------------
@pytest.mark.parametrize("argv", [(), ("--dry-run",)], ids=["run", "dry-run"])
def test_missing_settings_are_named_before_any_sdk_call(azure, monkeypatch, capsys, argv):
    monkeypatch.setattr(config, "AZURE_SUBSCRIPTION_ID", "<your-subscription-id>")
    monkeypatch.setattr(config, "AZURE_ML_WORKSPACE_NAME", "")
    forbid_ml_client(monkeypatch)  # the real get_ml_client stays: it must stop before MLClient(...)
    code, out, err = run_main(capsys, *argv)
    assert code == 1
    assert err.count("These settings are missing") == 1
    assert "AZURE_SUBSCRIPTION_ID" in err and "AZURE_ML_WORKSPACE_NAME" in err
    assert "AZURE_RESOURCE_GROUP_NAME" not in err  # filled in: not listed
    assert "Traceback" not in out + err


def test_get_ml_client_checks_settings_before_the_sdk(monkeypatch):
    configure_azure(monkeypatch, AZURE_RESOURCE_GROUP_NAME="<your-resource-group>")
    forbid_ml_client(monkeypatch)
    with pytest.raises(config.MissingSettingsError, match="AZURE_RESOURCE_GROUP_NAME"):
        ml_client.get_ml_client()


def test_not_signed_in_says_az_login(client, capsys):
    not_signed_in = CredentialUnavailableError("Azure CLI not found on path")
    for method in (client.environments.create_or_update, client.compute.get, client.jobs.create_or_update):
        method.side_effect = not_signed_in  # whichever the script calls first
    code, out, err = run_main(capsys)
    assert code == 1
    assert "az login" in err
    assert "Traceback" not in out + err
    client.jobs.create_or_update.assert_not_called()


# --- The Azure road (issue 15): what users paying for Azure hit ---------------------------------------------
def test_a_failed_job_shows_the_services_reason(client, azure, capsys):
    # The SDK puts the service's error only in the JobException's message; it prints nothing itself.
    client.jobs.stream.side_effect = JobException("ImageBuildFailure: base image does not exist", "Job failed")
    client.jobs.get.side_effect = lambda name: azure_mocks.submitted_job(name, "Failed")
    code, _out, err = run_main(capsys)
    assert code == 1
    assert f"Job {JOB} ended with status Failed." in err and "ImageBuildFailure: base image does not exist" in err


def test_ctrl_c_wrapped_by_the_sdk_leaves_the_job_running_and_recorded_as_running(client, azure, capsys):
    def stream(name):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as interrupt:  # what azure-ai-ml 1.35 does in jobs.stream()
            raise JobException("Stream interrupted", "Stream interrupted") from interrupt

    client.jobs.stream.side_effect = stream
    code, out, err = run_main(capsys)
    assert code == 130
    assert "keeps running" in out and f"az ml job cancel --name {JOB}" in out
    client.jobs.begin_cancel.assert_not_called()
    assert json.loads(azure.last_job.read_text())["status"] == "Running"


def test_an_existing_cluster_of_another_size_is_refused(client, capsys):
    client.compute.get.side_effect = lambda name: AmlCompute(name=name, size="Standard_E16s_v3", max_instances=1)
    code, out, err = run_main(capsys)
    assert code == 1
    assert "exists as amlcompute Standard_E16s_v3, not amlcompute Standard_NC24ads_A100_v4" in err
    assert "AZURE_COMPUTE_NAME" in err and "Traceback" not in out + err
    client.jobs.create_or_update.assert_not_called()


def test_an_existing_cluster_gets_the_max_instances_a_multi_node_job_needs(client, monkeypatch, capsys):
    monkeypatch.setattr(config, "INSTANCE_COUNT", 2)
    code, out, err = run_main(capsys)  # the cluster says max_instances=1
    assert code == 0, err
    updated = only_call_arg(client.compute.begin_create_or_update)
    assert (updated.name, updated.max_instances) == (GPU_COMPUTE, 2)
    assert "Raising its max_instances from 1 to 2" in out


def test_more_processes_per_node_than_the_sku_has_gpus_is_refused(client, monkeypatch, capsys):
    from azure.ai.ml.entities import VmSize

    monkeypatch.setattr(config, "PROCESSES_PER_NODE", 2)
    client.compute.list_sizes.return_value = [VmSize(name="Standard_NC24ads_A100_v4", gpus=1),
                                              VmSize(name="Standard_ND96asr_v4", gpus=8)]
    code, _out, err = run_main(capsys)
    assert code == 1
    assert "Standard_NC24ads_A100_v4 has 1 GPU(s) per node" in err and "PROCESSES_PER_NODE to 1" in err
    client.jobs.create_or_update.assert_not_called()


@pytest.mark.parametrize("name", ["gp", "a-compute-name-of-33-characters-x", "gpu_cluster", "9gpu", "gpu-"])
def test_a_bad_compute_name_is_refused_before_any_call(azure, monkeypatch, capsys, name):
    monkeypatch.setattr(config, "AZURE_COMPUTE_NAME", name)
    forbid_ml_client(monkeypatch, setup_ml)
    for argv in ((), ("--dry-run",)):
        code, out, err = run_main(capsys, *argv)
        assert code == 1 and "AZURE_COMPUTE_NAME" in err and "3 to 32 characters" in err


def test_a_30_character_cluster_name_passes_the_dry_run(azure, monkeypatch, capsys):
    # AmlCompute clusters take 3-32 characters; 24 is the compute-instance rule.
    name = "gpu-cluster-a100-for-phi-tests"
    assert len(name) == 30
    monkeypatch.setattr(config, "AZURE_COMPUTE_NAME", name)
    forbid_ml_client(monkeypatch, setup_ml)
    code, out, err = run_main(capsys, "--dry-run")
    assert code == 0, err
    blocks = validated_yaml_blocks(out)
    assert blocks["Compute cluster"]["name"] == name and blocks["Command job"]["compute"].endswith(name)


def test_a_gpu_job_refuses_to_train_on_the_cpu(client, monkeypatch, capsys):
    code, _out, err = run_main(capsys)
    assert code == 0, err
    assert "--require-gpu" in submitted(client).command
    monkeypatch.setattr(config, "USE_CPU_COMPUTE", True)
    client.jobs.create_or_update.reset_mock()
    assert run_main(capsys)[0] == 0
    assert "--require-gpu" not in submitted(client).command


@pytest.mark.slow
def test_fine_tune_with_require_gpu_stops_with_the_reason_on_a_machine_without_one(tmp_path):
    from azure_mocks import write_jsonl

    data = write_jsonl(tmp_path / "chats.jsonl")
    result = subprocess.run([sys.executable, str(PROJECT_DIR / "finetuning_dir" / "fine_tune.py"), "--train-file", str(data),
                             "--eval-file", str(data), "--model_output_dir", str(tmp_path / "out"), "--require-gpu",
                             "--model-name", str(tmp_path / "never-loaded")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 3, result.stderr[-2000:]
    assert "sees no GPU" in result.stderr and "CUDA build" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_the_log_tail_is_rank_zeros(client, azure, capsys):
    client.jobs.get.side_effect = lambda name: azure_mocks.submitted_job(name, "Failed")

    def download(name, *, download_path=".", output_name=None, all=False):  # noqa: A002 - the SDK's name
        folder = os.path.join(download_path, "user_logs")
        os.makedirs(folder, exist_ok=True)
        for rank in (1, 0, 2):
            with open(os.path.join(folder, f"std_log_process_{rank}.txt"), "w") as log:
                log.write(f"rank {rank} says goodbye\n")

    client.jobs.download.side_effect = download
    code, _out, err = run_main(capsys)
    assert code == 1
    assert "std_log_process_0.txt" in err and "rank 0 says goodbye" in err and "rank 1" not in err
