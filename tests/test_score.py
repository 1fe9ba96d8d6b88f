"""scoring_dir/score.py called directly, as Azure ML calls it: init() once, then run() per request."""

import inspect
import json
import os
import threading
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

SCORE_PY = Path(__file__).resolve().parents[1] / "scoring_dir" / "score.py"


def load_score_module():
    """A fresh copy of score.py (its own globals), imported from its file as Azure ML does."""
    from stand_ins.endpoint_server import load_scoring_script

    return load_scoring_script(SCORE_PY)




RUNTIMES = ("transformers", "onnxruntime-genai")


# Every test of `score` runs on the demo's model (`make demo`): slow.
@pytest.fixture(scope="module", params=[pytest.param(runtime, marks=pytest.mark.slow) for runtime in RUNTIMES])
def score(request, served_model_dir):
    """score.py, initialised on the served model, once with each runtime: every contract test runs on both."""
    module = load_score_module()
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MAX_NEW_TOKENS_LIMIT", raising=False)  # the tests expect the default limit, 512
        patch.setenv("SERVING_RUNTIME", request.param)
        module.init(str(served_model_dir))
    assert module._runtime == request.param
    return module


def token_count(score, text):
    """How many tokens a text is, without special tokens."""
    return len(score._tokenizer(text, add_special_tokens=False)["input_ids"])


# --- Inputs and answers ------------------------------------------------------------------------------

def test_a_question_gets_one_answer(score):
    answers = score.run(json.dumps({"input_data": "Who founded Microsoft?", "params": {"max_new_tokens": 16}}))
    assert isinstance(answers, list) and len(answers) == 1 and isinstance(answers[0], str)


def test_a_list_of_questions_gets_one_answer_each_like_one_by_one(score):
    questions = ["Who founded Microsoft?", "What is the capital of France?", "Write a haiku about the sea."]
    answers = score.run({"input_data": questions, "params": {"max_new_tokens": 12}})
    assert len(answers) == 3 and all(isinstance(answer, str) for answer in answers)
    # Batched with left padding, each answer matches the same question asked alone.
    assert answers == [score.run({"input_data": [q], "params": {"max_new_tokens": 12}})[0] for q in questions]


def test_conversations_and_questions_mixed(score):
    chat = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Who founded Microsoft?"},
        {"role": "assistant", "content": "Bill Gates and Paul Allen."},
        {"role": "user", "content": "When?"},
    ]
    answers = score.run({"input_data": [chat, "What is Python?"], "params": {"max_new_tokens": 8}})
    assert len(answers) == 2 and all(isinstance(answer, str) for answer in answers)


def test_the_chat_template_is_applied(score, served_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    question = "Who founded Microsoft?"
    tokenizer = AutoTokenizer.from_pretrained(served_model_dir / "components" / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(served_model_dir / "model")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           tokenize=False)
    assert prompt.startswith("<|user|>") and prompt.endswith("<|assistant|>\n")
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    expected = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert score.run({"input_data": [question], "params": {"max_new_tokens": 20}}) == [expected]


def test_max_new_tokens_bounds_the_answer(score):
    question = "Tell me a long story about a dragon."
    short = score.run({"input_data": [question], "params": {"max_new_tokens": 2, "do_sample": False}})[0]
    long = score.run({"input_data": [question], "params": {"max_new_tokens": 20, "do_sample": False}})[0]
    # Generation may stop earlier at <|end|>, so only bounds are certain.
    assert token_count(score, short) <= 2
    assert token_count(score, long) >= token_count(score, short)
    assert long.startswith(short)  # greedy: the short answer is the start of the long one


def test_return_full_text_prepends_the_question(score):
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Who founded Microsoft?"}]
    params = {"max_new_tokens": 8, "return_full_text": True}
    plain, full_chat = score.run({"input_data": ["Who founded Microsoft?", chat], "params": params})
    answer = score.run({"input_data": ["Who founded Microsoft?"], "params": {"max_new_tokens": 8}})[0]
    assert plain == f"Who founded Microsoft?\n{answer}"
    assert full_chat.startswith("Who founded Microsoft?\n")


def test_sampling_params_are_accepted(score):
    params = {"do_sample": True, "temperature": 1.3, "top_p": 0.9, "max_new_tokens": 8}
    assert isinstance(score.run({"input_data": ["Hello"], "params": params})[0], str)


def test_run_has_the_signature_azure_requires(score):
    # Azure's inference server refuses a run() with a second parameter not named request_headers.
    assert list(inspect.signature(score.run).parameters) == ["raw_data"]


def test_a_set_stop_event_ends_generation_at_once(score):
    stop = threading.Event()
    stop.set()
    answer = score.run_stoppable({"input_data": ["Tell me a long story."], "params": {"max_new_tokens": 200}}, stop)[0]
    assert token_count(score, answer) <= 1


def test_concurrent_calls_give_the_same_answers_as_sequential_ones(score):
    questions = [f"Question {i}: what is {i} plus {i}?" for i in range(4)]
    expected = [score.run({"input_data": [q], "params": {"max_new_tokens": 16}})[0] for q in questions]
    results = [None] * len(questions)

    def ask(i):
        results[i] = score.run({"input_data": [questions[i]], "params": {"max_new_tokens": 16}})[0]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == expected


# --- Bad requests ------------------------------------------------------------------------------------

@pytest.mark.parametrize("params, named", [
    ({"max_tokens": 5}, "max_tokens"),
    ({"max_new_tokens": True}, "max_new_tokens"),  # a bool is not a number of tokens
    ({"max_new_tokens": 5.0}, "max_new_tokens"),
    ({"max_new_tokens": "5"}, "max_new_tokens"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 513}, "max_new_tokens"),
    ({"temperature": 0}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": "warm"}, "temperature"),
    ({"temperature": False}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"do_sample": "yes"}, "do_sample"),
    ({"do_sample": 1}, "do_sample"),
    ({"return_full_text": None}, "return_full_text"),
])
def test_a_bad_param_is_refused_by_name(score, params, named):
    with pytest.raises(score.BadRequest, match=named):
        score.run({"input_data": ["Hi"], "params": params})


def test_the_message_says_what_is_allowed(score):
    with pytest.raises(score.BadRequest, match="max_new_tokens must be a whole number from 1 to 512"):
        score.run({"input_data": ["Hi"], "params": {"max_new_tokens": 1000}})
    with pytest.raises(score.BadRequest, match="allowed: max_new_tokens, temperature, top_p, do_sample, return_full_text"):
        score.run({"input_data": ["Hi"], "params": {"seed": 1}})


@pytest.mark.parametrize("request_body, says", [
    ("{not json", "not valid JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
    ("[1, 2]", "must be a JSON object"),
    ({"params": {}}, "no input_data"),
    ({"input_data": "Hi", "parameters": {}}, "unknown key"),
    ({"input_data": "Hi", "params": [1]}, "params must be a JSON object"),
    ({"input_data": []}, "non-empty list"),
    ({"input_data": 42}, "input_data must be"),
    ({"input_data": [42]}, r"input_data\[0\]"),
    ({"input_data": [[]]}, r"input_data\[0\]"),
    ({"input_data": [{"role": "user", "content": "Hi"}]}, "wrap a conversation in a list"),
    ({"input_data": [[{"role": "robot", "content": "Hi"}]]}, "role"),
    ({"input_data": [[{"role": "user", "content": 7}]]}, "content must be a string"),
    ({"input_data": [[{"role": "user"}]]}, "exactly those two keys"),
    ({"input_data": [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]]}, "end with a user"),
    ({"input_data": ["Hi", ["not a message"]]}, r"input_data\[1\]\[0\]"),
])
def test_a_bad_request_shape_is_refused(score, request_body, says):
    with pytest.raises(score.BadRequest, match=says):
        score.run(request_body)


def test_a_prompt_longer_than_the_context_is_refused(score):
    context = score._context_length  # the model's max_position_embeddings, for both runtimes
    assert context and context == score._tokenizer.model_max_length
    with pytest.raises(score.BadRequest, match="context"):
        score.run({"input_data": ["word " * context], "params": {"max_new_tokens": 1}})


# --- init(): where the model is found, and limits from the environment ------------------------------

@pytest.mark.slow
def test_init_finds_the_mlflow_model_below_azureml_model_dir(served_model_dir, tmp_path, monkeypatch):
    # Azure mounts a model registered from a job output as <AZUREML_MODEL_DIR>/model_output/MLmodel.
    (tmp_path / "model_output").symlink_to(served_model_dir, target_is_directory=True)
    monkeypatch.setenv("AZUREML_MODEL_DIR", str(tmp_path))
    module = load_score_module()
    module.init()
    assert len(module.run({"input_data": ["Hi"], "params": {"max_new_tokens": 4}})) == 1


def test_init_without_a_model_folder_says_what_to_set(monkeypatch):
    monkeypatch.delenv("AZUREML_MODEL_DIR", raising=False)
    with pytest.raises(RuntimeError, match="AZUREML_MODEL_DIR"):
        load_score_module().init()


def test_a_folder_without_mlmodel_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no MLmodel file"):
        load_score_module().find_model_folder(tmp_path)


def test_a_plain_transformers_folder_is_served_too():
    # The untrained base model (evaluate_flow.py --compare-base) is served from its own folder, no MLflow export.
    from stand_ins.tiny_model import ensure_tiny_phi3

    base = ensure_tiny_phi3()
    module = load_score_module()
    assert module.find_model_folder(base) == base
    module.init(str(base))
    (answer,) = module.run({"input_data": ["Who founded Microsoft?"], "params": {"max_new_tokens": 4}})
    assert isinstance(answer, str)


def test_run_before_init_fails_clearly():
    with pytest.raises(RuntimeError, match="init"):
        load_score_module().run({"input_data": ["Hi"]})


@pytest.mark.slow
def test_max_new_tokens_limit_comes_from_the_environment(served_model_dir, monkeypatch):
    monkeypatch.setenv("MAX_NEW_TOKENS_LIMIT", "8")
    module = load_score_module()
    module.init(str(served_model_dir))
    with pytest.raises(module.BadRequest, match="from 1 to 8"):
        module.run({"input_data": ["Hi"], "params": {"max_new_tokens": 9}})
    monkeypatch.setenv("MAX_NEW_TOKENS_LIMIT", "lots")
    with pytest.raises(ValueError, match="MAX_NEW_TOKENS_LIMIT"):
        module.init(str(served_model_dir))


# --- The serving runtime (SERVING_RUNTIME): transformers or fine_tune.py's ONNX Runtime GenAI export -------

@pytest.mark.slow
def test_both_runtimes_give_the_same_greedy_answers(served_model_dir, monkeypatch):
    # fine_tune.py keeps the fastest export whose answers score as well as transformers' (finetuning_dir/onnx_export.py);
    # where it kept every held-out greedy answer, these answers must be the same too.
    record = json.loads((served_model_dir / "onnx_export.json").read_text())
    figures = record["candidates"][record["chosen"]]
    questions = ["Who founded Microsoft?", "What is make demo?", "When did Apollo 11 land on the Moon?"]
    answers = {}
    for runtime in RUNTIMES:
        monkeypatch.setenv("SERVING_RUNTIME", runtime)
        module = load_score_module()
        module.init(str(served_model_dir))
        answers[runtime] = module.run({"input_data": questions, "params": {"max_new_tokens": 48}})
    if figures["identical_answers"] == figures["questions"]:
        assert answers["transformers"] == answers["onnxruntime-genai"]
    assert all(any(answer for answer in answers[runtime]) for runtime in RUNTIMES)


@pytest.mark.slow
def test_auto_serves_the_export_on_a_cpu_and_transformers_on_a_gpu(served_model_dir, monkeypatch):
    module = load_score_module()
    assert module.choose_runtime(served_model_dir, "auto") == "onnxruntime-genai"
    monkeypatch.setattr(module, "_has_cuda_gpu", lambda: True)
    assert module.choose_runtime(served_model_dir, "auto") == "transformers"
    assert module.choose_runtime(served_model_dir, "onnxruntime-genai") == "onnxruntime-genai"
    assert module.choose_runtime(served_model_dir, "transformers") == "transformers"


def test_a_model_without_an_export_serves_with_transformers(monkeypatch):
    from stand_ins.tiny_model import ensure_tiny_phi3

    base = ensure_tiny_phi3()  # a plain transformers folder: no onnx/
    module = load_score_module()
    assert module.choose_runtime(base, "auto") == "transformers"
    with pytest.raises(FileNotFoundError, match="SERVING_RUNTIME=transformers"):
        module.choose_runtime(base, "onnxruntime-genai")
    monkeypatch.setenv("SERVING_RUNTIME", "tensorrt")
    with pytest.raises(ValueError, match="SERVING_RUNTIME='tensorrt'"):
        module.init(str(base))


@pytest.mark.parametrize("bf16, expected", [(True, "bfloat16"), (False, "float16")])
def test_on_a_gpu_the_model_loads_in_bf16_or_fp16(monkeypatch, bf16, expected):
    # A GPU deployment (conda_gpu.yml): A100/H100 have bf16, T4/V100 only fp16; the CPU keeps the saved dtype.
    import torch
    from transformers import AutoModelForCausalLM

    loaded = []

    class Loaded:
        def to(self, device):
            loaded.append(device)
            return self

        def eval(self):
            return self

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda folder, dtype: loaded.append(dtype) or Loaded())
    load_score_module()._load_model("model")
    assert loaded == [getattr(torch, expected), "cuda"]
