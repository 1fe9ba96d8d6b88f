"""Shared test set-up: every test runs against a private copy of the project's outputs.

Settings are environment variables read by config.py at import, so they are set here, before any test
module imports a script. Nothing a test does touches the user's .env, data/, models/, outputs/ or
mlflow.db, and no test reaches the network.

Two loops:
  make test       every test (CI runs this)
  make test-fast  pytest -m "not slow": each module's logic in under 90 s on 2 cores, for while you work
A test marked `slow` (pytest.ini) needs `make demo` (the session's demo_run fixture: its model, endpoint or
data), a server process (the endpoint, pf flow serve, azmlinfsrv, the studio), a browser, an environment file's
venv, a whole-pipeline run or a real training run. A test that needs demo_run and is not marked slow stops
the collection (pytest_collection_modifyitems below), so the fast loop never starts the demo.
"""

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

PROJECT_DIR = Path(__file__).resolve().parents[1]
WORK_DIR = Path(tempfile.mkdtemp(prefix="finetune-phi-tests-"))


# The same throwaway-folder settings bench/pipeline.py runs the steps with: outputs under WORK_DIR, a free
# port pair for the blue/green endpoint, telemetry off, and none of the settings config.py reads (so nothing
# you exported, such as SPLIT_SEED or MAX_NEW_TOKENS_LIMIT, changes a result). sandbox.py does not import
# config: config reads the environment once, when a test module first imports it, after this.
sys.path.insert(0, str(PROJECT_DIR))
from stand_ins.sandbox import isolated_env  # noqa: E402 - the project folder must be on the path first

settings = isolated_env(WORK_DIR)
os.environ.clear()
os.environ.update(settings)
os.environ["HF_HUB_OFFLINE"] = "1"  # a Hub download fails at once instead of retrying for half a minute

from stand_ins.endpoint_process import free_port  # noqa: E402,F401 - for the tests; after the settings above

# finetuning_dir/ is the Azure job's code folder: its modules import each other as neighbours (`import chat_data`),
# so the tests put it on the path as the job has it.
sys.path.insert(1, str(PROJECT_DIR / "finetuning_dir"))


def write_recipe(path, recipe="recipes/tiny-phi3/sft/config_cpu.yaml", **changes):
    """A copy of a recipe with some values changed (a shorter run for a test); returns its path."""
    import yaml

    values = {**yaml.safe_load((PROJECT_DIR / recipe).read_text()), **changes}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(values))
    return Path(path)


def pytest_sessionfinish(session, exitstatus):
    """Remove the session's work folder when everything passed (kept for a look after a failure)."""
    if exitstatus == 0:
        import shutil

        shutil.rmtree(WORK_DIR, ignore_errors=True)


@contextlib.contextmanager
def server_process(command, health_url, log_name, cwd=PROJECT_DIR, env=None, timeout_s=90):
    """Run a server command (its own process group, output in WORK_DIR/log_name) until `health_url` answers 200;
    yield; then stop it and everything it started. A server that exits or never answers fails with its log."""
    import requests

    log_path = WORK_DIR / log_name
    with open(log_path, "w") as log:
        process = subprocess.Popen([str(part) for part in command], cwd=cwd, env=env or os.environ.copy(), stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            assert process.poll() is None, f"{command[0]} exited:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"{command[0]} did not answer:\n{log_path.read_text()[-3000:]}"
            try:  # a busy server (one sync worker loading its model) may not answer at once
                if requests.get(health_url, timeout=5).status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):
                pass
            time.sleep(0.3)
        yield process
    finally:
        stop_tree(process.pid)


def stop_tree(pid, grace_s=15):
    """Terminate a process and everything it started (psutil), then kill what is left after grace_s."""
    import psutil

    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    family = [parent, *parent.children(recursive=True)]
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.terminate()
    _, alive = psutil.wait_procs(family, timeout=grace_s)
    for member in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    psutil.wait_procs(alive, timeout=grace_s)


# --- A real browser (the chat page and the studio) ------------------------------------------------------------
# Headless Chromium from Debian (`apt-get install chromium chromium-driver`), driven by Selenium through Debian's
# chromedriver; nothing is downloaded. Without the browser a test is skipped, except in CI (the variable CI is
# set), where it fails.
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1280,900"]
def require_browser():
    """Skip without Chromium and its driver; in CI their absence is a failure."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.is_file()]
    if missing:
        reason = f"no {', '.join(missing)}: install them with `apt-get install chromium chromium-driver`"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture
def browser(monkeypatch):
    """Headless Chromium with a fresh profile; Selenium Manager is never asked to download anything."""
    import tempfile

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    require_browser()
    monkeypatch.setenv("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        for flag in BROWSER_FLAGS + [f"--user-data-dir={profile}"]:
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
        try:
            yield driver
        finally:
            driver.quit()


def run_script(*args, env=None, timeout=600, cwd=PROJECT_DIR):
    """Run a project command the way a user types it; returns the CompletedProcess (text)."""
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def pytest_collection_modifyitems(config, items):
    """A test that needs `make demo` (demo_run, directly or through another fixture) must be marked slow."""
    unmarked = [item.nodeid for item in items
                if "demo_run" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("slow")]
    if unmarked:
        raise pytest.UsageError("these tests need `make demo` (demo_run) but are not marked "
                                "@pytest.mark.slow:\n  " + "\n  ".join(unmarked))


@pytest.fixture(scope="session")
def work_dir():
    """The folder holding this test session's data, models and outputs."""
    return WORK_DIR


@pytest.fixture(scope="session")
def demo_run():
    """`make demo`, run once for the whole session with this interpreter's environment (no install)."""
    venv = Path(sys.prefix)
    result = subprocess.run(
        ["make", "demo", f"VENV={venv}", "-o", str(venv / ".requirements-installed")],
        cwd=PROJECT_DIR, capture_output=True, text=True, timeout=900, env=os.environ.copy(),
    )
    try:
        assert result.returncode == 0, f"make demo failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        yield result
    finally:
        run_script("cleanup.py")  # the demo leaves the local endpoint running, as it does for a user


@pytest.fixture(scope="session")
def trained_model_dir(demo_run):
    """The MLflow model that `make demo` fine-tuned."""
    import json

    record = json.loads(Path(os.environ["LAST_JOB_FILE"]).read_text())
    path = Path(record["model_output"])
    return path if path.is_absolute() else PROJECT_DIR / path


@pytest.fixture(scope="session")
def served_model_dir(trained_model_dir):
    """The MLflow model the serving tests load: the one `make demo` fine-tuned."""
    return trained_model_dir


# --- Prompt flow (step 4): no telemetry, no trace service --------------------------------------------
# What `pf config set telemetry.enabled=false trace.destination=none` writes (the Makefile runs it for .pf/),
# written here at import, like the settings above: Prompt flow reads pf.yaml once, when a test module first
# imports it (integrate_with_promptflow.py does), so a fixture would be too late. Writing the file also
# skips `pf config set`'s ~4 s and the telemetry event it sends before it turns telemetry off. Without
# trace.destination=none the first flow test starts a trace service on 127.0.0.1:23333 that outlives the tests.
PF_HOME = Path(os.environ["PF_HOME_DIRECTORY"])
PF_HOME.mkdir(parents=True, exist_ok=True)
(PF_HOME / "pf.yaml").write_text("telemetry:\n  enabled: 'false'\ntrace:\n  destination: none\n")


def read_env_file():
    """The settings deploy_model.py wrote to this session's .env (endpoint URL and key)."""
    from dotenv import dotenv_values

    return dotenv_values(os.environ["FINETUNE_PHI_ENV_FILE"])


# The cached venvs of the tests that need packages this venv cannot hold (Azure's environments, Agent Framework).
ENV_CACHE = Path(os.environ.get("FINETUNE_PHI_ENV_CACHE", Path.home() / ".cache" / "finetune-phi" / "envs"))


def cached_venv(folder, pip_args, what):
    """A venv in `folder` with `pip install *pip_args` done, reused while its .complete marker exists."""
    if (folder / ".complete").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)  # a build that was interrupted: start again
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, timeout=300)
    result = subprocess.run([str(folder / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                             *pip_args], capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, f"pip could not build {what}:\n{result.stderr[-3000:]}"
    (folder / ".complete").write_text("\n".join(pip_args) + "\n")  # written last: a folder without it is rebuilt
    return folder
