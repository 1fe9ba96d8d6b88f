"""Step 2 — fine-tune: set up the training environment and compute, run the fine-tuning job, stream its log.

    python setup_ml.py                          # local: trains the tiny Phi-3 on this machine (~30 s)
    TARGET=azure python setup_ml.py             # Azure ML: A100 cluster, command job, log streamed here
    TARGET=azure python setup_ml.py --dry-run   # builds and validates the job, no network call

Both targets run the same finetuning_dir/fine_tune.py command line. Locally the "environment" is this
venv, the "compute" is this machine (PROCESSES_PER_NODE > 1 runs torchrun) and the "job" is a process
whose log and MLflow model land in outputs/jobs/<job name>/. In Azure ML it is an Environment built from
conda.yml, an AmlCompute cluster and a command job with a declared `model_output` output. Either way the
job name is recorded in outputs/last_job.json, where deploy_model.py finds it.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from collections import deque
from datetime import datetime, timezone
from pathlib import Path

import config
from ml_client import StepError, azure_errors, exit_with, get_ml_client
from safe_write import atomic_write_text

FINETUNING_DIR = config.PROJECT_DIR / "finetuning_dir"
CONDA_FILE = config.PROJECT_DIR / "conda.yml"
LOG_TAIL_LINES = 30
# The tiny local model learns from scratch: see the LOCAL_* settings in config.py for the why.
LOCAL_TRAINING_ARGS = [
    "--no-packing",  # whole chats, one per row: the tiny model memorizes them more cleanly
    "--no-gradient-checkpointing",  # a 1M-parameter model has no memory to save
    "--group-by-length",  # batches of similar length: ~1.4x faster than random batches with padding
    "--assistant-only-loss",  # learn the answers, not the questions (the tiny template has generation marks)
    "--eval-strategy", "no",  # eval loss is measured before and after training instead of every epoch
    "--logging-steps", "100",
    "--save-steps", "200",
    "--fast-exit",  # skip the 2-5 s teardown of torch after the summary (fine_tune.py ignores it under torchrun)
]


# --- The job's name and where it is recorded -------------------------------------------------------
def new_job_name():
    """A readable, unique job name (or JOB_NAME from config)."""
    return config.JOB_NAME or f"finetune-phi-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def record_job(name, target, status, **details):
    """Write outputs/last_job.json so deploy_model.py needs no copy-and-paste from the studio."""
    record = {"name": name, "target": target, "status": status, "recorded": datetime.now(timezone.utc).isoformat(), **details}
    atomic_write_text(config.LAST_JOB_FILE, json.dumps(record, indent=2) + "\n")
    return record


def read_last_job():
    """The job setup_ml.py last ran, or None."""
    path = Path(config.LAST_JOB_FILE)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def check_data_files():
    """Stop early, with the command to run, when step 1 has not been run."""
    missing = [config.shown(p) for p in (config.TRAIN_DATA_PATH, config.TEST_DATA_PATH) if not Path(p).is_file()]
    if missing:
        raise StepError(f"{', '.join(missing)} not found: run `python download_dataset.py` first.")


# --- Azure ML: environment, compute, job ------------------------------------------------------------
def create_or_get_environment(ml_client):
    """Register (or reuse) the training environment: the curated GPU image plus conda.yml."""
    return ml_client.environments.create_or_update(build_environment())


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
        location=location,
        tier=config.AZURE_COMPUTE_TIER,
        min_instances=config.AZURE_COMPUTE_MIN_INSTANCES,
        max_instances=max(config.AZURE_COMPUTE_MAX_INSTANCES, config.INSTANCE_COUNT),
        idle_time_before_scale_down=config.AZURE_COMPUTE_IDLE_SECONDS,
    )


def create_or_get_compute_cluster(ml_client, compute_name, instance_type, location):
    """Return the cluster, creating it only when Azure says it does not exist."""
    from azure.core.exceptions import ResourceNotFoundError

    try:
        compute = ml_client.compute.get(compute_name)
        print(f"Using compute cluster {compute_name} ({compute.size})")
        return compute
    except ResourceNotFoundError:  # only "not found": an auth or network error must not look like "missing"
        print(f"Creating compute cluster {compute_name} ({instance_type} in {location}) ...")
        return ml_client.compute.begin_create_or_update(build_compute_cluster(compute_name, instance_type, location)).result()


def training_command(train_file, eval_file, model_output_dir, extra_args=()):
    """The fine_tune.py command line, the same for the Azure job and the local run."""
    return ["fine_tune.py", "--train-file", train_file, "--eval-file", eval_file,
            "--model_output_dir", model_output_dir, *extra_args]


def create_fine_tuning_job(env, compute_name, job_name=None):
    """The command job: two data inputs, a declared MLflow model output, optional multi-node distribution."""
    from azure.ai.ml import Input, Output, PyTorchDistribution, command
    from azure.ai.ml.constants import AssetTypes

    args = training_command("${{inputs.train_file}}", "${{inputs.eval_file}}", "${{outputs.model_output}}",
                            ["--model-name", config.AZURE_BASE_MODEL_NAME])
    distributed = config.INSTANCE_COUNT > 1 or config.PROCESSES_PER_NODE > 1
    return command(
        name=job_name,
        display_name=job_name,
        experiment_name=config.AZURE_EXPERIMENT_NAME,
        description="Fine-tune Phi-3 with TRL SFT; writes an MLflow model to outputs.model_output",
        code=str(FINETUNING_DIR),
        command="python " + " ".join(args),
        inputs={
            "train_file": Input(type=AssetTypes.URI_FILE, path=str(config.TRAIN_DATA_PATH)),
            "eval_file": Input(type=AssetTypes.URI_FILE, path=str(config.TEST_DATA_PATH)),
        },
        outputs={"model_output": Output(type=AssetTypes.MLFLOW_MODEL)},
        environment=env,
        compute=compute_name,
        instance_count=config.INSTANCE_COUNT,
        distribution=PyTorchDistribution(process_count_per_instance=config.PROCESSES_PER_NODE) if distributed else None,
        environment_variables={"DISABLE_MLFLOW_INTEGRATION": "TRUE"},  # the Trainer's autolog exceeds Azure ML's param limit
    )


def validate_entities(environment, compute, job):
    """Check the entities with azure-ai-ml's own schemas (dump -> load) and the job's bindings; no network."""
    import tempfile

    from azure.ai.ml import load_compute, load_environment, load_job

    from marshmallow import ValidationError

    with tempfile.TemporaryDirectory() as folder:
        # command() returns a pipeline node; _to_job() is the standalone job that jobs.create_or_update sends.
        for entity, loader, name in ((environment, load_environment, "environment"), (compute, load_compute, "compute"),
                                     (job._to_job(), load_job, "job")):
            path = Path(folder) / f"{name}.yml"
            entity.dump(path)
            try:
                loader(path)  # raises ValidationError on unknown fields or wrong types
            except ValidationError as error:
                raise StepError(f"The {name} does not validate: {error.messages}") from None
    # The component check catches ${{inputs.x}} that names no input. Its naming rule (no hyphens) is for
    # registered components only, not for job names, so that one message is left out.
    result = job.component._validate()
    problems = {path: message for path, message in result.error_messages.items() if path != "name"}
    if problems:
        raise StepError(f"The job does not validate: {problems}")


def dry_run(job_name):
    """Build and validate environment, compute and job, print them, and call nothing remote."""
    environment = build_environment()
    compute = build_compute_cluster(config.AZURE_COMPUTE_NAME, config.AZURE_COMPUTE_INSTANCE_TYPE, config.AZURE_COMPUTE_LOCATION)
    job = create_fine_tuning_job(environment, config.AZURE_COMPUTE_NAME, job_name)
    validate_entities(environment, compute, job)
    for title, entity in (("Environment", environment), ("Compute cluster", compute), ("Command job", job._to_job())):
        print(f"--- {title} (validated) ---")
        print(yaml_of(entity))
    print("Dry run: nothing was submitted.")
    return 0


def yaml_of(entity):
    """An entity as the YAML azure-ai-ml would write for it."""
    import io

    buffer = io.StringIO()
    entity.dump(buffer)
    return buffer.getvalue()


def print_azure_log_tail(ml_client, job_name):
    """Download the job's logs and print the last lines of its standard output."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        try:
            ml_client.jobs.download(job_name, download_path=folder, all=True)
        except Exception as error:  # noqa: BLE001 - the job already failed; this is only extra detail
            print(f"(could not download the job's logs: {type(error).__name__}; open the studio link above)", file=sys.stderr)
            return
        logs = sorted(Path(folder).rglob("std_log*.txt"))
        if not logs:
            print("(no std_log.txt found in the job's logs; open the studio link above)")
            return
        print_tail(logs[-1].read_text(encoding="utf-8", errors="replace").splitlines(), logs[-1].name)


def print_tail(lines, title):
    """Print the last LOG_TAIL_LINES of a log."""
    print(f"--- last {LOG_TAIL_LINES} lines of {title} ---", file=sys.stderr)
    for line in list(lines)[-LOG_TAIL_LINES:]:
        print(line, file=sys.stderr)


def run_azure_job(job_name):
    """Submit the job, stream its log, and check how it ended (a cancelled job streams out normally)."""
    from azure.ai.ml.exceptions import JobException

    ml_client = get_ml_client()
    with azure_errors():
        environment = create_or_get_environment(ml_client)
        create_or_get_compute_cluster(ml_client, config.AZURE_COMPUTE_NAME, config.AZURE_COMPUTE_INSTANCE_TYPE,
                                      config.AZURE_COMPUTE_LOCATION)
        job = ml_client.jobs.create_or_update(create_fine_tuning_job(environment, config.AZURE_COMPUTE_NAME, job_name))
        record_job(job.name, "azure", job.status, studio_url=job.studio_url, workspace=config.AZURE_ML_WORKSPACE_NAME)
        print(f"Submitted job {job.name}\nStudio: {job.studio_url}")
        try:
            ml_client.jobs.stream(job.name)
        except JobException:
            pass  # the status check below reports it, with the log's tail
        except KeyboardInterrupt:
            print(f"\nStopped streaming. The job keeps running in Azure ML; cancel it with\n"
                  f"  az ml job cancel --name {job.name} --workspace-name {config.AZURE_ML_WORKSPACE_NAME} "
                  f"--resource-group {config.AZURE_RESOURCE_GROUP_NAME}\nor from the studio link above.")
            return 130
        status = ml_client.jobs.get(job.name).status
        record_job(job.name, "azure", status, studio_url=job.studio_url, workspace=config.AZURE_ML_WORKSPACE_NAME)
        if status != "Completed":
            print(f"Job {job.name} ended with status {status}.", file=sys.stderr)
            print_azure_log_tail(ml_client, job.name)
            return 1
    print(f"Job {job.name} completed. Next: python deploy_model.py")
    return 0


# --- Local: the same job on this machine ------------------------------------------------------------
def local_job_command(job_dir):
    """The local process: fine_tune.py (under torchrun for several processes) on the tiny model."""
    from tiny_phi3 import ensure_tiny_phi3

    base_model = config.BASE_MODEL_NAME
    if Path(base_model) == Path(config.LOCAL_BASE_MODEL_DIR):
        ensure_tiny_phi3()
    args = training_command(str(config.TRAIN_DATA_PATH), str(config.TEST_DATA_PATH), str(job_dir / "model_output"), [
        "--model-name", str(base_model), "--checkpoint-dir", str(job_dir / "checkpoints"),
        "--epochs", str(config.LOCAL_EPOCHS), "--learning-rate", str(config.LOCAL_LEARNING_RATE),
        "--batch-size", str(config.LOCAL_BATCH_SIZE), "--max-length", str(config.LOCAL_MAX_LENGTH),
        *LOCAL_TRAINING_ARGS,
    ])
    script = [str(FINETUNING_DIR / args[0]), *args[1:]]
    if config.PROCESSES_PER_NODE > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={config.PROCESSES_PER_NODE}", *script]
    return [sys.executable, *script]


def stream_process(command, log_path, env):
    """Run `command`, echo its output and keep it in `log_path`; returns (exit code, last lines)."""
    tail = deque(maxlen=LOG_TAIL_LINES)
    with open(log_path, "w", encoding="utf-8") as log, subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, encoding="utf-8",
        errors="replace", cwd=config.PROJECT_DIR,
    ) as process:
        for line in process.stdout:
            print(line, end="", flush=True)
            log.write(line)
            tail.append(line.rstrip("\n"))
    return process.returncode, tail


def run_local_job(job_name):
    """Run the fine-tuning job as a local process; its model lands in outputs/jobs/<name>/model_output."""
    check_data_files()
    job_dir = Path(config.JOBS_DIR) / job_name
    if job_dir.exists():
        raise StepError(f"{config.shown(job_dir)} already exists: choose another JOB_NAME (jobs are never overwritten).")
    job_dir.mkdir(parents=True)
    command = local_job_command(job_dir)
    env = {"HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # progress bars are noise in a streamed job log
           **os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": config.MLFLOW_TRACKING_URI,
           "MLFLOW_EXPERIMENT_NAME": config.AZURE_EXPERIMENT_NAME, "FINETUNE_RUN_NAME": job_name}
    print(f"Running job {job_name} on this machine ({config.PROCESSES_PER_NODE} process(es)); log: {config.shown(job_dir / 'log.txt')}")
    started = time.perf_counter()
    try:
        code, tail = stream_process(command, job_dir / "log.txt", env)
    except KeyboardInterrupt:
        print(f"\nJob {job_name} cancelled; its folder {config.shown(job_dir)} is kept.", file=sys.stderr)
        return 130
    status = "Completed" if code == 0 else "Failed"
    record_job(job_name, "local", status, job_dir=config.shown(job_dir), model_output=config.shown(job_dir / "model_output"))
    if code != 0:
        print(f"Job {job_name} failed (exit code {code}) after {time.perf_counter() - started:.0f} s.", file=sys.stderr)
        print_tail(tail, "log.txt")
        return 1
    print(f"Job {job_name} completed in {time.perf_counter() - started:.0f} s. Next: python deploy_model.py")
    return 0


def parse_args(argv=None):
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="Azure: build and validate everything, submit nothing")
    parser.add_argument("--job-name", default=None, help="name for the job (default: JOB_NAME, or generated)")
    return parser.parse_args(argv)


def main(argv=None):
    """Run step 2 for config.TARGET; returns the exit code."""
    args = parse_args(argv)
    job_name = args.job_name or new_job_name()
    try:
        if config.TARGET == "local":
            if args.dry_run:
                print("Local job command:\n  " + " ".join(local_job_command(Path(config.JOBS_DIR) / job_name)))
                return 0
            return run_local_job(job_name)
        config.require(*config.AZURE_WORKSPACE_SETTINGS)
        check_data_files()
        return dry_run(job_name) if args.dry_run else run_azure_job(job_name)
    except (StepError, config.MissingSettingsError) as error:
        return exit_with(error)


if __name__ == "__main__":
    sys.exit(main())
