"""A real pretrained model end to end: SmolLM2-135M-Instruct (stand_ins/pretrained_model.py makes it from a PyPI
package), fine-tuned briefly with its recipe, exported by answer quality, served by score.py with both runtimes.

It is not a Phi: Llama architecture, tied embeddings, the ChatML template (`<|im_end|>` ends a turn) and real
knowledge, so every Phi-only assumption and every "the fine-tune changed nothing" fails here. The figures of the
full recipe (base vs fine-tuned answers, every export candidate, llama.cpp beside us) are `make bench`'s
(bench/real_model.py, docs/benchmarks.md); these tests keep the same code paths to about two minutes on 2 cores.
"""

import json
import re
import shutil

import pytest

import config
from conftest import PROJECT_DIR, run_script

pytestmark = pytest.mark.slow  # real training runs (pytest.ini)

FINE_TUNE = PROJECT_DIR / "finetuning_dir" / "fine_tune.py"
RECIPE = PROJECT_DIR / "recipes" / "smollm2-135m" / "sft" / "config_lora_cpu.yaml"
SHORT = ["--max-length", "256", "--batch-size", "8"]  # the sample chats fit in 256 tokens


@pytest.fixture(scope="module")
def base_model():
    """The real model, built in the test session's own folder (PRETRAINED_MODEL_DIR)."""
    from stand_ins.pretrained_model import ensure_pretrained_model

    return ensure_pretrained_model(config.PRETRAINED_MODEL_DIR, log=lambda _: None)


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory):
    """The bundled chats: the first 264 to train (step 1's 80 %), 24 of the rest held out (fewer, for time)."""
    folder = tmp_path_factory.mktemp("chats")
    lines = config.SAMPLE_DATASET_PATH.read_text(encoding="utf-8").splitlines()
    (folder / "train.jsonl").write_text("\n".join(lines[:264]) + "\n", encoding="utf-8")
    (folder / "test.jsonl").write_text("\n".join(lines[264:288]) + "\n", encoding="utf-8")
    return folder / "train.jsonl", folder / "test.jsonl"


def fine_tune(base_model, chat_files, folder, *extra):
    """fine_tune.py with the real model's recipe, as the local job runs it; returns the CompletedProcess."""
    return run_script(FINE_TUNE, "--config", RECIPE, "--model-name", base_model, "--train-file", chat_files[0],
                      "--eval-file", chat_files[1], "--model_output_dir", folder / "model_output",
                      "--checkpoint-dir", folder / "checkpoints", "--loss-curves", folder / "loss_curves.png",
                      *SHORT, *extra, env={"MLFLOW_TRACKING_URI": f"sqlite:///{(folder / 'mlflow.db').as_posix()}"},
                      timeout=600)


@pytest.fixture(scope="module")
def trained(base_model, chat_files, tmp_path_factory):
    """A few LoRA steps of the recipe (its learning rate, its method), no export yet: (CompletedProcess, folder)."""
    folder = tmp_path_factory.mktemp("lora")
    result = fine_tune(base_model, chat_files, folder, "--max-steps", "6", "--no-onnx-export")
    assert result.returncode == 0, result.stderr[-3000:]
    return result, folder


def summary_figure(stdout, label):
    """The numbers on one line of the job's summary."""
    line = next(line for line in stdout.splitlines() if line.strip().startswith(label))
    return [float(number) for number in re.findall(r"[-+]?\d+\.\d+", line)]


def test_a_few_lora_steps_move_the_real_model_and_draw_a_curve(trained):
    result, folder = trained
    before, after = summary_figure(result.stdout, "perplexity")[:2]
    assert after < before * 0.99, result.stdout  # held-out perplexity per chat fell: the model learned
    assert "Plan: 6 optimizer steps" in result.stdout and "a loss-curve point every 1 step(s)" in result.stdout
    assert (folder / "loss_curves.png").stat().st_size > 10_000  # a 6-step run draws its curve


def test_the_memory_estimate_is_within_20_percent_of_the_measured_peak(trained):
    result, _ = trained
    peak, estimated = summary_figure(result.stdout, "memory")[:2]
    assert abs(estimated / peak - 1) <= 0.20, result.stdout


def test_the_saved_model_stops_at_chatmls_end_of_turn(trained, base_model):
    from transformers import AutoTokenizer

    _, folder = trained
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    saved = json.loads((folder / "model_output" / "model" / "generation_config.json").read_text())
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in saved["eos_token_id"]
    assert "<|end|>" not in tokenizer.get_vocab()  # not a Phi: nothing Phi-specific could have stopped it


@pytest.fixture(scope="module")
def exported(trained, chat_files, tmp_path_factory):
    """The export on a copy of the trained model, with a short measurement: (record, model folder, its log)."""
    from finetuning_dir import onnx_export

    _, folder = trained
    model_dir = tmp_path_factory.mktemp("export") / "model_output"
    shutil.copytree(folder / "model_output", model_dir)
    lines = []
    record = onnx_export.export_onnx(model_dir, chat_files[1], questions=6, max_new_tokens=24, log=lines.append)
    return record, model_dir, lines


def test_the_export_is_chosen_by_answer_quality_fastest_first(exported, capfd):
    from finetuning_dir import onnx_export

    record, model_dir, lines = exported
    assert record["transformers"]["f1"] > 0 and record["transformers"]["perplexity"] > 1
    names = list(onnx_export.CANDIDATES)
    chosen = record["chosen"]
    assert chosen, lines
    for name in names[:names.index(chosen)]:  # each faster one was measured and failed the rule
        assert record["candidates"][name]["measured"] and not record["candidates"][name]["passes"]
    figures = record["candidates"][chosen]
    assert figures["perplexity_increase"] <= config.ONNX_MAX_PERPLEXITY_INCREASE
    assert figures["f1_loss"] <= config.ONNX_MAX_SCORE_LOSS and figures["rouge_l_loss"] <= config.ONNX_MAX_SCORE_LOSS
    assert (model_dir / "onnx" / "genai_config.json").is_file()
    genai = json.loads((model_dir / "onnx" / "genai_config.json").read_text())
    saved = json.loads((model_dir / "model" / "generation_config.json").read_text())["eos_token_id"]
    assert set(saved) <= set(genai["model"]["eos_token_id"] if isinstance(genai["model"]["eos_token_id"], list)
                             else [genai["model"]["eos_token_id"]])  # ONNX Runtime GenAI stops where score.py does


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_a_successful_build_logs_no_error_lines(trained, precision, tmp_path, capfd):
    from finetuning_dir import onnx_export

    _, folder = trained
    hf = onnx_export.plain_transformers_folder(folder / "model_output", tmp_path / "hf")
    capfd.readouterr()
    onnx_export.build(hf, tmp_path / precision, precision, onnx_export.CANDIDATES[precision], tmp_path / "cache")
    out, err = capfd.readouterr()
    assert "ERROR" not in out + err and (tmp_path / precision / "model.onnx").is_file()


@pytest.mark.parametrize("runtime", ["transformers", "onnxruntime-genai"])
def test_score_py_answers_and_stops_at_the_end_of_the_turn(exported, runtime, monkeypatch):
    from test_score import load_score_module

    _, model_dir, _ = exported
    monkeypatch.setenv("SERVING_RUNTIME", runtime)
    score = load_score_module()
    score.init(str(model_dir))
    answers = score.run({"input_data": ["What is the capital of France?"], "params": {"max_new_tokens": 96}})
    assert "Paris" in answers[0] and "<|im_end|>" not in answers[0] and "<|im_start|>" not in answers[0]
    tokens = len(score._tokenizer(answers[0], add_special_tokens=False)["input_ids"])
    assert tokens < 90, answers[0]  # it ended its turn; it did not talk on to the token limit


def test_a_run_too_short_for_its_learning_rate_says_so_before_it_trains(trained):
    """Six LoRA steps at 3e-4 (1.8e-3, below LoRA's 5e-3): the job warns before its first step."""
    result, _ = trained
    assert "warning: 6 step(s) at learning rate 0.0003" in result.stderr and "too few for that rate" in result.stderr
