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
    assert list(record["candidates"]) == list(onnx_export.CANDIDATES)  # fastest first
    assert record["rule"] == {"max_perplexity_increase": config.ONNX_MAX_PERPLEXITY_INCREASE,
                              "max_score_loss": config.ONNX_MAX_SCORE_LOSS}
    assert record["transformers"]["perplexity"] > 1 and 0 <= record["transformers"]["f1"] <= 1
    chosen = record["chosen"]
    assert chosen and record["candidates"][chosen]["passes"]
    order = list(onnx_export.CANDIDATES)
    # The first that keeps the rule: every faster one was measured and failed, no slower one was measured.
    for name in order[:order.index(chosen)]:
        figures = record["candidates"][name]
        assert figures["measured"] and not figures["passes"] and figures["passes"] == onnx_export.passes(figures, record["rule"])
    assert not any(record["candidates"][name]["measured"] for name in order[order.index(chosen) + 1:])
    figures = record["candidates"][chosen]
    assert figures["questions"] == record["questions"] and figures["tokens_per_second"] > 0
    export = trained_model_dir / onnx_export.ONNX_FOLDER
    assert (export / "genai_config.json").is_file() and (export / "model.onnx").is_file()
    assert not [p for p in trained_model_dir.iterdir() if ".partial" in p.name]
    assert f"onnx export  {chosen} (" in demo_run.stdout  # the job's summary names the choice
    assert "of the job)" in demo_run.stdout  # and the export's share of the job's time
    assert "serving with onnxruntime-genai (SERVING_RUNTIME=auto)" in demo_run.stdout  # step 3 serves it


# --- the rule ------------------------------------------------------------------------------------------
RULE = {"max_perplexity_increase": 0.05, "max_score_loss": 0.03}


@pytest.mark.parametrize("figures, expected", [
    ({"perplexity_increase": 0.01, "f1_loss": 0.0, "rouge_l_loss": 0.0}, True),
    ({"perplexity_increase": 0.05, "f1_loss": 0.03, "rouge_l_loss": 0.03}, True),  # the limits themselves pass
    ({"perplexity_increase": 0.051, "f1_loss": 0.0, "rouge_l_loss": 0.0}, False),
    ({"perplexity_increase": 0.01, "f1_loss": 0.031, "rouge_l_loss": 0.0}, False),
    ({"perplexity_increase": 0.01, "f1_loss": 0.0, "rouge_l_loss": 0.031}, False),
    ({"perplexity_increase": -0.02, "f1_loss": -0.05, "rouge_l_loss": -0.01}, True),  # better is no harm
    ({"perplexity_increase": 0.2}, False),  # its perplexity failed: it was never asked for answers
])
def test_the_rule_weighs_perplexity_and_answer_scores(figures, expected):
    assert onnx_export.passes(figures, RULE) is expected


@pytest.mark.slow
def test_a_looser_rule_picks_a_faster_candidate_and_a_strict_one_may_pick_none(trained_model_dir, tmp_path):
    int4 = {"int4": onnx_export.CANDIDATES["int4"]}
    loose = linked_copy(trained_model_dir, tmp_path / "loose")
    record = onnx_export.export_onnx(loose, config.TEST_DATA_PATH, max_perplexity_increase=10.0, max_score_loss=1.0,
                                     questions=8, candidates=int4, log=lambda _: None)
    assert record["chosen"] == "int4" and (loose / "onnx" / "genai_config.json").is_file()
    assert "int4" in onnx_export.summary_line(record)
    strict = linked_copy(trained_model_dir, tmp_path / "strict")  # no candidate can be better than -100 %
    record = onnx_export.export_onnx(strict, config.TEST_DATA_PATH, max_perplexity_increase=-1.0, questions=8,
                                     candidates=int4, log=lambda _: None)
    assert record["chosen"] is None and not (strict / "onnx").exists()
    assert "f1" not in record["candidates"]["int4"]  # failed on perplexity: no answers were generated for it
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
    assert args.onnx_export and args.onnx_max_score_loss == 0.03  # on by default

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
    assert command[command.index("--onnx-max-score-loss") + 1] == str(config.ONNX_MAX_SCORE_LOSS)
    assert "--onnx-export" in command
    monkeypatch.setattr(config, "ONNX_EXPORT", False)
    monkeypatch.setattr(config, "ONNX_MAX_PERPLEXITY_INCREASE", 0.05)
    command = setup_ml.training_command(config.TINY_RECIPE, "t", "e", "o")
    assert "--no-onnx-export" in command and "--onnx-export" not in command
    assert command[command.index("--onnx-max-perplexity-increase") + 1] == "0.05"
    args = fine_tune.parse_args(command[1:])
    assert not args.onnx_export and args.onnx_max_perplexity_increase == 0.05
