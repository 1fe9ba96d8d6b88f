"""The training job's ONNX Runtime GenAI export (finetuning_dir/onnx_export.py): built, measured against
transformers, the precision chosen by the rule, installed whole or not at all, recorded with the model."""

import json
import os
import shutil
import warnings

import pytest

import config
from finetuning_dir import fine_tune, onnx_export


def linked_copy(model_dir, folder):
    """An MLflow model folder with the demo's weights and tokenizer (links), and no export yet."""
    folder.mkdir()
    for name in ("MLmodel", "model", "components"):
        os.symlink(model_dir / name, folder / name)
    return folder


# --- the demo's model: what `make demo` exported ------------------------------------------------------
@pytest.mark.slow
def test_the_demo_model_carries_the_export_the_rule_chose(trained_model_dir, demo_run):
    record = json.loads((trained_model_dir / onnx_export.RECORD_FILE).read_text())
    assert set(record["candidates"]) == {"int4", "int8", "fp32"}
    assert record["rule"] == {"min_identical": config.ONNX_MIN_IDENTICAL_ANSWERS,
                              "max_perplexity_increase": config.ONNX_MAX_PERPLEXITY_INCREASE}
    assert record["questions"] == 40 and record["transformers"]["perplexity"] > 1
    chosen = record["chosen"]
    assert chosen and record["candidates"][chosen]["passes"]
    # The smallest precision that passes: every smaller one failed the rule.
    order = list(onnx_export.CANDIDATES)
    assert not any(record["candidates"][p]["passes"] for p in order[:order.index(chosen)])
    for figures in record["candidates"].values():
        assert figures["passes"] == onnx_export.passes(figures, record["rule"])
        assert 0 <= figures["identical"] <= figures["questions"] == 40 and figures["tokens_per_second"] > 0
    export = trained_model_dir / onnx_export.ONNX_FOLDER
    assert (export / "genai_config.json").is_file() and (export / "model.onnx").is_file()
    assert not [p for p in trained_model_dir.iterdir() if ".partial" in p.name]
    assert f"onnx export  {chosen} (" in demo_run.stdout  # the job's summary names the choice
    assert "serving with onnxruntime-genai (SERVING_RUNTIME=auto)" in demo_run.stdout  # step 3 serves it


# --- the rule ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("identical, increase, rule, expected", [
    (40, 0.0, (1.0, 0.01), True),
    (39, 0.0, (1.0, 0.01), False),  # one changed answer is a changed model
    (39, 0.0, (0.95, 0.01), True),
    (38, 0.0, (0.95, 0.01), True),  # 0.95 x 40 = 38
    (37, 0.0, (0.95, 0.01), False),
    (40, 0.011, (1.0, 0.01), False),
    (40, -0.02, (1.0, 0.01), True),  # lower perplexity is no harm
])
def test_the_rule_counts_identical_answers_and_perplexity(identical, increase, rule, expected):
    figures = {"identical": identical, "questions": 40, "perplexity_increase": increase}
    assert onnx_export.passes(figures, {"min_identical": rule[0], "max_perplexity_increase": rule[1]}) is expected


@pytest.mark.slow
def test_a_looser_rule_picks_a_smaller_precision_and_a_strict_one_may_pick_none(trained_model_dir, tmp_path):
    demo = json.loads((trained_model_dir / onnx_export.RECORD_FILE).read_text())
    int4 = demo["candidates"]["int4"]
    loose = linked_copy(trained_model_dir, tmp_path / "loose")
    record = onnx_export.export_onnx(loose, config.TEST_DATA_PATH, min_identical=0.5, max_perplexity_increase=0.05,
                                     questions=12, candidates={"int4": onnx_export.CANDIDATES["int4"]}, log=lambda _: None)
    assert record["chosen"] == "int4" and (loose / "onnx" / "genai_config.json").is_file()
    assert "int4" in onnx_export.summary_line(record)
    if int4["identical"] < 12:  # the demo's int4 changed answers: with the strict rule it must not be kept
        strict = linked_copy(trained_model_dir, tmp_path / "strict")
        record = onnx_export.export_onnx(strict, config.TEST_DATA_PATH, min_identical=1.0, questions=40,
                                         candidates={"int4": onnx_export.CANDIDATES["int4"]}, log=lambda _: None)
        assert record["chosen"] is None and not (strict / "onnx").exists()
        assert "serves with transformers" in onnx_export.summary_line(record)
        assert json.loads((strict / onnx_export.RECORD_FILE).read_text())["chosen"] is None


# --- nothing is lost or half-written -------------------------------------------------------------------
@pytest.mark.slow
def test_an_existing_export_is_never_overwritten(trained_model_dir, tmp_path):
    model = linked_copy(trained_model_dir, tmp_path / "model")
    (model / "onnx").mkdir()
    (model / "onnx" / "mine.txt").write_text("keep me")
    with pytest.raises(onnx_export.ExportError, match="never overwritten"):
        onnx_export.export_onnx(model, config.TEST_DATA_PATH)
    assert (model / "onnx" / "mine.txt").read_text() == "keep me"


@pytest.mark.slow
def test_a_failed_copy_leaves_no_export_and_no_partial_folder(trained_model_dir, tmp_path, monkeypatch):
    def copy_then_fail(source, destination):  # the disk fills up half-way through the copy
        destination.mkdir()
        shutil.copy2(source / "genai_config.json", destination)
        raise OSError("disk full")

    target = tmp_path / "model" / "onnx"
    target.parent.mkdir()
    monkeypatch.setattr(onnx_export.shutil, "copytree", copy_then_fail)
    with pytest.raises(OSError, match="disk full"):
        onnx_export.install(trained_model_dir / "onnx", target)
    assert list(target.parent.iterdir()) == []


def test_a_failed_export_is_a_warning_and_the_job_keeps_its_model(monkeypatch, tmp_path):
    args = fine_tune.parse_args(["--train-file", "t", "--eval-file", "e", "--model_output_dir", str(tmp_path)])
    assert args.onnx_export and args.onnx_min_identical == 1.0  # on by default

    def broken(*a, **k):
        raise onnx_export.ExportError("the model builder failed for int4")

    monkeypatch.setattr(fine_tune, "export_onnx", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fine_tune.export_for_cpus(args) is None
    assert any("serves with transformers" in str(w.message) for w in caught)


def test_the_job_command_carries_the_export_settings(monkeypatch):
    import setup_ml

    command = setup_ml.training_command(config.TINY_RECIPE, "t", "e", "o")
    assert command[command.index("--onnx-min-identical") + 1] == str(config.ONNX_MIN_IDENTICAL_ANSWERS)
    assert "--onnx-export" in command
    monkeypatch.setattr(config, "ONNX_EXPORT", False)
    monkeypatch.setattr(config, "ONNX_MAX_PERPLEXITY_INCREASE", 0.05)
    command = setup_ml.training_command(config.TINY_RECIPE, "t", "e", "o")
    assert "--no-onnx-export" in command and "--onnx-export" not in command
    assert command[command.index("--onnx-max-perplexity-increase") + 1] == "0.05"
    args = fine_tune.parse_args(command[1:])
    assert not args.onnx_export and args.onnx_max_perplexity_increase == 0.05
