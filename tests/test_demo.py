"""`make demo`, the README's first command: every step ran and said what the README says it says."""

import json

import pytest

import config

pytestmark = pytest.mark.slow  # `make demo`, the whole tutorial


def test_demo_writes_both_data_files_with_the_readme_sizes(demo_run):
    assert "Training set size: 264" in demo_run.stdout and "Test set size: 66" in demo_run.stdout
    train = config.TRAIN_DATA_PATH.read_text(encoding="utf-8").splitlines()
    test = config.TEST_DATA_PATH.read_text(encoding="utf-8").splitlines()
    assert (len(train), len(test)) == (264, 66)
    assert all(json.loads(line)["messages"] for line in train + test)


def test_demo_shows_eval_loss_falling(demo_run):
    import re

    before, after = map(float, re.search(r"eval loss\s+([\d.]+) -> ([\d.]+)", demo_run.stdout).groups())
    perplexity = re.search(r"perplexity\s+([\d.]+) -> ([\d.]+)", demo_run.stdout)
    assert after < before and perplexity and float(perplexity[2]) < float(perplexity[1])


def test_demo_ends_with_the_endpoint_and_the_flow_answering(demo_run):
    assert "Smoke test: 'Who founded Microsoft?' -> 'Microsoft was founded by Bill Gates" in demo_run.stdout
    flow_part = demo_run.stdout[demo_run.stdout.rindex("Smoke test"):]
    assert flow_part.count("Bill Gates") >= 2  # the endpoint's answer, then the flow's
    assert "make chat" in flow_part


def test_demo_keeps_the_key_out_of_its_output(demo_run):
    from dotenv import dotenv_values

    key = dotenv_values(config.ENV_FILE)["AZURE_ML_API_KEY"]
    assert len(key) >= 32 and key not in demo_run.stdout and key not in demo_run.stderr
