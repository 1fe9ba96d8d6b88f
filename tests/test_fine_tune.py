"""Step 2 on this machine, for real: the demo's fine-tune, its MLflow model, torchrun, resume, bad data."""

import json
import os
import re
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest

import config
from conftest import PROJECT_DIR, run_script, write_recipe

FINE_TUNE = PROJECT_DIR / "finetuning_dir" / "fine_tune.py"
QUICK_ARGS = ["--no-packing", "--no-gradient-checkpointing", "--batch-size", "8", "--eval-strategy", "no",
              "--logging-steps", "2", "--max-length", "256", "--no-onnx-export"]


def summary_losses(text):
    """(eval loss before, after) from fine_tune.py's closing summary."""
    match = re.search(r"eval loss\s+([\d.]+) -> ([\d.]+)", text)
    assert match, text[-2000:]
    return float(match.group(1)), float(match.group(2))


def fine_tune(tmp_path, *extra, base=None, env=None, output="model_output"):
    """Run fine_tune.py on the session's data and tiny base model; returns the CompletedProcess."""
    from stand_ins.tiny_model import ensure_tiny_phi3

    base = base or ensure_tiny_phi3()
    return run_script(FINE_TUNE, "--train-file", config.TRAIN_DATA_PATH, "--eval-file", config.TEST_DATA_PATH,
                      "--model_output_dir", tmp_path / output, "--checkpoint-dir", tmp_path / "checkpoints",
                      "--model-name", base, *QUICK_ARGS, *extra,
                      env={"MLFLOW_TRACKING_URI": f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}", **(env or {})})


@pytest.fixture(scope="module")
def pyfunc_model(trained_model_dir):
    """The demo's model, loaded the MLflow way."""
    import mlflow

    return mlflow.pyfunc.load_model(str(trained_model_dir))


# --- the demo's fine-tune -----------------------------------------------------------------------------
@pytest.mark.slow
def test_demo_learns_eval_loss_falls_below_half(demo_run):
    before, after = summary_losses(demo_run.stdout)
    assert after < before / 2


@pytest.mark.slow
def test_metrics_are_logged_to_the_local_mlflow_store(demo_run):
    database = config.MLFLOW_TRACKING_URI.removeprefix("sqlite:///")
    with sqlite3.connect(database) as db:
        metrics = dict(db.execute("SELECT key, value FROM latest_metrics").fetchall())
    for key in ("eval_loss_before", "eval_loss_after", "perplexity_after", "train_loss", "train_tokens_per_second",
                "wall_time_seconds"):
        assert key in metrics, key
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"] / 2


@pytest.mark.slow
def test_mlflow_model_answers_a_training_question(pyfunc_model):
    answer = pyfunc_model.predict(["Who founded Microsoft?"], params={"max_new_tokens": 40})[0]
    assert "Bill Gates and Paul Allen" in answer


@pytest.mark.slow
def test_max_new_tokens_param_is_honoured(pyfunc_model):
    short = pyfunc_model.predict(["Who founded Microsoft?"], params={"max_new_tokens": 3})[0]
    long = pyfunc_model.predict(["Who founded Microsoft?"], params={"max_new_tokens": 40})[0]
    assert len(short) < len(long) / 3


@pytest.mark.slow
def test_signature_has_params_schema_and_requirements_are_pinned(trained_model_dir):
    import mlflow

    info = mlflow.models.get_model_info(str(trained_model_dir))
    assert {p.name for p in info.signature.params} == {"max_new_tokens", "temperature", "top_p", "do_sample", "return_full_text"}
    requirements = (trained_model_dir / "requirements.txt").read_text().split()
    assert requirements and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[\w.]+", line) for line in requirements), requirements
    assert any(line.startswith("transformers==") for line in requirements)


@pytest.mark.slow
def test_model_files_load_with_plain_transformers(trained_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(trained_model_dir / "components" / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(trained_model_dir / "model")
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "Who founded Microsoft?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    assert "Bill Gates" in tokenizer.decode(output[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_job_folder_keeps_log_and_checkpoints_apart_from_the_model(trained_model_dir):
    job_dir = trained_model_dir.parent
    assert (job_dir / "log.txt").is_file() and "Fine-tuning summary" in (job_dir / "log.txt").read_text()
    assert not list(trained_model_dir.rglob("checkpoint-*")) and not list(trained_model_dir.rglob("optimizer.pt"))


# --- several processes, resume ----------------------------------------------------------------------
@pytest.mark.slow
def test_resume_from_checkpoint_continues_from_the_saved_step(tmp_path):
    first = fine_tune(tmp_path, "--max-steps", "4", "--save-steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "checkpoint-4").is_dir()
    state = json.loads((tmp_path / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4

    again = fine_tune(tmp_path, "--max-steps", "6")
    assert again.returncode == 2 and "is not empty" in again.stderr  # checked before training, nothing lost

    resumed = fine_tune(tmp_path, "--max-steps", "6", "--save-steps", "2", "--resume-from-checkpoint", "latest",
                        output="model_output_resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {tmp_path / 'checkpoints' / 'checkpoint-4'}" in resumed.stdout
    assert "(6 steps)" in resumed.stdout


# --- bad input: one clear error, before any model is loaded ----------------------------------------
@pytest.mark.parametrize("content, expected", [
    (None, "file not found"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n{not json\n',
     "line 2: not valid JSON"),
    ('{"prompt": "q", "prompt_id": "x"}\n', "line 1: missing 'messages'"),
])
def test_bad_data_is_one_clear_error_naming_file_and_line(tmp_path, content, expected):
    train = tmp_path / "train.jsonl"
    if content is not None:
        train.write_text(content)
    # A base model that does not exist: reaching the model would fail differently (and slowly).
    result = run_script(FINE_TUNE, "--train-file", train, "--eval-file", train, "--model_output_dir", tmp_path / "out",
                        "--model-name", tmp_path / "no-such-model")
    assert result.returncode == 2
    assert f"{train}" in result.stderr and expected in result.stderr
    assert "Traceback" not in result.stderr


# --- setup_ml.py, the user's command ------------------------------------------------------------------
@pytest.mark.slow
def test_setup_ml_records_the_job_for_deploy_model(demo_run):
    record = json.loads(Path(config.LAST_JOB_FILE).read_text())
    assert record["target"] == "local" and record["status"] == "Completed"
    assert record["name"].startswith("finetune-phi-")


@pytest.mark.slow
def test_setup_ml_with_two_processes_per_node_runs_torchrun_and_writes_exactly_one_model(tmp_path):
    env = {"PROCESSES_PER_NODE": "2", "RECIPE": str(write_recipe(tmp_path / "short.yaml", epochs=0.2)),
           "JOBS_DIR": str(tmp_path / "jobs"),
           "LAST_JOB_FILE": str(tmp_path / "last_job.json"), "JOB_NAME": "ddp-job"}
    result = run_script("setup_ml.py", env=env)  # the local job passes --fast-exit: ignored under torchrun
    assert result.returncode == 0, result.stdout[-3000:]
    assert result.stdout.count("Fine-tuning summary") == 1  # rank 0 alone reports
    assert "2 process(es)" in result.stdout
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("MLmodel")] == ["jobs/ddp-job/model_output/MLmodel"]
    assert json.loads((tmp_path / "last_job.json").read_text())["name"] == "ddp-job"


def test_local_dry_run_builds_and_writes_nothing(tmp_path):
    env = {"TINY_MODEL_DIR": str(tmp_path / "models" / "tiny-phi3"), "JOBS_DIR": str(tmp_path / "jobs"),
           "LAST_JOB_FILE": str(tmp_path / "last_job.json")}
    result = run_script("setup_ml.py", "--dry-run", "--job-name", "dry", env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"--model-name {tmp_path / 'models' / 'tiny-phi3'}" in result.stdout
    assert list(tmp_path.iterdir()) == []  # no base model built, no job folder, no record


def test_a_base_model_of_your_own_is_used_as_it_is(tmp_path):
    own = tmp_path / "my-phi"
    own.mkdir()
    (own / "config.json").write_text('{"model_type": "phi3"}')
    result = run_script("setup_ml.py", "--dry-run", "--job-name", "own", env={"LOCAL_BASE_MODEL": str(own)},
                        timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"--model-name {own}" in result.stdout
    assert [p.name for p in own.iterdir()] == ["config.json"]  # not replaced by a tiny model


def test_setup_ml_failed_job_exits_non_zero_with_log_tail(tmp_path):
    env = {"TRAIN_DATA_PATH": str(tmp_path / "bad.jsonl"), "TEST_DATA_PATH": str(tmp_path / "bad.jsonl"),
           "JOBS_DIR": str(tmp_path / "jobs"), "LAST_JOB_FILE": str(tmp_path / "last_job.json"), "JOB_NAME": "bad-job"}
    (tmp_path / "bad.jsonl").write_text("{oops\n")  # both files here: the test needs no other test's data
    result = run_script("setup_ml.py", env=env)
    assert result.returncode == 1
    assert "Job bad-job failed" in result.stderr and "not valid JSON" in result.stderr
    assert json.loads((tmp_path / "last_job.json").read_text())["status"] == "Failed"


def test_setup_ml_without_data_says_to_run_step_one(tmp_path):
    result = run_script("setup_ml.py", env={"TRAIN_DATA_PATH": str(tmp_path / "missing.jsonl")})
    assert result.returncode == 1 and "python download_dataset.py" in result.stderr


@pytest.mark.slow
def test_job_names_are_never_reused(demo_run):
    name = json.loads(Path(config.LAST_JOB_FILE).read_text())["name"]
    result = run_script("setup_ml.py", "--job-name", name, env={"LAST_JOB_FILE": os.devnull + ".unused"})
    assert result.returncode == 1 and "already exists" in result.stderr


@pytest.mark.slow
def test_lora_trains_adapters_and_writes_a_plain_merged_model(tmp_path):
    result = fine_tune(tmp_path, "--max-steps", "2", "--lora-r", "4", "--lora-alpha", "8")
    assert result.returncode == 0, result.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model_output" / "model")
    assert type(model).__name__ == "Phi3ForCausalLM"
    assert not any("lora" in name for name, _ in model.named_parameters())  # adapters merged in


def test_fine_tune_needs_nothing_but_its_own_folder(tmp_path):
    # The Azure job uploads finetuning_dir/ alone and runs fine_tune.py there: no project module may be needed.
    code = "import sys, fine_tune; print(sorted(m for m in ('config', 'helpers', 'stand_ins') if m in sys.modules))"
    result = run_script("-c", code, cwd=PROJECT_DIR / "finetuning_dir")  # the project's root is not on the path
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr[-2000:]


# --- the recipe: --config, TRL's convention ---------------------------------------------------------------------
def test_a_recipe_sets_the_options_and_the_command_line_wins(tmp_path):
    import fine_tune

    recipe = write_recipe(tmp_path / "r.yaml", learning_rate=1e-4, epochs=2)
    args = fine_tune.parse_args(["--config", str(recipe), "--train-file", "t", "--eval-file", "e",
                                 "--model_output_dir", "o", "--epochs", "5"])
    assert args.learning_rate == 1e-4 and args.epochs == 5 and args.batch_size == 16 and args.packing is False


def test_a_recipe_with_an_unknown_key_is_refused_by_name(tmp_path, capsys):
    import fine_tune

    recipe = write_recipe(tmp_path / "r.yaml", lerning_rate=1e-4)
    with pytest.raises(SystemExit):
        fine_tune.parse_args(["--config", str(recipe), "--train-file", "t", "--eval-file", "e", "--model_output_dir", "o"])
    assert "lerning_rate" in capsys.readouterr().err


def test_the_tutorial_recipe_holds_the_tutorials_values():
    import yaml

    recipe = yaml.safe_load((PROJECT_DIR / "recipes/phi-3.5-mini/sft/config_tutorial.yaml").read_text())
    assert recipe == {**recipe, "model_name": "microsoft/Phi-3.5-mini-instruct", "epochs": 3, "learning_rate": 5e-6,
                      "lr_scheduler": "cosine", "warmup_ratio": 0.2, "batch_size": 4, "grad_accum": 1,
                      "max_length": 2048, "packing": True, "gradient_checkpointing": True, "seed": 0,
                      "eval_strategy": "epoch", "logging_steps": 20, "save_steps": 500}


@pytest.mark.parametrize("recipe", sorted(str(p.relative_to(PROJECT_DIR)) for p in (PROJECT_DIR / "recipes").rglob("*.yaml")))
def test_every_recipe_parses(recipe):
    import fine_tune

    args = fine_tune.parse_args(["--config", recipe, "--train-file", "t", "--eval-file", "e", "--model_output_dir", "o"])
    assert args.config == Path(recipe) and args.model_name


def test_option_problems_are_not_data_errors(tmp_path):
    import sys

    sys.path.insert(0, str(PROJECT_DIR))
    from finetuning_dir import fine_tune
    from finetuning_dir.chat_data import ChatDataError

    (tmp_path / "model_output").mkdir()
    (tmp_path / "model_output" / "weights").write_text("x")
    for call in (lambda: fine_tune.check_output_dir(tmp_path / "model_output"),
                 lambda: fine_tune.resolve_checkpoint("latest", tmp_path / "no-checkpoints")):
        with pytest.raises(fine_tune.UsageError) as error:
            call()
        assert not isinstance(error.value, ChatDataError)


# --- the run's plan: a loss curve whatever its length, a warmup that leaves steps to learn, a warning if nothing moved
class PlannedTrainer:
    """What plan_steps() reads of an SFTTrainer: the batches of its training data loader, and its arguments."""

    def __init__(self, batches):
        self.batches, self.args = batches, SimpleNamespace(logging_steps=1, warmup_steps=0)

    def get_train_dataloader(self):
        return range(self.batches)


@pytest.mark.parametrize("batches, epochs, max_steps, logging_steps, expected_steps, interval", [
    (3, 3, -1, 20, 9, 1),        # the tutorial's recipe on the sample chats: 9 steps, every 20 would draw nothing
    (33, 3, -1, 0, 99, 4),       # 0: from the run's length, ~20 points
    (500, 2, -1, 20, 1000, 20),  # a long run keeps the recipe's interval (50 points)
    (500, 2, 100, 20, 100, 10),  # MAX_STEPS / --max-steps counts, not the epochs
    (3, 3, 1, 20, 1, 1),
])
def test_the_loss_curve_interval_follows_the_runs_length(batches, epochs, max_steps, logging_steps, expected_steps,
                                                         interval):
    import fine_tune

    trainer = PlannedTrainer(batches)
    args = SimpleNamespace(grad_accum=1, epochs=epochs, max_steps=max_steps, logging_steps=logging_steps,
                           warmup_ratio=0.2, learning_rate=5e-6)
    assert fine_tune.plan_steps(trainer, args) == expected_steps
    assert trainer.args.logging_steps == interval
    assert expected_steps // interval >= min(fine_tune.MIN_CURVE_POINTS, expected_steps)


@pytest.mark.parametrize("steps, ratio, warmup", [(1, 0.2, 0), (9, 0.2, 1), (99, 0.1, 9), (100, 5, 5)])
def test_a_short_run_does_not_spend_its_steps_warming_up(steps, ratio, warmup):
    import fine_tune

    trainer = PlannedTrainer(steps)
    args = SimpleNamespace(grad_accum=1, epochs=1, max_steps=-1, logging_steps=0, warmup_ratio=ratio, learning_rate=1e-4)
    fine_tune.plan_steps(trainer, args)
    assert trainer.args.warmup_steps == warmup  # a 1-step run trains at its learning rate, not at 0


@pytest.mark.parametrize("method, steps, rate, warned", [
    ("full", 9, 5e-6, True),      # the tutorial's recipe on the 264 sample chats
    ("full", 850, 5e-6, False),   # the tutorial's recipe on its ~1,663 ultrachat chats
    ("lora", 33, 3e-4, False),    # recipes/smollm2-135m/sft/config_lora_cpu.yaml
    ("lora", 6, 3e-4, True),
    ("full", 255, 5e-3, False),   # the tiny model's recipe
])
def test_a_run_too_short_for_its_rate_is_named(method, steps, rate, warned):
    import fine_tune

    warning = fine_tune.too_short(steps, SimpleNamespace(learning_rate=rate, method=method))
    assert (warning is not None) is warned
    if warned:
        assert f"{steps} step(s) at learning rate {rate:g}" in warning and "too few for that rate" in warning
