"""Step 2 — fine-tune: set up the training environment and compute, run the fine-tuning job, stream its log.

    python setup_ml.py                          # local: trains the tiny Phi-3 on this machine (~30 s)
    python setup_ml.py --cancel                 # local: cancels a job an interrupted run left running
    TARGET=azure python setup_ml.py             # Azure ML: A100 cluster, command job, log streamed here
    TARGET=azure python setup_ml.py --dry-run   # builds and validates the job, no network call
    TARGET=azure python setup_ml.py --check     # asks Azure what the job needs (sign-in, quota, ...), submits nothing
    TARGET=serverless python setup_ml.py        # Azure AI Foundry's serverless fine-tuning (serverless/)

Azure ML: an Environment built from conda.yml, an AmlCompute cluster and a command job that runs
finetuning_dir/fine_tune.py with a declared `model_output` output. Locally the same command line runs as a
process of this machine (stand_ins/job_runner.py: this venv is the environment, this machine the compute,
PROCESSES_PER_NODE > 1 runs torchrun); its log and MLflow model land in outputs/jobs/<job name>/. Either way
the job is recorded in outputs/last_job.json, where deploy_model.py finds it.
"""

import argparse
import sys
from datetime import datetime
from pathlib import Path

import config
from helpers.azure_ml import (azure_errors, check_name, get_ml_client, print_job_log_tail, print_validated, state_name,
                      validate_job_bindings)
from helpers import preflight
from helpers.job_record import follow_azure_job
import serverless
from helpers.errors import StepError, exit_code

FINETUNING_DIR = config.PROJECT_DIR / "finetuning_dir"
CONDA_FILE = config.PROJECT_DIR / "conda.yml"


# --- The tutorial's functions (get_ml_client comes from helpers/azure_ml.py: steps 2, 3 and cleanup share it) -----
def create_or_get_environment(ml_client):
    """Register (or reuse) the training environment: the curated GPU image plus conda.yml."""
    return ml_client.environments.create_or_update(build_environment())


def create_or_get_compute_cluster(ml_client, compute_name, instance_type, location):
    """Return the cluster, creating it only when Azure says it does not exist."""
    from azure.core.exceptions import ResourceNotFoundError

    try:
        compute = ml_client.compute.get(compute_name)
    except ResourceNotFoundError:  # only "not found": an auth or network error must not look like "missing"
        print(f"Creating compute cluster {compute_name} ({instance_type} in {location or 'the workspace region'}) ...")
        return ml_client.compute.begin_create_or_update(build_compute_cluster(compute_name, instance_type, location)).result()
    # Unlike the tutorial, an existing cluster is checked: the wrong size trains on the wrong hardware, a small
    # max_instances queues a multi-node job forever.
    size = getattr(compute, "size", None) or ""  # a Kubernetes or attached compute has no size
    if compute.type != "amlcompute" or size.lower() != instance_type.lower():
        raise StepError(f"Compute {compute_name} exists as {compute.type} {size}, not amlcompute {instance_type}: "
                        "set AZURE_COMPUTE_NAME to a new name (or AZURE_COMPUTE_INSTANCE_TYPE to its size).")
    print(f"Using compute cluster {compute_name} ({compute.size})")
    if (compute.max_instances or 0) < config.INSTANCE_COUNT:
        print(f"Raising its max_instances from {compute.max_instances} to {config.INSTANCE_COUNT} (INSTANCE_COUNT) ...")
        compute.max_instances = config.INSTANCE_COUNT
        compute = ml_client.compute.begin_create_or_update(compute).result()
    return compute


def create_fine_tuning_job(env, compute_name, job_name=None):
    """The command job: two data inputs, a declared MLflow model output, optional multi-node distribution."""
    from azure.ai.ml import Input, Output, PyTorchDistribution, command
    from azure.ai.ml.constants import AssetTypes

    # The recipe travels as an input file, like the data. On a GPU SKU the job stops with the reason when torch
    # sees no GPU, instead of training on the CPU. outputs/ of a job is uploaded to its run by Azure ML: the loss
    # curves' PNG shows under the job's Outputs.
    args = training_command("${{inputs.recipe}}", "${{inputs.train_file}}", "${{inputs.eval_file}}",
                            "${{outputs.model_output}}",
                            ["--loss-curves", "outputs/loss_curves.png", *([] if config.USE_CPU_COMPUTE else ["--require-gpu"])])
    distributed = config.INSTANCE_COUNT > 1 or config.PROCESSES_PER_NODE > 1
    return command(
        name=job_name,
        display_name=job_name,
        experiment_name=config.AZURE_EXPERIMENT_NAME,
        description="Fine-tune Phi-3 with TRL SFT; writes an MLflow model to outputs.model_output",
        code=str(FINETUNING_DIR),
        command="python " + " ".join(args),
        inputs={
            "recipe": Input(type=AssetTypes.URI_FILE, path=str(config.RECIPE)),
            "train_file": Input(type=AssetTypes.URI_FILE, path=str(config.TRAIN_DATA_PATH)),
            "eval_file": Input(type=AssetTypes.URI_FILE, path=str(config.TEST_DATA_PATH)),
        },
        # The tutorial passed a plain "./model_output" string; a declared output is what step 3 registers.
        outputs={"model_output": Output(type=AssetTypes.MLFLOW_MODEL)},
        environment=env,
        compute=compute_name,
        instance_count=config.INSTANCE_COUNT,
        distribution=PyTorchDistribution(process_count_per_instance=config.PROCESSES_PER_NODE) if distributed else None,
        environment_variables={"DISABLE_MLFLOW_INTEGRATION": "TRUE"},  # the Trainer's autolog exceeds Azure ML's param limit
    )


def run_azure_job(job_name):
    """The tutorial's main(): environment, compute, submit, stream; then check how the job ended."""
    ml_client = get_ml_client()
    with azure_errors():
        preflight.before_training(ml_client)  # not in the tutorial: quota, providers, ... asked before anything is billed
        environment = create_or_get_environment(ml_client)
        create_or_get_compute_cluster(ml_client, config.AZURE_COMPUTE_NAME, config.AZURE_COMPUTE_INSTANCE_TYPE,
                                      config.AZURE_COMPUTE_LOCATION)
        check_processes_per_node(ml_client, config.AZURE_COMPUTE_INSTANCE_TYPE)
        job = ml_client.jobs.create_or_update(create_fine_tuning_job(environment, config.AZURE_COMPUTE_NAME, job_name))
        status, failure = follow_azure_job(job, "azure", lambda: stream_job(ml_client, job.name),
                                           studio_url=job.studio_url, workspace=config.AZURE_ML_WORKSPACE_NAME)
        if status is None:  # Ctrl+C: the job goes on in Azure ML
            return 130
        if status != "Completed":
            print(f"Job {job.name} ended with status {status}." + (f" Azure ML says: {failure}" if failure else ""),
                  file=sys.stderr)
            print_job_log_tail(ml_client, job.name)
            return 1
    print(f"Job {job.name} completed. Next: python deploy_model.py")
    return 0


def stream_job(ml_client, job_name):
    """Stream the job's log here until it ends; returns (status, Azure ML's words on a failure)."""
    from azure.ai.ml.exceptions import JobException

    failure = ""
    try:
        ml_client.jobs.stream(job_name)
    except JobException as error:
        # The SDK wraps Ctrl+C as JobException(...) from KeyboardInterrupt, and puts a failed job's reason
        # only in the exception's message (it prints nothing itself).
        if isinstance(error.__cause__, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        failure = str(error).strip()
    # jobs.stream() returns normally for a cancelled job: the status says how it ended.
    return state_name(ml_client.jobs.get(job_name).status), failure


# --- The entities the tutorial's functions submit ---------------------------------------------------------
def build_environment():
    """The training Environment entity."""
    from azure.ai.ml.entities import Environment

    return Environment(
        name=config.AZURE_ENVIRONMENT_NAME,
        description="Phi-3 fine-tuning: the versions in conda.yml, pinned like requirements.txt",
        image=config.AZURE_TRAINING_IMAGE,
        conda_file=str(CONDA_FILE),
    )


def build_compute_cluster(compute_name, instance_type, location):
    """The AmlCompute entity: scales to zero when idle, so an unused cluster costs nothing."""
    from azure.ai.ml.entities import AmlCompute

    return AmlCompute(
        name=compute_name,
        type="amlcompute",
        size=instance_type,
        location=location or None,  # None: the workspace's region
        tier=config.AZURE_COMPUTE_TIER,
        min_instances=config.AZURE_COMPUTE_MIN_INSTANCES,
        max_instances=max(config.AZURE_COMPUTE_MAX_INSTANCES, config.INSTANCE_COUNT),
        idle_time_before_scale_down=config.AZURE_COMPUTE_IDLE_SECONDS,
    )


def check_processes_per_node(ml_client, instance_type):
    """Refuse more processes per node than the SKU has GPUs (ranks without a GPU fail); CPU SKUs are not limited."""
    sizes = {size.name.lower(): size for size in ml_client.compute.list_sizes(location=config.AZURE_COMPUTE_LOCATION or None)}
    gpus = getattr(sizes.get(instance_type.lower()), "gpus", None)
    if isinstance(gpus, int) and 0 < gpus < config.PROCESSES_PER_NODE:
        raise StepError(f"{instance_type} has {gpus} GPU(s) per node: PROCESSES_PER_NODE={config.PROCESSES_PER_NODE} "
                        f"would start ranks without one. Set PROCESSES_PER_NODE to {gpus} (one process per GPU).")


def training_command(recipe, train_file, eval_file, model_output_dir, extra_args=()):
    """The fine_tune.py command line, the same for the Azure job and the local run: the recipe (RECIPE) holds what
    the run trains with, FINETUNE_METHOD and MAX_STEPS override it when set; the rest is this run's data and
    output, and the ONNX export's settings."""
    return ["fine_tune.py", "--config", recipe, "--train-file", train_file, "--eval-file", eval_file,
            "--model_output_dir", model_output_dir, *extra_args,
            *(["--method", config.FINETUNE_METHOD] if config.FINETUNE_METHOD else []),
            *(["--max-steps", str(config.MAX_STEPS)] if config.MAX_STEPS else []),
            "--onnx-export" if config.ONNX_EXPORT else "--no-onnx-export",
            "--onnx-max-perplexity-increase", str(config.ONNX_MAX_PERPLEXITY_INCREASE),
            "--onnx-max-score-loss", str(config.ONNX_MAX_SCORE_LOSS)]


def dry_run(job_name):
    """Build environment, compute and job, validate them with azure-ai-ml's schemas, print them; no network."""
    from azure.ai.ml import load_compute, load_environment, load_job

    environment = build_environment()
    compute = build_compute_cluster(config.AZURE_COMPUTE_NAME, config.AZURE_COMPUTE_INSTANCE_TYPE,
                                    config.AZURE_COMPUTE_LOCATION)
    job = create_fine_tuning_job(environment, config.AZURE_COMPUTE_NAME, job_name)
    validate_job_bindings(job)
    print_validated([("Environment", environment, load_environment), ("Compute cluster", compute, load_compute),
                     ("Command job", job, load_job)])
    print("Dry run: nothing was submitted.")
    return 0


def check_data_files():
    """Stop early, with the command to run, when step 1 has not been run (or RECIPE names no file)."""
    if not Path(config.RECIPE).is_file():
        recipes = ", ".join(sorted(path.relative_to(config.PROJECT_DIR).as_posix()
                                   for path in (config.PROJECT_DIR / "recipes").rglob("*.yaml")))
        raise StepError(f"RECIPE={config.shown(config.RECIPE)} is not a file: set RECIPE to one of {recipes}.")
    missing = [config.shown(p) for p in (config.TRAIN_DATA_PATH, config.TEST_DATA_PATH) if not Path(p).is_file()]
    if missing:
        raise StepError(f"{', '.join(missing)} not found: run `python download_dataset.py` first.")


def parse_args(argv=None):
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="build and validate everything, run or submit nothing")
    parser.add_argument("--check", action="store_true",
                        help="Azure: ask Azure whether the job can run (sign-in, providers, quota, image), submit nothing")
    parser.add_argument("--job-name", default=None, help="name for the job (default: JOB_NAME, or generated)")
    parser.add_argument("--cancel", action="store_true", help="local: cancel the job a previous run left running")
    return parser.parse_args(argv)


def main(argv=None):
    """Run step 2 for config.TARGET; returns the exit code."""
    args = parse_args(argv)
    job_name = args.job_name or config.JOB_NAME or f"finetune-phi-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    try:
        if config.TARGET == "local":  # this machine stands in for the cluster: stand_ins/job_runner.py
            from stand_ins import job_runner

            if args.cancel:
                return job_runner.cancel_running_job()
            if not args.dry_run:
                check_data_files()
            model_output = job_runner.job_folder(job_name) / "model_output"
            command = training_command(config.shown(config.RECIPE), str(config.TRAIN_DATA_PATH),
                                       str(config.TEST_DATA_PATH), str(model_output))
            return job_runner.run_local_job(job_name, command, dry_run=args.dry_run)
        if config.TARGET == "serverless":  # Azure AI Foundry fine-tunes a catalogue Phi: serverless/
            return serverless.finetune(job_name, args.dry_run, args.check)
        config.require(*config.AZURE_WORKSPACE_SETTINGS)
        check_name(config.AZURE_COMPUTE_NAME, "AZURE_COMPUTE_NAME", 32, "compute cluster")
        if args.check:
            with azure_errors():
                return preflight.checked(preflight.training_checks(get_ml_client()), "step 2 on Azure ML")
        check_data_files()
        return dry_run(job_name) if args.dry_run else run_azure_job(job_name)
    except StepError as error:  # config.MissingSettingsError included
        return exit_code(error)


if __name__ == "__main__":
    sys.exit(main())
