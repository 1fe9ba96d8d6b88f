"""Any Phi on any machine: tiny stand-ins of each base model the README names, fine-tuned -> MLflow model ->
score.py (both runtimes); LOCAL_BASE_MODEL with the tutorial's training settings, steps 1-4; QLoRA's refusal
on a CPU; the memory estimate the job prints; the QLoRA merge into a plain copy of the base."""

import json

import pytest

import config
from conftest import PROJECT_DIR, run_script, write_recipe
from stand_ins import tiny_model
from stand_ins.sandbox import isolated_env

# slow: every test needs `make demo`'s data (the autouse fixture below), and most fine-tune or run steps 1-4.
pytestmark = pytest.mark.slow

FINE_TUNE = PROJECT_DIR / "finetuning_dir" / "fine_tune.py"
STAND_INS = ["phi-3.5-mini-longrope", "phi-3-mini-4k", "phi-4-mini"]
QUICK = ["--no-packing", "--no-gradient-checkpointing", "--batch-size", "8", "--eval-strategy", "no",
         "--max-length", "256", "--learning-rate", "5e-3"]


def stand_in(variant, folder):
    """A tiny random-weight stand-in of `variant`, built into `folder`."""
    return tiny_model.ensure_tiny_phi3(folder, variant=variant)


@pytest.fixture(autouse=True)
def session_data(demo_run):
    """The session's data files (data/train_data.jsonl, data/test_data.jsonl), which `make demo` writes."""


def fine_tune(tmp_path, base, *extra):
    """fine_tune.py on the session's data; returns the CompletedProcess."""
    return run_script(FINE_TUNE, "--train-file", config.TRAIN_DATA_PATH, "--eval-file", config.TEST_DATA_PATH,
                      "--model_output_dir", tmp_path / "model_output", "--checkpoint-dir", tmp_path / "checkpoints",
                      "--model-name", base, *QUICK, *extra,
                      env={"MLFLOW_TRACKING_URI": f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}"})


def load_score(model_dir, runtime, monkeypatch):
    """score.py initialised on model_dir with a runtime."""
    from test_score import load_score_module

    monkeypatch.setenv("SERVING_RUNTIME", runtime)
    module = load_score_module()
    module.init(str(model_dir))
    return module


# --- Each base model's stand-in, end to end ------------------------------------------------------------------
@pytest.mark.parametrize("variant", STAND_INS)
def test_each_base_model_fine_tunes_saves_and_serves(variant, tmp_path, monkeypatch):
    base = stand_in(variant, tmp_path / "base")
    source = json.loads((base / "config.json").read_text())
    result = fine_tune(tmp_path, base, "--max-steps", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Memory estimate" in result.stdout and "Method: auto chose full" in result.stdout
    model_dir = tmp_path / "model_output"
    saved = json.loads((model_dir / "model" / "config.json").read_text())
    for trait in ("tie_word_embeddings", "rope_parameters", "sliding_window", "num_key_value_heads"):
        assert saved.get(trait) == source.get(trait), trait  # the architecture survives fine-tuning and MLflow
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who founded Microsoft?"}]
    request = {"input_data": [chat, "What is make demo?"], "params": {"max_new_tokens": 12}}
    answers = {"transformers": load_score(model_dir, "transformers", monkeypatch).run(request)}
    record = json.loads((model_dir / "onnx_export.json").read_text())
    assert any(c["measured"] for c in record["candidates"].values())  # the builder exported this architecture
    if record["chosen"]:
        answers["onnxruntime-genai"] = load_score(model_dir, "onnxruntime-genai", monkeypatch).run(request)
        figures = record["candidates"][record["chosen"]]
        if figures["identical_answers"] == figures["questions"]:  # the export kept every held-out greedy answer
            assert answers["onnxruntime-genai"] == answers["transformers"]
    assert all(len(a) == 2 and all(isinstance(x, str) for x in a) for a in answers.values())


def test_the_phi4_stand_in_has_phi4s_traits_and_template(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    base = stand_in("phi-4-mini", tmp_path / "phi4")
    model_config = AutoConfig.from_pretrained(base)
    assert model_config.tie_word_embeddings and model_config.num_key_value_heads < model_config.num_attention_heads
    assert model_config.rope_parameters["partial_rotary_factor"] == 0.75
    prompt = AutoTokenizer.from_pretrained(base).apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<|user|>Hi<|end|><|assistant|>"  # Phi-4-mini's template: no newlines


# --- LOCAL_BASE_MODEL: a model of your own, the tutorial's training settings, steps 1-4 ------------------------
def test_a_local_base_model_gets_the_tutorials_training_settings(tmp_path):
    base = stand_in("phi-4-mini", tmp_path / "my-phi4")
    env = {"LOCAL_BASE_MODEL": str(base), "JOBS_DIR": str(tmp_path / "jobs"),
           "LAST_JOB_FILE": str(tmp_path / "last_job.json")}
    result = run_script("setup_ml.py", "--dry-run", "--job-name", "mine", env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    command = result.stdout.split()
    assert command[command.index("--model-name") + 1] == str(base)
    assert command[command.index("--config") + 1] == "recipes/phi-3.5-mini/sft/config_tutorial.yaml"
    # The tiny model keeps its measured recipe.
    tiny = run_script("setup_ml.py", "--dry-run", "--job-name", "tiny", env={**env, "LOCAL_BASE_MODEL": ""}, timeout=120)
    assert "--config recipes/tiny-phi3/sft/config_cpu.yaml" in tiny.stdout


def test_steps_one_to_four_run_on_a_local_base_model_folder(tmp_path):
    base = stand_in("phi-4-mini", tmp_path / "my-phi4")
    env = {**isolated_env(tmp_path / "work"), "LOCAL_BASE_MODEL": str(base),
           "RECIPE": str(write_recipe(tmp_path / "one-epoch.yaml", "recipes/phi-4-mini/sft/config_full.yaml", epochs=1))}
    for step in ("download_dataset.py", "setup_ml.py", "deploy_model.py", "integrate_with_promptflow.py"):
        result = run_script(step, env=env, timeout=600)
        assert result.returncode == 0, f"{step}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        if step == "setup_ml.py":
            assert "Method: auto chose full" in result.stdout and "Fine-tuning summary" in result.stdout
        if step == "integrate_with_promptflow.py":
            assert "A: " in result.stdout
    run_script("cleanup.py", env=env)
    assert not (tmp_path / "work" / "models").exists()  # no tiny model was built: the base was yours


def test_an_unknown_local_base_model_is_one_sentence(tmp_path):
    env = {"LOCAL_BASE_MODEL": "./models/nope", "JOBS_DIR": str(tmp_path / "jobs"),
           "LAST_JOB_FILE": str(tmp_path / "last_job.json")}
    result = run_script("setup_ml.py", "--dry-run", env=env, timeout=120)
    assert result.returncode != 0 and "neither a folder nor a Hub id" in result.stderr
    assert "Traceback" not in result.stderr


# --- Methods -------------------------------------------------------------------------------------------------
def test_qlora_on_a_cpu_stops_with_one_sentence_before_loading(tmp_path):
    result = fine_tune(tmp_path, tiny_model.ensure_tiny_phi3(), "--method", "qlora", "--max-steps", "1")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [errors[0]] and "needs a CUDA GPU" in errors[0] and "use lora or full" in errors[0]
    assert "Traceback" not in result.stderr and not (tmp_path / "model_output").exists()


def test_a_method_that_does_not_fit_is_refused_naming_one_that_does(tmp_path):
    # A machine with 64 MiB: full fine-tuning of the tiny model fits, so asking for more than there is fails.
    from finetuning_dir import memory_estimate

    base = json.loads((tiny_model.ensure_tiny_phi3() / "config.json").read_text())
    estimates = {m: memory_estimate.estimate(base, m, 512, 16, bf16=False) for m in memory_estimate.METHODS}
    with pytest.raises(memory_estimate.MethodError, match=r"full needs ~.* GiB and .* has less: use lora"):
        memory_estimate.choose_method("full", estimates, estimates["lora"]["total"] + 1, True, "a small GPU")


def test_lora_through_the_method_setting(tmp_path):
    result = fine_tune(tmp_path, tiny_model.ensure_tiny_phi3(), "--method", "lora", "--lora-r", "4",
                       "--max-steps", "2", "--no-onnx-export")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Method: lora needs" in result.stdout
    weights = list((tmp_path / "model_output" / "model").glob("*.safetensors"))
    from safetensors import safe_open

    with safe_open(weights[0], "pt") as tensors:
        assert not any("lora" in name for name in tensors.keys())  # merged: a plain model


def test_the_qlora_merge_gives_the_plain_merged_model(tmp_path):
    # On a GPU, qlora merges its adapters into a bf16 copy of the base reloaded from disk. The same code runs
    # here on a LoRA model (no 4-bit kernels on a CPU) and must give what merge_and_unload gives, in bf16.
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from finetuning_dir import fine_tune

    base = tiny_model.ensure_tiny_phi3()
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    args = fine_tune.parse_args(["--train-file", "t", "--eval-file", "e", "--model_output_dir", "o",
                                 "--model-name", str(base), "--method", "qlora"])
    merged = fine_tune.plain_model(model, args)
    assert merged.dtype == torch.bfloat16 and not hasattr(merged, "peft_config")
    expected = model.merge_and_unload()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        assert torch.allclose(merged(ids).logits.float(), expected(ids).logits.float(), atol=0.1)
