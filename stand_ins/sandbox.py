"""A throwaway copy of the project's outputs, for the tests and the benchmarks: the steps' environment.

    env = isolated_env(work_dir)    # every output under work_dir, a free port pair, telemetry off

The steps then write data, models, jobs, the endpoint's files, mlflow.db, .env and Prompt flow's home under
work_dir, and none of your own settings leaks in: every setting config.py reads (config.SETTING_NAMES) is
dropped from the environment, and .env is work_dir's own.
"""

import os
import socket
from pathlib import Path

CONFIG_FILE = Path(__file__).resolve().parents[1] / "config.py"


def setting_names():
    """Every setting config.py reads from the environment, and the variable that points it at another .env.

    config.py is run as a module of its own here, not imported: `import config` would keep the settings of this
    moment, before the caller puts isolated_env() in place."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_config_setting_names", CONFIG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return set(module.SETTING_NAMES) | {"FINETUNE_PHI_ENV_FILE"}


def free_port_pair(host="127.0.0.1"):
    """A free TCP port whose next port is free too (the endpoint's blue slot uses it, green the next one)."""
    for _ in range(20):
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        with socket.socket() as sock:
            if sock.connect_ex((host, port + 1)) != 0:
                return port
    return port


def isolated_env(work_dir):
    """The environment to run the steps in, with every output under work_dir and no telemetry."""
    work_dir = Path(work_dir)
    names = setting_names()
    env = {name: value for name, value in os.environ.items() if name not in names}
    env.update({
        "TARGET": "local",
        "FINETUNE_PHI_ENV_FILE": str(work_dir / ".env"),
        "TRAIN_DATA_PATH": str(work_dir / "data" / "train_data.jsonl"),
        "TEST_DATA_PATH": str(work_dir / "data" / "test_data.jsonl"),
        "TINY_MODEL_DIR": str(work_dir / "models" / "tiny-phi3"),
        "PRETRAINED_MODEL_DIR": str(work_dir / "models" / "smollm2-135m-instruct"),
        "JOBS_DIR": str(work_dir / "outputs" / "jobs"),
        "LAST_JOB_FILE": str(work_dir / "outputs" / "last_job.json"),
        "LOCAL_ENDPOINT_DIR": str(work_dir / "outputs" / "endpoint"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{(work_dir / 'mlflow.db').as_posix()}",
        "LOCAL_ENDPOINT_PORT": str(free_port_pair()),
        "PF_HOME_DIRECTORY": str(work_dir / ".pf"),
        # As the Makefile exports them:
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "APPLICATIONINSIGHTS_CONTROLPLANE_DISABLED": "true",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "DO_NOT_TRACK": "1",
        "PYTHONUNBUFFERED": "1",
    })
    return env
