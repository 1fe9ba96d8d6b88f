"""The local job runner: the fine-tuning job as a process of this machine, standing in for an Azure ML job.

    run_local_job("finetune-phi-20261203-101500", training_args)   # what `python setup_ml.py` does locally

The "environment" is this venv, the "compute" is this machine (PROCESSES_PER_NODE > 1 runs torchrun), and
the job is finetuning_dir/fine_tune.py with the same command line as the Azure job: the same recipe (RECIPE),
on this machine's base model (LOCAL_BASE_MODEL, by default the tiny Phi-3). Its log, checkpoints and MLflow
model land in outputs/jobs/<job name>/; the job is recorded in outputs/last_job.json, where deploy_model.py
finds it. A job folder is never reused.
"""

import os
import re
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import config
from helpers.job_record import record_job
from stand_ins import tiny_model
from helpers.errors import LOG_TAIL_LINES, StepError, print_tail

FINETUNING_DIR = config.PROJECT_DIR / "finetuning_dir"
def job_folder(job_name):
    """Where a local job keeps its log, checkpoints and model_output."""
    return Path(config.JOBS_DIR) / job_name


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name, as microsoft/Phi-4-mini-instruct


def base_model(build=True):
    """LOCAL_BASE_MODEL: the tiny Phi-3 in TINY_MODEL_DIR (built on first use when `build`; a model of your own put
    there is used as it is and never rebuilt), a folder of yours, or a Hub id (fine_tune.py downloads it)."""
    if not config.LOCAL_BASE_MODEL_IS_TINY:
        folder = config.PROJECT_DIR / config.LOCAL_BASE_MODEL
        if folder.is_dir():
            return folder
        if not HUB_ID.match(config.LOCAL_BASE_MODEL):
            raise StepError(f"LOCAL_BASE_MODEL={config.LOCAL_BASE_MODEL!r} is neither a folder nor a Hub id "
                            "(owner/name, e.g. microsoft/Phi-4-mini-instruct)")
        return config.LOCAL_BASE_MODEL
    folder = Path(config.TINY_MODEL_DIR)
    if tiny_model.holds_other_model(folder) or not build:
        return folder
    return tiny_model.ensure_tiny_phi3(folder)


def base_model_folder():
    """The base model as a folder score.py can serve: its own, or for a Hub id the local copy (downloaded once)."""
    model = base_model()
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(model)))


def local_job_command(job_name, training_args, build=True):
    """The job's process: the Azure job's fine_tune.py command line (under torchrun for several processes), on the
    local base model, with this machine's folders; --fast-exit skips the 2-5 s teardown of torch."""
    job_dir = job_folder(job_name)
    script = [str(FINETUNING_DIR / training_args[0]), *training_args[1:],
              "--model-name", str(base_model(build)), "--checkpoint-dir", str(job_dir / "checkpoints"),
              "--loss-curves", str(job_dir / "loss_curves.png"), "--fast-exit"]
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


def run_local_job(job_name, training_args, dry_run=False):
    """Run the job as a local process and record how it ended; returns the step's exit code."""
    job_dir = job_folder(job_name)
    if dry_run:  # nothing is built, written or started
        print("Local job command:\n  " + " ".join(local_job_command(job_name, training_args, build=False)))
        return 0
    if job_dir.exists():
        raise StepError(f"{config.shown(job_dir)} already exists: choose another JOB_NAME (jobs are never overwritten).")
    command = local_job_command(job_name, training_args)
    job_dir.mkdir(parents=True)
    env = {"HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # progress bars are noise in a streamed job log
           **os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": config.MLFLOW_TRACKING_URI,
           "MLFLOW_EXPERIMENT_NAME": config.AZURE_EXPERIMENT_NAME, "FINETUNE_RUN_NAME": job_name}
    print(f"Running job {job_name} on this machine ({config.PROCESSES_PER_NODE} process(es)); "
          f"log: {config.shown(job_dir / 'log.txt')}")
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
