"""`make studio`: MLflow's UI on the local store, in a real browser — the fine-tuning run of `make demo` with
the loss curve it logged while training, and the registered versions with the one the endpoint serves.

The screenshot lands in <WORK_DIR>/screenshots/studio_run.png.
"""

import json
import sys
from pathlib import Path

import pytest

import config
from conftest import WORK_DIR, free_port, require_browser, server_process

# slow: every test reads what `make demo` left; the studio test serves MLflow's UI to a browser.
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings(
    "ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning")]  # MLflow's SQL store, on SQLAlchemy 2.1


def tracking_client():
    """An MLflow client on the session's local store (runs and registry)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=config.MLFLOW_TRACKING_URI, registry_uri=config.MLFLOW_TRACKING_URI)


def demo_fine_tuning_run(client):
    """The MLflow run of the job `make demo` ran (named after the job)."""
    job_name = json.loads(Path(config.LAST_JOB_FILE).read_text())["name"]
    experiment = client.get_experiment_by_name(config.AZURE_EXPERIMENT_NAME)
    (run,) = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{job_name}'")
    return run


@pytest.fixture(scope="module")
def studio(demo_run):
    """`make studio` on a free port (its own process group); yields its URL and stops it afterwards."""
    require_browser()
    venv, port = Path(sys.prefix), free_port()
    command = ["make", "studio", f"VENV={venv}", "-o", venv / ".requirements-installed", f"STUDIO_PORT={port}"]
    with server_process(command, f"http://127.0.0.1:{port}/health", "studio.log"):
        yield f"http://127.0.0.1:{port}"


def test_the_loss_curve_was_logged_while_the_job_trained(demo_run):
    client = tracking_client()
    run = demo_fine_tuning_run(client)
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert len(losses) >= 10, [m.step for m in losses]  # every 20 steps of ~255
    assert [m.step for m in losses] == sorted(m.step for m in losses)
    # Live: the first points were written long before the run ended (the summary is logged at the end).
    assert losses[0].timestamp < run.info.end_time - 5_000, (losses[0].timestamp, run.info.end_time)
    eval_losses = client.get_metric_history(run.info.run_id, "eval_loss")
    assert eval_losses[0].step == 0 and eval_losses[-1].value < eval_losses[0].value / 2
    for name in ("learning_rate", "tokens_per_second"):
        assert client.get_metric_history(run.info.run_id, name), name
    assert run.data.params["base_model"].endswith("tiny-phi3")


def test_the_loss_curves_picture_is_written_with_the_job(demo_run):
    job_name = json.loads(Path(config.LAST_JOB_FILE).read_text())["name"]
    data = (Path(config.JOBS_DIR) / job_name / "loss_curves.png").read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000  # a drawn chart, not an empty canvas


def test_the_serving_alias_names_the_version_the_endpoint_serves(demo_run):
    state = json.loads((Path(config.LOCAL_ENDPOINT_DIR) / "state.json").read_text())
    version = tracking_client().get_model_version_by_alias(config.AZURE_MODEL_NAME, "serving")
    assert int(version.version) == int(state["model_version"])


def test_the_studio_shows_the_run_and_its_loss_chart(studio, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    run = demo_fine_tuning_run(tracking_client())
    browser.set_window_size(1600, 4000)  # the page draws only the charts in view: the job logs 19 metrics, "loss" is the 7th
    browser.get(f"{studio}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}/model-metrics")

    def charts(driver):
        text = driver.find_element(By.TAG_NAME, "body").text
        drawn = driver.find_elements(By.CSS_SELECTOR, "div.js-plotly-plot")
        return drawn if run.info.run_name in text and "loss" in text.split() and drawn else False

    drawn = WebDriverWait(browser, 60).until(charts, message="the run's metric charts never appeared")
    screenshots = WORK_DIR / "screenshots"
    screenshots.mkdir(exist_ok=True)
    browser.save_screenshot(str(screenshots / "studio_run.png"))
    assert len(drawn) >= 3  # loss, eval_loss, learning_rate ... each its own chart
