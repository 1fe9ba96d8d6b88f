"""The scoring script of the online deployment: Azure ML and stand_ins/endpoint_server.py both call init() and run().

Azure ML uploads this folder alone as the deployment's code, so this file imports nothing from the project but
its neighbour contract.py, and reads its limits from environment variables that the deployment (or
stand_ins/endpoint_server.py) sets:

    MAX_NEW_TOKENS_LIMIT      the largest max_new_tokens a request may ask for (default 512)
    MAX_INPUTS_PER_REQUEST    the most inputs (questions or conversations) one request may carry (default 4)
    SERVING_RUNTIME           auto (default), onnxruntime-genai or transformers: see choose_runtime()

A request and its answer (one answer string per input):

    {"input_data": ["Who founded Microsoft?"], "params": {"max_new_tokens": 128, "return_full_text": true}}
    -> ["Who founded Microsoft?\\nMicrosoft was founded by Bill Gates and Paul Allen."]

`input_data` is a question, a list of questions (each its own one-turn chat), or a list of conversations,
each a list of {"role": "system"|"user"|"assistant", "content": "..."} ending with a user turn. Every input
is formatted with the model's own chat template, so the model answers rather than continues the question.

A malformed request is answered 400 (413 for too many inputs) with {"error": "<what to change>"}, the same on
both servers: on Azure's inference server (azmlinfsrv, which answers any exception from run() with a
generic 500) run() returns that answer as an AMLResponse; stand_ins/endpoint_server.py maps the BadRequest
that run_stoppable() raises. Where azmlinfsrv's package is absent, this file imports and runs all the same.
"""

import json
import logging
import os
import threading
import time
from pathlib import Path

try:  # only inside Azure's inference server (azureml-inference-server-http); None elsewhere
    from azureml_inference_server_http.api.aml_response import AMLResponse
except ImportError:
    AMLResponse = None

logger = logging.getLogger(__name__)

# The contract's values (paths, params and their defaults, limits) live in contract.py beside this file:
# Azure ML uploads this folder as the deployment's code and puts it on sys.path, as the local endpoint does.
from contract import DEFAULT_MAX_INPUTS_PER_REQUEST, DEFAULT_MAX_NEW_TOKENS_LIMIT, MAX_JSON_DEPTH, PARAMS, ROLES  # noqa: E402

SERVING_RUNTIMES = ("auto", "onnxruntime-genai", "transformers")
ONNX_FOLDER = "onnx"  # fine_tune.py's ONNX Runtime GenAI export, inside the MLflow model (finetuning_dir/onnx_export.py)

_model = None  # transformers: the causal LM; onnxruntime-genai: an og.Model
_runtime = None  # the runtime that serves, once init() has run
_tokenizer = None
_stop_ids = []  # the ids that end an answer: the model's own list (end of text, end of a turn)
_context_length = None
_top_k = 50  # sampling's top-k, as the model's generation config has it (transformers' default: 50)
_max_new_tokens_limit = DEFAULT_MAX_NEW_TOKENS_LIMIT
_max_inputs_per_request = DEFAULT_MAX_INPUTS_PER_REQUEST
# One generation at a time: the tokenizer is not thread-safe, and on a CPU parallel generations only
# compete for the same cores. stand_ins/endpoint_server.py caps how many requests wait here.
_lock = threading.Lock()


class BadRequest(ValueError):
    """The request is malformed: the caller must change it (HTTP 400, or `status`: 413 for too many inputs)."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


def find_model_folder(root):
    """The model to load: an MLflow model (an MLmodel file; weights in model/) at root or one or two levels
    below it (e.g. root/model_output), or a plain transformers folder (config.json) at root."""
    root = Path(root)
    if (root / "MLmodel").is_file() or (root / "config.json").is_file():
        return root
    found = sorted({path.parent for pattern in ("*/MLmodel", "*/*/MLmodel") for path in root.glob(pattern)})
    if len(found) != 1:
        what = "no MLmodel file" if not found else f"{len(found)} MLmodel files ({', '.join(map(str, found))})"
        raise FileNotFoundError(f"{what} in {root} or below it, and no config.json of a transformers model in it; "
                                "point at the folder fine_tune.py wrote (--model_output_dir)")
    return found[0]


def init(model_dir=None):
    """Load the model once, when the container starts; model_dir defaults to $AZUREML_MODEL_DIR.

    Azure ML mounts the registered model at AZUREML_MODEL_DIR (/var/azureml-app/azureml-models/<name>/<version>);
    the MLflow model is that folder or a folder inside it (model_output, for a model registered from a job).
    Locally, a plain transformers folder serves too (evaluate_flow.py --compare-base serves the base model so).
    """
    global _model, _runtime, _tokenizer, _max_new_tokens_limit, _max_inputs_per_request
    started = time.perf_counter()
    model_dir = model_dir or os.environ.get("AZUREML_MODEL_DIR")
    if not model_dir:
        raise RuntimeError("no model folder: set AZUREML_MODEL_DIR or call init(model_dir)")
    _max_new_tokens_limit = _env_int("MAX_NEW_TOKENS_LIMIT", DEFAULT_MAX_NEW_TOKENS_LIMIT)
    _max_inputs_per_request = _env_int("MAX_INPUTS_PER_REQUEST", DEFAULT_MAX_INPUTS_PER_REQUEST)
    folder = find_model_folder(model_dir)
    # The MLflow transformers flavour keeps plain transformers files: weights in model/, tokenizer apart.
    weights = folder / "model" if (folder / "MLmodel").is_file() else folder
    if not (weights / "config.json").is_file():
        raise FileNotFoundError(f"no model/config.json in {folder}: is it an MLflow model from fine_tune.py?")
    runtime = choose_runtime(folder, os.environ.get("SERVING_RUNTIME", "auto"))
    model = _load_onnx_model(folder / ONNX_FOLDER) if runtime == "onnxruntime-genai" else _load_model(weights)
    tokenizer = _load_tokenizer(folder / "components" / "tokenizer", weights)
    _set_generation_limits(weights, tokenizer)
    _model, _runtime, _tokenizer = model, runtime, tokenizer
    # print(): Azure's inference server keeps score.py's output in the deployment's log; its logging drops INFO.
    print(f"score.py: loaded {folder} with {runtime} in {time.perf_counter() - started:.1f} s", flush=True)


def choose_runtime(folder, requested="auto"):
    """The runtime that serves: transformers (the tutorial's) or onnxruntime-genai (fine_tune.py's ONNX export).

    auto takes the export when the model has one and there is no CUDA GPU: on a CPU it answers several times
    faster (docs/benchmarks.md); on a GPU, transformers in bf16/fp16 does.
    """
    requested = (requested or "auto").strip()
    if requested not in SERVING_RUNTIMES:
        raise ValueError(f"SERVING_RUNTIME={requested!r}: choose one of {', '.join(SERVING_RUNTIMES)}")
    has_export = (Path(folder) / ONNX_FOLDER / "genai_config.json").is_file()
    if requested == "onnxruntime-genai" and not has_export:
        raise FileNotFoundError(f"SERVING_RUNTIME=onnxruntime-genai, but {folder} has no ONNX export ({ONNX_FOLDER}/): "
                                "fine-tune with ONNX_EXPORT=true, or serve with SERVING_RUNTIME=transformers")
    if requested != "auto":
        return requested
    return "onnxruntime-genai" if has_export and not _has_cuda_gpu() else "transformers"


def _has_cuda_gpu():
    """True when torch sees a CUDA GPU."""
    import torch

    return torch.cuda.is_available()


def _load_model(folder):
    """The causal LM for transformers: on a CUDA GPU in bf16 (fp16 where the GPU lacks bf16), on a CPU as saved."""
    import torch
    from transformers import AutoModelForCausalLM

    if not torch.cuda.is_available():
        return AutoModelForCausalLM.from_pretrained(folder, dtype="auto").eval()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16  # A100/H100: bf16; T4/V100: fp16
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to("cuda").eval()


def _load_onnx_model(folder):
    """fine_tune.py's ONNX Runtime GenAI export (the CPU build: every core, no telemetry)."""
    import onnxruntime_genai as og

    og.disable_telemetry_events()
    return og.Model(str(folder))


def _load_tokenizer(folder, weights):
    """The tokenizer (from `folder` when there is one, else beside the weights), set up for batched generation."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder if folder.is_dir() else weights)
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _set_generation_limits(weights, tokenizer):
    """Stop where the model says an answer ends, and read the context length and sampling's top-k from the saved
    config, for both runtimes alike. The training job wrote the stops into generation_config.json: the end of
    text and the end of a turn its chat template writes (finetuning_dir/chat_stops.py: <|end|> for Phi,
    <|im_end|> for ChatML, <|eot_id|> for Llama 3, ...); the tokenizer's end of text is added if missing."""
    global _stop_ids, _context_length, _top_k
    generation = _read_json(weights / "generation_config.json")
    eos = generation.get("eos_token_id")
    _stop_ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in _stop_ids:
        _stop_ids.append(tokenizer.eos_token_id)
    _top_k = generation.get("top_k", 50)
    _context_length = _read_json(weights / "config.json").get("max_position_embeddings")
    # fine_tune.py leaves the training length here; serving is bounded by the model's context instead.
    tokenizer.model_max_length = _context_length or tokenizer.model_max_length


def _read_json(path):
    """A JSON file's object, or {} when there is no such file."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def run(raw_data):
    """Answer one request (called once per POST /score): a JSON string in, a list of answer strings out.

    Azure's inference server inspects this signature: run() must take exactly one parameter (or two, the
    second named request_headers), so the stop event of stand_ins/endpoint_server.py goes to run_stoppable().
    There, a bad request is answered with its 4xx and reason (AMLResponse) instead of the server's generic 500.
    """
    try:
        return run_stoppable(raw_data)
    except BadRequest as error:
        if AMLResponse is None:
            raise
        logger.warning("Bad request (%d): %s", error.status, error)
        return AMLResponse({"error": str(error)}, error.status, json_str=True)


def run_stoppable(raw_data, stop_event=None):
    """run(), and once `stop_event` (a threading.Event) is set, generation stops at the next token.

    stand_ins/endpoint_server.py sets it when a request times out, so the model is free for the next request.
    """
    if _runtime is None:
        raise RuntimeError("the model is not loaded: call init() first")
    request = parse_request(raw_data)
    params = check_params(request.get("params"))
    conversations = check_input_data(request["input_data"])
    with _lock:
        answers = generate(conversations, params, stop_event)
    if params["return_full_text"]:
        answers = [f"{chat[-1]['content']}\n{answer}" for chat, answer in zip(conversations, answers)]
    return answers


def parse_request(raw_data):
    """The request as a dict: JSON text (str or bytes) or an already parsed object."""
    if isinstance(raw_data, (bytes, bytearray)):
        try:
            raw_data = raw_data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise BadRequest(f"the request body is not UTF-8 text: {error}") from None
    if isinstance(raw_data, str):
        try:
            raw_data = json.loads(raw_data)
        except json.JSONDecodeError as error:
            raise BadRequest(f"the request body is not valid JSON: {error}") from None
        except RecursionError:
            raise BadRequest(f"the request body nests deeper than {MAX_JSON_DEPTH} levels") from None
    if _depth_exceeds(raw_data, MAX_JSON_DEPTH):
        raise BadRequest(f"the request body nests deeper than {MAX_JSON_DEPTH} levels")
    if not isinstance(raw_data, dict):
        raise BadRequest('the request body must be a JSON object: {"input_data": [...], "params": {...}}')
    unknown = sorted(set(raw_data) - {"input_data", "params"})
    if unknown:
        raise BadRequest(f"unknown key(s) {', '.join(unknown)} in the request; allowed: input_data, params")
    if "input_data" not in raw_data:
        raise BadRequest('the request has no input_data: send {"input_data": ["your question"]}')
    return raw_data


def check_params(params):
    """The generation params with defaults filled in; BadRequest names a wrong one and what it may be."""
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise BadRequest(f"params must be a JSON object, not {type(params).__name__}")
    unknown = sorted(set(params) - set(PARAMS))
    if unknown:
        raise BadRequest(f"unknown param(s) {', '.join(unknown)}; allowed: {', '.join(PARAMS)}")
    checked = {**PARAMS, **params}
    limit = _max_new_tokens_limit
    rules = {  # name: (is the value fine?, what it may be)
        "max_new_tokens": (lambda v: _is_number(v, int) and 1 <= v <= limit, f"a whole number from 1 to {limit}"),
        "temperature": (lambda v: _is_number(v) and 0 < v <= 2, "a number above 0 and at most 2"),
        "top_p": (lambda v: _is_number(v) and 0 < v <= 1, "a number above 0 and at most 1"),
        "do_sample": (lambda v: isinstance(v, bool), "true or false"),
        "return_full_text": (lambda v: isinstance(v, bool), "true or false"),
    }
    for name, (is_fine, allowed) in rules.items():
        if not is_fine(checked[name]):
            raise BadRequest(f"param {name} must be {allowed}, not {json.dumps(checked[name])}")
    return checked


def _is_number(value, types=(int, float)):
    """True for a JSON number of the given Python types; JSON's true/false are not numbers here."""
    return isinstance(value, types) and not isinstance(value, bool)


def check_input_data(input_data):
    """input_data as a list of conversations; BadRequest says what is wrong and where."""
    if isinstance(input_data, str):
        input_data = [input_data]
    if not isinstance(input_data, list) or not input_data:
        raise BadRequest("input_data must be a question, a non-empty list of questions, or a list of conversations")
    if len(input_data) > _max_inputs_per_request:
        raise BadRequest(f"input_data has {len(input_data)} inputs; at most {_max_inputs_per_request} per request "
                         "(MAX_INPUTS_PER_REQUEST): send the rest in more requests", status=413)
    return [_check_conversation(item, f"input_data[{i}]") for i, item in enumerate(input_data)]


def _check_conversation(item, where):
    """One input as a list of messages: a question becomes one user turn."""
    if isinstance(item, str):
        return [{"role": "user", "content": item}]
    if isinstance(item, dict):
        raise BadRequest(f"{where} is a single message; wrap a conversation in a list: [[{{...}}, {{...}}]]")
    if not isinstance(item, list) or not item:
        raise BadRequest(f"{where} must be a question or a non-empty list of messages")
    for j, message in enumerate(item):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise BadRequest(f'{where}[{j}] must be {{"role": ..., "content": ...}} with exactly those two keys')
        if message["role"] not in ROLES:
            raise BadRequest(f"{where}[{j}] has role {json.dumps(message['role'])}; allowed: {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise BadRequest(f"{where}[{j}] content must be a string")
    if item[-1]["role"] != "user":
        raise BadRequest(f"{where} must end with a user message: the model answers the last user turn")
    return item


def generate(conversations, params, stop_event=None):
    """Generate the answers for a batch of conversations with the runtime init() chose."""
    if _runtime == "onnxruntime-genai":
        return [_generate_onnx(conversation, params, stop_event) for conversation in conversations]
    return _generate_transformers(conversations, params, stop_event)


def _generate_transformers(conversations, params, stop_event=None):
    """The tutorial's runtime: all conversations in one left-padded batch, with transformers' generate()."""
    import torch

    batch = _tokenizer.apply_chat_template(conversations, add_generation_prompt=True, padding=True,
                                           return_tensors="pt", return_dict=True).to(_model.device)
    prompt_length = batch["input_ids"].shape[1]
    _check_context(prompt_length, params)
    options = {"max_new_tokens": params["max_new_tokens"], "do_sample": params["do_sample"],
               "pad_token_id": _tokenizer.pad_token_id, "eos_token_id": _stop_ids}
    if params["do_sample"]:  # greedy decoding ignores them, and transformers warns when they are passed
        options.update(temperature=params["temperature"], top_p=params["top_p"], top_k=_top_k)
    if stop_event is not None:
        options["stopping_criteria"] = _stop_when_set(stop_event)
    with torch.inference_mode():
        output = _model.generate(**batch, **options)
    new_tokens = output[:, prompt_length:]
    return [text.strip() for text in _tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def _generate_onnx(conversation, params, stop_event=None):
    """ONNX Runtime GenAI: one conversation, token by token, the same prompt, params and stops as transformers."""
    import numpy as np
    import onnxruntime_genai as og

    prompt = list(_tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_dict=True)["input_ids"])
    _check_context(len(prompt), params)
    options = {"max_length": len(prompt) + params["max_new_tokens"], "do_sample": params["do_sample"]}
    if params["do_sample"]:
        options.update(temperature=params["temperature"], top_p=params["top_p"], top_k=_top_k)
    search = og.GeneratorParams(_model)
    search.set_search_options(**options)
    generator = og.Generator(_model, search)
    generator.append_tokens(np.array(prompt, dtype=np.int32))
    answer = []
    while not generator.is_done() and len(answer) < params["max_new_tokens"]:
        if stop_event is not None and stop_event.is_set():  # the endpoint's timeout: free the model now
            break
        generator.generate_next_token()
        token = int(generator.get_next_tokens()[0])
        if token in _stop_ids:
            break
        answer.append(token)
    return _tokenizer.decode(answer, skip_special_tokens=True).strip()


def _check_context(prompt_length, params):
    """BadRequest when the prompt and the new tokens would not fit in the model's context."""
    if _context_length and prompt_length + params["max_new_tokens"] > _context_length:
        raise BadRequest(f"the longest input is {prompt_length} tokens; with max_new_tokens "
                         f"{params['max_new_tokens']} that exceeds the model's {_context_length}-token context")


def _stop_when_set(event):
    """A stopping criterion that ends generation for every row once `event` is set."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopWhenSet(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopWhenSet()])


def _depth_exceeds(value, limit):
    """True when lists and objects nest deeper than `limit` (checked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def _env_int(name, default):
    """A whole-number limit from the environment; a bad value names the variable."""
    value = os.environ.get(name, "").strip() or str(default)
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{name}={value!r} must be a whole number of at least 1")
    return int(value)
