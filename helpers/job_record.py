"""outputs/last_job.json: the fine-tuning job step 2 ran, so step 3 finds it without a copy from the studio.

setup_ml.py writes it (local and Azure jobs alike); deploy_model.py and the benchmarks read it.
`follow_azure_job()` is step 2's submit -> follow -> record for both Azure roads (Azure ML and serverless).
"""

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import config
from helpers.files import atomic_write_text
from helpers.errors import StepError


# Azure ML's job states before it ends (Completed, Failed, Canceled, NotResponding end it).
UNFINISHED = {"NotStarted", "Queued", "Preparing", "Provisioning", "Starting", "Running", "Finalizing",
              "CancelRequested"}


def record_job(name, target, status, **details):
    """Write outputs/last_job.json (atomically) and return the record."""
    record = {"name": name, "target": target, "status": status, "recorded": datetime.now(timezone.utc).isoformat(),
              **details}
    atomic_write_text(config.LAST_JOB_FILE, json.dumps(record, indent=2) + "\n")
    return record


def read_last_job():
    """The job setup_ml.py last ran, or None; a damaged file is a StepError, not a traceback."""
    path = Path(config.LAST_JOB_FILE)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise StepError(f"{config.shown(path)} is damaged ({error}): run `python setup_ml.py` again, "
                        "or pass --job-name.") from None
    if not isinstance(record, dict) or not isinstance(record.get("name"), str):
        raise StepError(f"{config.shown(path)} names no job: run `python setup_ml.py` again, or pass --job-name.")
    return record


def running_jobs():
    """{job name: pid of its process group} of this project's local jobs that still run, found by their command lines
    (their paths are under JOBS_DIR): a job just started, or whose own process was killed, counts too."""
    import psutil

    jobs_dir, found = str(config.JOBS_DIR), {}
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if jobs_dir not in " ".join(cmdline) or process.pid == os.getpid():
            continue
        try:
            if "stand_ins.job_runner" in cmdline:
                found[cmdline[cmdline.index("stand_ins.job_runner") + 1]] = os.getpgid(process.pid)
            elif any(part.endswith("fine_tune.py") for part in cmdline):
                name = Path(cmdline[cmdline.index("--model_output_dir") + 1]).parent.name
                found.setdefault(name, os.getpgid(process.pid))
        except (OSError, ValueError, IndexError):  # ended meanwhile, or not a job's command line after all
            continue
    return found


def job_is_running(record):
    """True while the recorded local job runs (its job process, or a training it left behind)."""
    return record.get("name") in running_jobs()


def find_job(job_name, target):
    """The job to deploy: `job_name`, or the one setup_ml.py recorded (which must have completed)."""
    record = read_last_job()
    if job_name:
        return record if record and record.get("name") == job_name else {"name": job_name, "target": target}
    if not record:
        raise StepError("No fine-tuning job recorded: run `python setup_ml.py` first, or pass --job-name.")
    if record.get("target") != target:
        raise StepError(f"The last job, {record['name']}, ran with TARGET={record.get('target')}, not {target}: "
                        "run setup_ml.py for this target, or pass --job-name.")
    status = record.get("status")
    if status in UNFINISHED and target == "local" and not job_is_running(record):
        raise StepError(f"The last job, {record['name']}, was interrupted before it ended (its process is gone): "
                        "run `python setup_ml.py` again.")
    if status in UNFINISHED and target == "local":
        raise StepError(f"The last job, {record['name']}, is still running on this machine (pid {record['pid']}): "
                        f"wait until it has completed (`tail -f {record.get('job_dir', 'outputs/jobs/' + record['name'])}"
                        "/log.txt`), then run `python deploy_model.py` again.")
    if status in UNFINISHED:  # rerunning setup_ml.py now would start a second job beside this one
        raise StepError(f"The last job, {record['name']}, is still {status}: wait until it has completed "
                        f"({record.get('studio_url') or 'see the studio'}), then run `python deploy_model.py` again.")
    if status != "Completed":
        raise StepError(f"The last job, {record['name']}, is {status}, not Completed: "
                        "run `python setup_ml.py` again (or pass --job-name).")
    return record


def model_output_dir(record):
    """Where a local job's MLflow model is (an absolute path)."""
    path = Path(record.get("model_output") or Path(config.JOBS_DIR) / record["name"] / "model_output")
    return path if path.is_absolute() else config.PROJECT_DIR / path


def follow_azure_job(job, target, follow, **details):
    """Record a submitted Azure job, follow it until it ends, record how it ended; returns (status, failure text).

    `follow()` returns (status, Azure's words on a failure, or ""). Ctrl+C stops following, not the job: it is
    recorded as Running (deploy_model.py then waits for it) and the command that cancels it is printed; the
    status is then None.
    """
    record_job(job.name, target, getattr(job.status, "value", job.status), **details)
    print(f"Submitted job {job.name}\nStudio: {job.studio_url}")
    try:
        status, failure = follow()
    except KeyboardInterrupt:
        record_job(job.name, target, "Running", **details)
        print(f"\nStopped following. The job keeps running (and billing) in Azure; cancel it with\n"
              f"  az ml job cancel --name {job.name} --workspace-name {config.AZURE_ML_WORKSPACE_NAME} "
              f"--resource-group {config.AZURE_RESOURCE_GROUP_NAME}\nor from the studio link above. Once it has "
              "completed, run `python deploy_model.py`.")
        return None, ""
    record_job(job.name, target, status, **details)
    return status, failure
