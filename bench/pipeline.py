"""Wall time of every local step of `make demo`, run as the user runs them, and where that time goes.

    python bench/pipeline.py                    # ~1.5 min on 2 cores: a table of steps, then import costs
    python bench/pipeline.py --json pipeline.json --keep
    python bench/pipeline.py --env OMP_NUM_THREADS=1 --import-repeats 0   # the same, with one variable changed

Runs, each as the user's own command in a subprocess with this interpreter (the venv already exists):

    python download_dataset.py -> python setup_ml.py -> python deploy_model.py -> python integrate_with_promptflow.py

(without that last script: `pf flow test --flow . --inputs input_data="Who founded Microsoft?"`), then
`python cleanup.py`, timed but not part of the total. Every output goes to a fresh temporary folder
(stand_ins/sandbox.py's isolated_env(), which tests/conftest.py uses too: TRAIN_DATA_PATH, TINY_MODEL_DIR, JOBS_DIR,
MLFLOW_TRACKING_URI, a free LOCAL_ENDPOINT_PORT pair, PF_HOME_DIRECTORY, ...), so nothing of yours is touched
and every run starts as a first `make demo` after install does: no data, no base model, no MLflow database.
Telemetry is off as in the Makefile, and `pf config set telemetry.enabled=false trace.destination=none` runs
first (untimed: the Makefile writes the same pf.yaml before every target). The endpoint the pipeline starts is always stopped (cleanup.py, then the
process of this run's own pid files if it is still there).

Where the time goes: figures the steps print themselves (tiny model build, fine-tune wall vs training seconds,
endpoint ready time, the flow's own time), and the cold-import cost of the heavy packages each process loads,
each measured as `python -c "import a, b"` minus `python -c "pass"` in a fresh interpreter (--import-repeats
times, the fastest kept). The target (TARGET_S) is the issue's: the whole pipeline within 60 s on 2 cores.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_DIR))

from stand_ins import endpoint_process  # noqa: E402 - the project folder must be on the path first
from stand_ins.sandbox import isolated_env  # noqa: E402 - the environment the tests run the steps in, too
from helpers.errors import StepError  # noqa: E402
PYTHON = sys.executable
TARGET_S = 60  # the target for the whole local pipeline on 2 cores

# The user's commands, in `make demo` order, plus the first answer of the flow (step 4).
STEPS = [
    ("1 dataset", ["download_dataset.py"]),
    ("2 fine-tune", ["setup_ml.py"]),
    ("3 deploy", ["deploy_model.py"]),
    ("4 first answer", ["integrate_with_promptflow.py"]),
]
CLEANUP = ("cleanup", ["cleanup.py"])

# Every Python process of the pipeline and the heavy packages it imports (at the top or inside a function).
PROCESS_IMPORTS = [
    ("download_dataset.py", ["download_dataset", "datasets"]),
    ("setup_ml.py (+ tiny model build)", ["setup_ml", "stand_ins.job_runner", "tokenizers", "transformers", "torch"]),
    ("fine_tune.py (job process)", ["fine_tune", "torch", "transformers", "trl", "datasets", "mlflow", "mlflow.transformers"]),
    ("deploy_model.py", ["deploy_model", "mlflow", "requests"]),
    ("endpoint server (server process)", ["stand_ins.endpoint_server", "uvicorn", "torch", "transformers"]),
    ("integrate_with_promptflow.py", ["integrate_with_promptflow", "promptflow.client"]),
    ("cleanup.py", ["cleanup"]),
]
# Single packages, for the "which import is heavy" view.
SINGLE_IMPORTS = ["torch", "transformers", "trl", "datasets", "mlflow", "promptflow.core", "promptflow.client",
                  "azure.ai.ml", "uvicorn", "starlette", "requests", "dotenv"]

# What the steps print about themselves (regex -> name of the figure, in seconds).
INNER_FIGURES = [
    (r"Built the tiny Phi-3 base model .*\(([\d.]+) s\)", "tiny model build"),
    (r"wall time\s+([\d.]+) s \(training ([\d.]+) s\)", "fine_tune.py wall | training"),
    (r"Job \S+ completed in ([\d.]+) s", "local job (setup_ml.py's count)"),
    (r"Ready in ([\d.]+) s", "endpoint start to first answer ready"),
    (r"\(([\d.]+) s; inputs, outputs", "flow test (PFClient().test)"),
]


def parse_args(argv=None):
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--import-repeats", type=int, default=2, help="cold imports per package set (fastest kept); 0 skips")
    parser.add_argument("--step-timeout-s", type=int, default=600)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="an extra environment variable for every step, to measure a fix (e.g. OMP_NUM_THREADS=1)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if any("=" not in item for item in args.env):
        parser.error("--env takes NAME=VALUE")
    args.env = dict(item.split("=", 1) for item in args.env)
    return args


def run_command(command, env, timeout_s):
    """Run a command in the project folder; returns (exit code, seconds, combined output)."""
    started = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=timeout_s,
                                stdin=subprocess.DEVNULL)
        code, output = result.returncode, result.stdout + result.stderr
    except subprocess.TimeoutExpired as error:
        code, output = 124, f"timed out after {timeout_s} s\n{error.stdout or ''}"
    return code, time.perf_counter() - started, output if isinstance(output, str) else output.decode(errors="replace")


def inner_figures(output):
    """The timings a step printed about itself."""
    figures = {}
    for pattern, name in INNER_FIGURES:
        match = re.search(pattern, output)
        if match:
            figures[name] = " | ".join(f"{float(value):.1f}" for value in match.groups())
    return figures


def stop_leftover_endpoints(work_dir):
    """Stop endpoint processes cleanup.py missed: only those this run's own pid files name."""
    for pid_file in (work_dir / "outputs" / "endpoint").glob("*.pid"):
        try:
            record = endpoint_process.read_pid_record(pid_file)
        except StepError:
            continue
        if record:
            endpoint_process.stop(*record)


def step_command(script, pf):
    """The command of a step: `python <script>`; for step 4 without its script, `pf flow test` (None: skip)."""
    if (PROJECT_DIR / script[0]).is_file():
        return [PYTHON, *script], "python " + " ".join(script)
    if script[0] == "integrate_with_promptflow.py" and pf.exists():
        command = [str(pf), "flow", "test", "--flow", ".", "--inputs", "input_data=Who founded Microsoft?"]
        return command, 'pf flow test --flow . --inputs input_data="Who founded Microsoft?"'
    return None, f"python {script[0]} (missing: skipped)"


def run_pipeline(env, timeout_s):
    """The steps in order (stopping at the first failure), then cleanup; returns the step rows."""
    pf = Path(PYTHON).with_name("pf")
    if pf.exists():
        run_command([str(pf), "config", "set", "telemetry.enabled=false", "trace.destination=none"], env, timeout_s)
    rows = []
    for name, script in [*STEPS, CLEANUP]:
        if name != CLEANUP[0] and any(row["exit"] != 0 for row in rows):
            continue
        command, shown = step_command(script, pf)
        if command is None:
            print(f"  {name:<15} skipped: {script[0]} does not exist")
            continue
        code, seconds, output = run_command(command, env, timeout_s)
        rows.append({"step": name, "command": shown, "exit": code, "seconds": seconds,
                     "inner": inner_figures(output), "tail": output.strip().splitlines()[-6:] if code else []})
        print(f"  {name:<15} {seconds:6.1f} s  exit {code}", flush=True)
    return rows


def import_seconds(modules, repeats):
    """Fastest wall time of `python -c "import <modules>"` minus an empty interpreter's, in the project folder."""
    def fastest(code):
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            subprocess.run([PYTHON, "-c", code], cwd=PROJECT_DIR, env=import_env(), capture_output=True, check=True)
            times.append(time.perf_counter() - started)
        return min(times)

    return fastest(f"import {', '.join(modules)}") - fastest("pass")


def import_env():
    """Imports see the project folder and finetuning_dir (where fine_tune.py runs), and no project outputs."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT_DIR), str(PROJECT_DIR / "finetuning_dir")])}


def print_steps(rows):
    """The pipeline table."""
    print(f"\n{'step':<15} {'command':<40} {'seconds':>8}  exit  the step's own figures (s)")
    for row in rows:
        inner = "; ".join(f"{key} {value}" for key, value in row["inner"].items())
        print(f"{row['step']:<15} {row['command']:<40} {row['seconds']:>8.1f}  {row['exit']:>4}  {inner}")
        for line in row["tail"]:
            print(f"{'':>17}| {line}")
    total = sum(row["seconds"] for row in rows if row["step"] != CLEANUP[0])
    verdict = "within" if total <= TARGET_S else "over"
    print(f"{'total (steps 1-4)':<56} {total:>8.1f}  ({verdict} the {TARGET_S} s target)")
    return total


def main(argv=None):
    """Run the pipeline in a temporary folder, then measure import costs; print both."""
    args = parse_args(argv)
    print(f"Machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} (1 min) at start")
    if args.env:
        print("Extra environment: " + " ".join(f"{name}={value}" for name, value in args.env.items()))
    work_dir = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    try:
        rows = run_pipeline({**isolated_env(work_dir), **args.env}, args.step_timeout_s)
    finally:
        stop_leftover_endpoints(work_dir)
        if not args.keep:
            shutil.rmtree(work_dir, ignore_errors=True)
    total = print_steps(rows)
    if args.keep:
        print(f"Kept {work_dir}")

    imports = {}
    if args.import_repeats > 0:
        print(f"\nCold import cost (fastest of {args.import_repeats}; interpreter start-up subtracted)")
        for process, modules in PROCESS_IMPORTS:
            imports[process] = import_seconds(modules, args.import_repeats)
            print(f"  {process:<38} {imports[process]:5.1f} s  import {', '.join(modules)}", flush=True)
        for module in SINGLE_IMPORTS:
            imports[module] = import_seconds([module], args.import_repeats)
            print(f"  {module:<38} {imports[module]:5.1f} s")
        in_pipeline = sum(imports[process] for process, _ in PROCESS_IMPORTS)
        print(f"  imports across the pipeline's {len(PROCESS_IMPORTS)} processes: {in_pipeline:.1f} s of {total:.1f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"cores": os.cpu_count(), "extra_env": args.env, "steps": rows, "total_s": total,
                                         "import_seconds": imports}, indent=2) + "\n")
        print(f"Wrote {args.json}")
    return 0 if all(row["exit"] == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
