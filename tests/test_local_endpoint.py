"""The local endpoint's server as a real process, called over HTTP the way the tutorial's client calls Azure, and
through real chat-completions clients (the `openai` client; Microsoft Agent Framework's, in a venv of its own)."""

import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from conftest import ENV_CACHE, cached_venv, free_port
from stand_ins.endpoint_process import serve_model

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# starlette.testclient (the in-process tests) uses an alias that anyio 4.16 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:The anyio.abc.BlockingPortal alias:DeprecationWarning")

PROJECT_DIR = Path(__file__).resolve().parents[1]
SERVER = [sys.executable, "-m", "stand_ins.endpoint_server"]
READY_TIMEOUT_S = 90  # import torch + load the model, on 2 busy CPU cores
MAX_REQUEST_BYTES = 200_000
QUEUE_WAIT_MS = 50  # short, so the concurrency test sees 429s quickly


class Server:
    """A running endpoint server: its URL, key and stderr log, and what it answered while loading."""

    def __init__(self, endpoint, seen_while_loading):
        self.endpoint, self.key, self.log_path = endpoint, endpoint.key, endpoint.log_path
        self.url = endpoint.url.rsplit("/", 1)[0]
        self.seen_while_loading = seen_while_loading  # (GET /ready, POST /score, Retry-After) before ready

    def post(self, body, key=None, **kwargs):
        """POST /score with the key (or another one), as the tutorial's client does."""
        headers = {"Authorization": f"Bearer {key or self.key}"}
        return requests.post(f"{self.url}/score", json=body, headers=headers, timeout=60, **kwargs)


def server_env(**extra):
    """The environment for a server process, without a key unless one is given."""
    env = {k: v for k, v in os.environ.items() if k != "LOCAL_ENDPOINT_KEY"}
    return {**env, "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1", **extra}


@pytest.fixture(scope="session")
def local_endpoint(served_model_dir, tmp_path_factory):
    """The endpoint server on a free port (1 request at a time), through serve_model(): stopped after."""
    seen = []

    def note(ready):  # while the model loads: what /ready and /score answer
        scoring = requests.post(ready.url.rsplit("/", 1)[0] + "/score", json={"input_data": ["Hi"]},
                                headers={"Authorization": f"Bearer {key}"}, timeout=5)
        seen.append((ready.status_code, scoring.status_code, scoring.headers.get("Retry-After")))

    key = secrets.token_urlsafe(32)
    log_path = tmp_path_factory.mktemp("endpoint") / "server.log"
    extra = ["--max-concurrent", "1", "--max-queue-wait-ms", QUEUE_WAIT_MS, "--max-request-bytes", MAX_REQUEST_BYTES]
    with serve_model(served_model_dir, log_path, key=key, extra_args=extra, timeout_s=READY_TIMEOUT_S,
                     while_loading=note) as endpoint:
        yield Server(endpoint, seen)
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status says what stopped it.
    log = log_path.read_text()
    assert endpoint.exit_code in (0, -signal.SIGTERM) and "Application shutdown complete" in log, \
        f"exit {endpoint.exit_code}:\n{log}"


# --- The tutorial's client ----------------------------------------------------------------------------

@pytest.mark.slow
def test_the_tutorials_client_gets_an_answer(local_endpoint):
    question = "Who founded Microsoft?"
    response = requests.post(
        f"{local_endpoint.url}/score",
        json={"input_data": [question],
              "params": {"temperature": 0.7, "top_p": 0.9, "do_sample": True, "max_new_tokens": 32,
                         "return_full_text": True}},
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {local_endpoint.key}"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    answer = response.json()[0]
    assert isinstance(answer, str) and answer.startswith(question)


@pytest.mark.slow
def test_an_answer_says_how_long_the_model_took(local_endpoint):
    started = time.perf_counter()
    response = local_endpoint.post({"input_data": ["Who founded Microsoft?"], "params": {"max_new_tokens": 16}})
    waited_ms = (time.perf_counter() - started) * 1000
    assert response.status_code == 200, response.text
    name, _, duration = response.headers["Server-Timing"].partition(";dur=")
    assert name == "score" and 0 < float(duration) < waited_ms  # the model's share of what the client waited


@pytest.mark.slow
def test_multi_turn_conversations_and_questions(local_endpoint):
    chat = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Who founded Microsoft?"},
        {"role": "assistant", "content": "Bill Gates and Paul Allen."},
        {"role": "user", "content": "In which year?"},
    ]
    response = local_endpoint.post({"input_data": [chat, "What is Python?", chat], "params": {"max_new_tokens": 8}})
    assert response.status_code == 200, response.text
    answers = response.json()
    assert len(answers) == 3 and all(isinstance(answer, str) for answer in answers)
    assert answers[0] == answers[2]  # greedy by default: the same chat, the same answer


@pytest.mark.slow
def test_the_server_answers_while_the_model_loads(local_endpoint):
    # While the model loaded, /ready said 503 and /score said 503 with Retry-After (or 200: it just got ready).
    seen = local_endpoint.seen_while_loading
    assert any(ready == 503 and scoring == 503 and retry_after for ready, scoring, retry_after in seen), seen
    assert all(ready == 503 and scoring in (200, 503) for ready, scoring, _ in seen), seen


@pytest.mark.slow
def test_health_routes(local_endpoint):
    assert requests.get(f"{local_endpoint.url}/", timeout=5).text == "Healthy"
    assert requests.get(f"{local_endpoint.url}/live", timeout=5).status_code == 200
    assert requests.get(f"{local_endpoint.url}/ready", timeout=5).status_code == 200


@pytest.mark.slow
def test_wrong_path_and_method_are_json_errors(local_endpoint):
    missing = requests.get(f"{local_endpoint.url}/scores", timeout=5)
    assert missing.status_code == 404 and "/score" in missing.json()["error"]
    wrong_method = requests.get(f"{local_endpoint.url}/score", timeout=5)
    assert wrong_method.status_code == 405 and wrong_method.headers["Allow"] == "POST"
    assert "POST" in wrong_method.json()["error"]


# --- The key ------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer not-the-key"},
    {"Authorization": "Bearer "},
    {"Authorization": "not-the-key"},
], ids=["missing", "wrong", "empty", "no-bearer"])
def test_a_missing_or_wrong_key_gets_401(local_endpoint, headers):
    response = requests.post(f"{local_endpoint.url}/score", json={"input_data": ["Hi"]}, headers=headers, timeout=10)
    assert response.status_code == 401
    assert "Authorization: Bearer" in response.json()["error"]
    assert response.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.slow
def test_the_key_without_bearer_is_refused(local_endpoint):
    response = requests.post(f"{local_endpoint.url}/score", json={"input_data": ["Hi"]},
                             headers={"Authorization": local_endpoint.key}, timeout=10)
    assert response.status_code == 401 and local_endpoint.key not in response.text


# --- Bad requests -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_invalid_json_gets_400_with_the_parsers_reason(local_endpoint):
    response = requests.post(f"{local_endpoint.url}/score", data='{"input_data": [',
                             headers={"Authorization": f"Bearer {local_endpoint.key}"}, timeout=10)
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"] and "line 1 column" in response.json()["error"]


@pytest.mark.slow
def test_an_unknown_param_gets_400_naming_it(local_endpoint):
    response = local_endpoint.post({"input_data": ["Hi"], "params": {"max_length": 10}})
    assert response.status_code == 400 and "max_length" in response.json()["error"]


@pytest.mark.slow
def test_a_wrong_param_type_gets_400(local_endpoint):
    response = local_endpoint.post({"input_data": ["Hi"], "params": {"max_new_tokens": True}})
    assert response.status_code == 400 and "max_new_tokens" in response.json()["error"]


@pytest.mark.slow
@pytest.mark.parametrize("body", [
    {"input_data": []},
    {"params": {}},
    [1, 2, 3],
    {"input_data": [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]]},
])
def test_a_bad_shape_gets_400(local_endpoint, body):
    response = local_endpoint.post(body)
    assert response.status_code == 400 and response.json()["error"]


@pytest.mark.slow
def test_an_oversize_body_gets_413(local_endpoint):
    body = {"input_data": ["x" * MAX_REQUEST_BYTES]}
    declared = local_endpoint.post(body)
    assert declared.status_code == 413 and "MAX_REQUEST_BYTES" in declared.json()["error"]

    def chunks():  # no Content-Length: the limit is checked while reading
        yield b'{"input_data": ["'
        for _ in range(8):
            yield b"x" * (MAX_REQUEST_BYTES // 4)
        yield b'"]}'

    chunked = requests.post(f"{local_endpoint.url}/score", data=chunks(), timeout=30,
                            headers={"Authorization": f"Bearer {local_endpoint.key}"})
    assert chunked.status_code == 413
    assert local_endpoint.post({"input_data": ["Hi"], "params": {"max_new_tokens": 2}}).status_code == 200


# --- Concurrency: 1 slot, a short queue; the rest get 429, none are lost ------------------------------

@pytest.mark.slow
def test_simultaneous_requests_beyond_the_cap_get_429(local_endpoint):
    # Long prompts make each answer take a while, whether or not the model stops early at <|end|>.
    questions = [("Tell me about the history of computing, " * 30) + str(i) for i in range(4)]
    body = {"input_data": questions, "params": {"max_new_tokens": 64}}
    count = 12
    start = threading.Barrier(count)
    results = [None] * count

    def call(i):
        start.wait()
        try:
            response = local_endpoint.post(body)
            results[i] = (response.status_code, response.headers.get("Retry-After"), response.json())
        except requests.RequestException as error:
            results[i] = ("lost", None, repr(error))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    statuses = [result[0] for result in results]
    assert set(statuses) <= {200, 429}, results
    assert statuses.count(200) >= 1 and statuses.count(429) >= 1, statuses
    for status, retry_after, payload in results:
        if status == 429:
            assert retry_after and int(retry_after) >= 1 and "busy" in payload["error"]
        else:
            assert len(payload) == len(questions)
    assert requests.get(f"{local_endpoint.url}/ready", timeout=5).status_code == 200
    assert local_endpoint.post({"input_data": ["Hi"], "params": {"max_new_tokens": 2}}).status_code == 200


# --- Starting the server --------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_server_refuses_to_start_without_a_key(served_model_dir):
    for env in (server_env(), server_env(LOCAL_ENDPOINT_KEY="  ")):
        result = subprocess.run([*SERVER, "--model-dir", str(served_model_dir),
                                 "--port", str(free_port())], cwd=PROJECT_DIR, env=env, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 2 and "LOCAL_ENDPOINT_KEY" in result.stderr


def test_the_server_refuses_a_folder_without_a_model(tmp_path):
    result = subprocess.run([*SERVER, "--model-dir", str(tmp_path), "--port",
                             str(free_port())], cwd=PROJECT_DIR, env=server_env(LOCAL_ENDPOINT_KEY="k"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "MLmodel" in result.stderr


# --- In-process: timeouts and failures of the scoring script ---------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["transformers", "onnxruntime-genai"])
def test_a_request_over_the_timeout_gets_504_and_frees_the_model(served_model_dir, runtime, monkeypatch):
    from starlette.testclient import TestClient

    from stand_ins import endpoint_server as endpoint_module

    # Any generation takes longer than 0.1 ms; the stopped one must free the single slot for the next. The tiny
    # model's ONNX answer takes ~2 ms, less than Python's 5 ms thread switch interval: the server's event loop
    # would only get to run once the answer is done, so the interval is shortened to let the timeout fire.
    monkeypatch.setenv("SERVING_RUNTIME", runtime)
    interval = sys.getswitchinterval()
    app = endpoint_module.create_app(served_model_dir, "k", max_concurrent=1, max_queue_wait_s=5,
                                     request_timeout_s=0.0001)
    headers = {"Authorization": "Bearer k"}
    body = {"input_data": ["Tell me a long story."], "params": {"max_new_tokens": 500}}
    with TestClient(app) as client:
        wait_in_process(client)
        assert client.get("/ready").headers["X-Serving-Runtime"] == runtime
        sys.setswitchinterval(1e-5)
        try:
            for _ in range(2):
                started = time.monotonic()
                response = client.post("/score", json=body, headers=headers)
                assert response.status_code == 504 and "REQUEST_TIMEOUT_MS" in response.json()["error"]
                assert time.monotonic() - started < 4  # the second did not wait for the first's 500 tokens
        finally:
            sys.setswitchinterval(interval)


def test_a_failing_scoring_script_gets_500_and_the_server_keeps_serving(tmp_path):
    from starlette.testclient import TestClient

    from stand_ins import endpoint_server as endpoint_module

    script = tmp_path / "score.py"
    script.write_text(
        "class BadRequest(ValueError):\n    pass\n\n"
        "def init(model_dir=None):\n    pass\n\n"
        "def run(raw_data):\n"  # a JSON string, as Azure's inference server passes it
        "    import json\n"
        "    if json.loads(raw_data)['input_data'] == 'boom':\n        raise RuntimeError('the GPU caught fire')\n"
        "    return ['ok']\n"
    )
    app = endpoint_module.create_app(tmp_path, "k", scoring_script=script)
    with TestClient(app) as client:
        wait_in_process(client)
        failed = client.post("/score", json={"input_data": "boom"}, headers={"Authorization": "Bearer k"})
        assert failed.status_code == 500 and "the GPU caught fire" in failed.json()["error"]
        assert client.post("/score", json={"input_data": "x"}, headers={"Authorization": "Bearer k"}).json() == ["ok"]


def test_a_model_that_cannot_load_makes_ready_say_why(tmp_path):
    from starlette.testclient import TestClient

    from stand_ins import endpoint_server as endpoint_module

    (tmp_path / "MLmodel").write_text("flavors: {}\n")
    (tmp_path / "model").mkdir()
    with TestClient(endpoint_module.create_app(tmp_path, "k")) as client:
        deadline = time.monotonic() + 60
        while (ready := client.get("/ready")).status_code == 503 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.status_code == 500 and "failed to load" in ready.json()["error"]


def wait_in_process(client, timeout_s=60):
    """Poll an in-process app's /ready until 200."""
    deadline = time.monotonic() + timeout_s
    while client.get("/ready").status_code != 200:
        assert time.monotonic() < deadline, client.get("/ready").text
        time.sleep(0.05)


# --- Last: nothing above leaked the key into the server's log ---------------------------------------------

@pytest.mark.slow
def test_the_key_never_appears_in_the_log(local_endpoint):
    # A key in the query string (a client mistake) must not reach the log either.
    requests.post(f"{local_endpoint.url}/score?key={local_endpoint.key}", json={"input_data": ["Hi"]},
                  headers={"Authorization": f"Bearer {local_endpoint.key}"}, timeout=30)
    time.sleep(0.2)  # the log line is written after the response
    log = local_endpoint.log_path.read_text()
    assert local_endpoint.key not in log
    assert "POST /score 401" in log and "POST /score 200" in log and "POST /score 429" in log


# --- Bounded requests (the same reasons as on Azure's inference server: tests/test_environment_files.py) -------
@pytest.mark.slow
@pytest.mark.parametrize("body", ["[" * 100_000 + "]" * 100_000, '{"input_data": ' + "[" * 20 + '"Hi"' + "]" * 20 + "}"],
                         ids=["too-deep-to-parse", "parses-but-absurd"])
def test_absurdly_nested_json_gets_400(local_endpoint, body):
    response = requests.post(f"{local_endpoint.url}/score", data=body, timeout=30,
                             headers={"Authorization": f"Bearer {local_endpoint.key}", "Content-Type": "application/json"})
    assert response.status_code == 400 and "nests deeper than" in response.json()["error"]


@pytest.mark.slow
def test_more_inputs_than_allowed_get_413_naming_the_setting(local_endpoint):
    response = local_endpoint.post({"input_data": ["Hi"] * 5, "params": {"max_new_tokens": 2}})
    assert response.status_code == 413
    assert "MAX_INPUTS_PER_REQUEST" in response.json()["error"] and "at most 4" in response.json()["error"]
    assert local_endpoint.post({"input_data": ["Hi"] * 4, "params": {"max_new_tokens": 2}}).status_code == 200


# --- The serverless endpoints' contract: POST /v1/chat/completions, through real clients ----------------------
QUESTION = "Who founded Microsoft?"
FIRST_ANSWER = "Microsoft was founded by Bill Gates and Paul Allen on April 4, 1975, in Albuquerque, New Mexico."
FOLLOW_UP = "Where is its headquarters today?"
AGENT_REQUIREMENTS = PROJECT_DIR / "tests" / "agent_framework_requirements.txt"


def openai_client(server, key=None):
    """The official `openai` client pointed at the local endpoint (no retries of its own: errors show at once)."""
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key or server.key, max_retries=0, timeout=60)


@pytest.mark.slow
def test_the_openai_client_gets_the_same_answer_as_score(local_endpoint):
    reply = openai_client(local_endpoint).chat.completions.create(
        model="phi-fine-tuned", messages=[{"role": "user", "content": QUESTION}], max_tokens=64, temperature=0)
    assert (reply.object, reply.model, reply.choices[0].message.role) == ("chat.completion", "phi-fine-tuned", "assistant")
    answer = reply.choices[0].message.content
    assert "Bill Gates" in answer
    same = local_endpoint.post({"input_data": [QUESTION], "params": {"max_new_tokens": 64}})
    assert same.json() == [answer]  # one score.py, one generation: greedy gives the same words either way


@pytest.mark.slow
def test_history_reaches_the_model_through_the_openai_client(local_endpoint):
    chat = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": FIRST_ANSWER},
            {"role": "user", "content": FOLLOW_UP}]
    reply = openai_client(local_endpoint).chat.completions.create(model="phi", messages=chat, max_tokens=64)
    assert "Redmond" in reply.choices[0].message.content
    parts = [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}]  # content as parts, as some clients send
    reply = openai_client(local_endpoint).chat.completions.create(model="phi", messages=parts, max_tokens=64)
    assert "Bill Gates" in reply.choices[0].message.content


@pytest.mark.slow
def test_the_openai_client_gets_the_same_key_check_limits_and_errors(local_endpoint):
    import openai

    client = openai_client(local_endpoint)
    ask = {"model": "phi", "messages": [{"role": "user", "content": "Hi"}]}
    with pytest.raises(openai.AuthenticationError, match="missing or wrong key"):
        openai_client(local_endpoint, key="not-the-key").chat.completions.create(**ask)
    with pytest.raises(openai.BadRequestError, match="max_tokens must be a whole number from 1 to 512"):
        client.chat.completions.create(**ask, max_tokens=100_000)
    with pytest.raises(openai.BadRequestError, match="unknown or unsupported key.*frequency_penalty"):
        client.chat.completions.create(**ask, frequency_penalty=0.5)
    with pytest.raises(openai.BadRequestError, match="streaming is not supported"):
        client.chat.completions.create(**ask, stream=True)
    with pytest.raises(openai.BadRequestError, match=r"messages\[0\] has role \"tool\""):
        client.chat.completions.create(model="phi", messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}])
    oversize = requests.post(f"{local_endpoint.url}/v1/chat/completions", data=b"x" * (MAX_REQUEST_BYTES + 1),
                             headers={"Authorization": f"Bearer {local_endpoint.key}"}, timeout=30)
    assert oversize.status_code == 413 and "MAX_REQUEST_BYTES" in oversize.json()["error"]["message"]


def test_chat_completions_share_the_queue_with_score(tmp_path):
    from starlette.testclient import TestClient

    from stand_ins import endpoint_server as endpoint_module

    # A scoring script that holds the one slot until the test lets go: no race with how fast the model is.
    started, release = tmp_path / "started", tmp_path / "release"
    script = tmp_path / "score.py"
    script.write_text(
        "import json, time\nfrom pathlib import Path\n\n"
        "class BadRequest(ValueError):\n    pass\n\n"
        "def init(model_dir=None):\n    pass\n\n"
        "def run(raw_data):\n"
        f"    Path({str(started)!r}).touch()\n"
        "    deadline = time.monotonic() + 60\n"
        f"    while not Path({str(release)!r}).exists() and time.monotonic() < deadline:\n"
        "        time.sleep(0.01)\n"
        "    return ['held']\n"
    )
    app = endpoint_module.create_app(tmp_path, "k", max_concurrent=1, max_queue_wait_s=QUEUE_WAIT_MS / 1000,
                                     scoring_script=script)
    headers = {"Authorization": "Bearer k"}
    with TestClient(app) as client:
        wait_in_process(client)
        held = []
        busy = threading.Thread(target=lambda: held.append(client.post("/score", json={"input_data": ["x"]},
                                                                       headers=headers)))
        busy.start()
        deadline = time.monotonic() + 30
        while not started.exists():  # the /score request now holds the one slot
            assert time.monotonic() < deadline
            time.sleep(0.01)
        response = client.post("/v1/chat/completions", headers=headers,
                               json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        release.touch()
        busy.join(timeout=60)
    assert response.status_code == 429 and response.headers["Retry-After"] == "1", response.text
    assert response.json()["error"]["type"] == "rate_limit_error" and "busy" in response.json()["error"]["message"]
    assert held[0].status_code == 200 and held[0].json() == ["held"]


def agent_framework_venv():
    """A venv with Microsoft Agent Framework (tests/agent_framework_requirements.txt), cached by that file's content."""
    key = hashlib.sha256(f"{sys.version}\n{AGENT_REQUIREMENTS.read_text()}".encode()).hexdigest()[:12]
    folder = ENV_CACHE / f"agent-framework-{key}"
    return cached_venv(folder, ["-r", str(AGENT_REQUIREMENTS)], "the Agent Framework venv")


@pytest.mark.slow
def test_agent_frameworks_chat_client_talks_to_the_local_endpoint(local_endpoint):
    venv = agent_framework_venv()
    env = {**os.environ, "AGENT_BASE_URL": f"{local_endpoint.url}/v1", "AGENT_API_KEY": local_endpoint.key}
    result = subprocess.run([str(venv / "bin" / "python"), str(PROJECT_DIR / "tests" / "agent_framework_chat.py"),
                             QUESTION], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads(result.stdout.strip().splitlines()[-1])
    assert "Bill Gates" in answers["answer"]
    assert "Redmond" in answers["follow_up"]  # the agent's session sent the first turn along
    assert local_endpoint.key not in result.stdout + result.stderr
