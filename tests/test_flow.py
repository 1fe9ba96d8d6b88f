"""Step 4: the flow answers through the real local endpoint, keeps the chat's history, and fails usefully, through
either contract: a managed online endpoint's (`/score`, `input_data`) or a serverless one's (`/chat/completions`).

Prompt flow runs in this process (`PFClient().test`, what `pf flow test` does); the endpoint is the one
`make demo` deployed, or a small HTTP server below where a test needs an endpoint that misbehaves.
"""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

import config
import integrate_with_promptflow as flow_tool
from conftest import PROJECT_DIR, WORK_DIR, read_env_file, run_script

QUESTION = "Who founded Microsoft?"
FIRST_ANSWER = "Microsoft was founded by Bill Gates and Paul Allen on April 4, 1975, in Albuquerque, New Mexico."
FOLLOW_UP = "Where is its headquarters today?"


@pytest.fixture(scope="module")
def pf():
    """Prompt flow's client (its import takes a few seconds, so once per module)."""
    from promptflow.client import PFClient

    return PFClient()


def ask(pf, question, chat_history=None):
    """The flow's answer, as `pf flow test` gives it."""
    return pf.test(flow=PROJECT_DIR, inputs={"input_data": question, "chat_history": chat_history or []})["answer"]


def secret_key():
    """The local endpoint's key, as deploy_model.py wrote it."""
    return read_env_file()["AZURE_ML_API_KEY"]


# --- The flow file --------------------------------------------------------------------------------
def test_flow_file_keeps_the_tutorials_names_and_is_a_chat_flow():
    flow = yaml.safe_load((PROJECT_DIR / "flow.dag.yml").read_text())
    assert not (PROJECT_DIR / "flow.dag.yaml").exists()  # Prompt flow refuses a folder with both
    (node,) = flow["nodes"]
    assert node["name"] == "integrate_with_promptflow" and node["type"] == "python"
    assert (PROJECT_DIR / node["source"]["path"]).is_file()
    assert node["inputs"] == {"input_data": "${inputs.input_data}", "chat_history": "${inputs.chat_history}"}
    inputs, outputs = flow["inputs"], flow["outputs"]
    assert inputs["input_data"] == {"type": "string", "is_chat_input": True, "default": QUESTION}
    assert inputs["chat_history"] == {"type": "list", "is_chat_history": True, "default": []}
    assert outputs["answer"] == {"type": "string", "reference": "${integrate_with_promptflow.output}",
                                 "is_chat_output": True}
    assert callable(flow_tool.my_python_tool) and callable(flow_tool.query_azml_endpoint)


def test_prompt_flow_runs_without_telemetry_or_trace_service():
    from promptflow._sdk._configuration import Configuration
    from promptflow._sdk._telemetry import is_telemetry_enabled

    assert Configuration.get_instance().get_config("trace.destination") == "none"  # no service on :23333
    assert not is_telemetry_enabled()


# --- Pieces of the tool ---------------------------------------------------------------------------
def test_history_becomes_the_endpoints_conversation():
    history = [
        {"inputs": {"input_data": "q1"}, "outputs": {"answer": "a1"}},
        {"inputs": {"input_data": "q2"}, "outputs": None},  # a turn that failed: left out
    ]
    assert flow_tool.to_conversation("q3", history) == [
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q3"},
    ]
    many = [{"inputs": {"input_data": f"q{i}"}, "outputs": {"answer": f"a{i}"}} for i in range(30)]
    sent = flow_tool.to_conversation("last", many)
    assert len(sent) == 2 * flow_tool.MAX_HISTORY_TURNS + 1
    assert sent[0]["content"] == f"q{30 - flow_tool.MAX_HISTORY_TURNS}"  # the latest turns are kept


def test_missing_setting_names_it_and_the_step_to_run(monkeypatch, tmp_path):
    empty = tmp_path / ".env"
    empty.write_text("AZURE_ML_API_KEY=<your-endpoint-key>\n")
    monkeypatch.setattr(config, "ENV_FILE", empty)
    monkeypatch.delenv("AZURE_ML_ENDPOINT", raising=False)
    monkeypatch.delenv("AZURE_ML_API_KEY", raising=False)
    with pytest.raises(flow_tool.EndpointError, match=r"(?s)AZURE_ML_ENDPOINT.*python deploy_model.py"):
        flow_tool.endpoint_settings()
    monkeypatch.setenv("AZURE_ML_ENDPOINT", "http://127.0.0.1:1/score")
    with pytest.raises(flow_tool.EndpointError, match="AZURE_ML_API_KEY"):
        flow_tool.endpoint_settings()


def test_settings_follow_a_redeploy(monkeypatch, tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("AZURE_ML_ENDPOINT=http://127.0.0.1:5001/score\nAZURE_ML_API_KEY=first\n")
    monkeypatch.setattr(config, "ENV_FILE", env_file)
    monkeypatch.delenv("AZURE_ML_ENDPOINT", raising=False)
    monkeypatch.delenv("AZURE_ML_API_KEY", raising=False)
    assert flow_tool.endpoint_settings() == ("http://127.0.0.1:5001/score", "first")
    env_file.write_text("AZURE_ML_ENDPOINT=http://127.0.0.1:5002/score\nAZURE_ML_API_KEY=second\n")  # redeploy
    assert flow_tool.endpoint_settings() == ("http://127.0.0.1:5002/score", "second")
    monkeypatch.setenv("AZURE_ML_ENDPOINT", "https://mine.eastus2.inference.ml.azure.com/score")  # set by the user
    assert flow_tool.endpoint_settings() == ("https://mine.eastus2.inference.ml.azure.com/score", "second")


# --- Against a small HTTP server that answers as scripted ----------------------------------------------
class ScriptedHandler(BaseHTTPRequestHandler):
    """Answers POSTs with `script`'s (status, JSON body, headers) in turn, the last one repeated; records them."""

    script = []
    received = []
    delay_s = 0  # how long the "model" takes before it answers

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.received.append({"authorization": self.headers.get("Authorization"), "body": body})
        time.sleep(self.delay_s)
        status, answer, headers = self.script[min(len(self.received), len(self.script)) - 1]
        payload = json.dumps(answer).encode()
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", "Content-Length": str(len(payload)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def scripted_endpoint(monkeypatch):
    """start(*script): a server on a free loopback port, which the flow is pointed at through the environment."""
    servers = []

    def start(*script):
        ScriptedHandler.script, ScriptedHandler.received = list(script), []
        server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedHandler)
        serve = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        serve.start()
        servers.append(server)
        url = f"http://127.0.0.1:{server.server_port}/score"
        monkeypatch.setenv("AZURE_ML_ENDPOINT", url)
        monkeypatch.setenv("AZURE_ML_API_KEY", "test-key")
        return url, ScriptedHandler.received

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_a_busy_endpoint_is_retried_and_the_request_follows_the_contract(pf, scripted_endpoint):
    _, received = scripted_endpoint((429, {"error": "busy"}, {"Retry-After": "0"}), (200, ["ok"], {}))
    history = [{"inputs": {"input_data": QUESTION}, "outputs": {"answer": FIRST_ANSWER}}]
    assert pf.test(flow=PROJECT_DIR, inputs={"input_data": FOLLOW_UP, "chat_history": history}) == {"answer": "ok"}
    assert len(received) == 2
    assert received[1]["authorization"] == "Bearer test-key"
    assert received[1]["body"]["input_data"] == [[
        {"role": "user", "content": QUESTION}, {"role": "assistant", "content": FIRST_ANSWER},
        {"role": "user", "content": FOLLOW_UP},
    ]]
    # The chat shows the answer only (no echoed question) and greedy decoding makes it repeatable.
    params = received[1]["body"]["params"]
    assert params["return_full_text"] is False and params["do_sample"] is False


def test_a_rejected_request_shows_the_servers_reason(scripted_endpoint):
    url, _ = scripted_endpoint((400, {"error": "param max_new_tokens must be a whole number from 1 to 512"}, {}))
    with pytest.raises(flow_tool.EndpointError, match=r"HTTP 400\): param max_new_tokens must be"):
        flow_tool.query_azml_endpoint(QUESTION, url, "test-key")


def test_a_server_error_never_echoes_the_key(scripted_endpoint):
    url, _ = scripted_endpoint((500, {"message": "bad header Bearer test-key"}, {}))
    with pytest.raises(flow_tool.EndpointError) as error:
        flow_tool.query_azml_endpoint(QUESTION, url, "test-key")
    assert "HTTP 500" in str(error.value) and "test-key" not in str(error.value)


def test_a_key_cut_by_the_message_limit_is_hidden_whole(scripted_endpoint):
    key = "sk-0123456789abcdef0123456789abcdef"
    url, _ = scripted_endpoint((500, {"message": "x" * 490 + key + "y" * 75}, {}))  # the 500-char cut falls in the key
    with pytest.raises(flow_tool.EndpointError) as error:
        flow_tool.query_azml_endpoint(QUESTION, url, key)
    message = str(error.value)
    assert "<key>" in message
    assert not any(key[:n] in message for n in range(8, len(key) + 1))


def test_a_retry_after_past_the_deadline_is_not_waited_for(scripted_endpoint, monkeypatch):
    monkeypatch.setattr(flow_tool, "TOTAL_TIMEOUT_S", 2)
    url, received = scripted_endpoint((429, {"error": "busy"}, {"Retry-After": "30"}), (200, ["ok"], {}))
    started = time.perf_counter()
    with pytest.raises(flow_tool.EndpointError, match=r"still busy \(HTTP 429\) after 1 attempt\(s\): busy"):
        flow_tool.query_azml_endpoint(QUESTION, url, "test-key")
    assert time.perf_counter() - started < 1.5
    assert len(received) == 1


def test_an_unavailable_endpoint_is_retried_until_it_answers(scripted_endpoint):
    url, received = scripted_endpoint((503, {"error": "starting"}, {}), (503, {"error": "starting"}, {}),
                                      (200, ["ok"], {}))
    assert flow_tool.query_azml_endpoint(QUESTION, url, "test-key") == "ok"
    assert len(received) == 3


def test_a_busy_endpoint_is_tried_max_attempts_times(scripted_endpoint):
    url, received = scripted_endpoint((429, {"error": "busy"}, {"Retry-After": "0"}))
    with pytest.raises(flow_tool.EndpointError, match=rf"HTTP 429\) after {flow_tool.MAX_ATTEMPTS} attempt\(s\)"):
        flow_tool.query_azml_endpoint(QUESTION, url, "test-key")
    assert len(received) == flow_tool.MAX_ATTEMPTS


def test_a_slow_answer_is_not_asked_for_again(scripted_endpoint, monkeypatch):
    monkeypatch.setattr(ScriptedHandler, "delay_s", 1)
    monkeypatch.setattr(flow_tool, "READ_TIMEOUT_S", 0.3)
    url, received = scripted_endpoint((200, ["late"], {}))
    with pytest.raises(flow_tool.EndpointError, match=r"did not answer within \d+ s: ask for fewer max_new_tokens"):
        flow_tool.query_azml_endpoint(QUESTION, url, "test-key")
    assert len(received) == 1  # the model is still generating: a second request would only queue behind it


def test_a_refused_connection_is_tried_max_attempts_times(monkeypatch):
    import urllib3.util.connection

    connects = []

    def counted(*args, **kwargs):
        connects.append(args[0])
        return real(*args, **kwargs)

    real = urllib3.util.connection.create_connection
    monkeypatch.setattr(urllib3.util.connection, "create_connection", counted)
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/score"
        with pytest.raises(flow_tool.EndpointError, match="is not reachable .*python deploy_model.py"):
            flow_tool.query_azml_endpoint(QUESTION, url, "test-key")
    assert len(connects) == flow_tool.MAX_ATTEMPTS


def test_a_malformed_url_names_the_setting():
    with pytest.raises(flow_tool.EndpointError, match="AZURE_ML_ENDPOINT='127.0.0.1:5001/score' is not an http"):
        flow_tool.query_azml_endpoint(QUESTION, "127.0.0.1:5001/score", "test-key")


# --- The chat-completions contract (serverless endpoints), chosen by the URL ------------------------------------
CHAT_REPLY = {"id": "chatcmpl-1", "object": "chat.completion",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]}


def chat_url(url):
    """The scripted server's URL as a serverless endpoint's (the server answers whatever the path)."""
    return url.replace("/score", "/v1/chat/completions")


def test_a_chat_completions_url_gets_messages_with_the_same_history_and_retries(pf, scripted_endpoint, monkeypatch):
    url, received = scripted_endpoint((429, {"error": {"message": "busy"}}, {"Retry-After": "0"}), (200, CHAT_REPLY, {}))
    monkeypatch.setenv("AZURE_ML_ENDPOINT", chat_url(url))
    history = [{"inputs": {"input_data": QUESTION}, "outputs": {"answer": FIRST_ANSWER}}]
    assert pf.test(flow=PROJECT_DIR, inputs={"input_data": FOLLOW_UP, "chat_history": history}) == {"answer": "ok"}
    assert len(received) == 2 and received[1]["authorization"] == "Bearer test-key"
    assert received[1]["body"] == {
        "messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": FIRST_ANSWER},
                     {"role": "user", "content": FOLLOW_UP}],
        "max_tokens": flow_tool.CHAT_PARAMS["max_new_tokens"], "temperature": 0}  # 0: greedy, as on /score


def test_chat_completions_errors_read_like_the_others(scripted_endpoint):
    url, _ = scripted_endpoint((400, {"error": {"code": "BadRequest", "message": "max_tokens must be at most 512"}}, {}))
    with pytest.raises(flow_tool.EndpointError, match=r"rejected the request \(HTTP 400\): max_tokens must be at most 512$"):
        flow_tool.query_azml_endpoint(QUESTION, chat_url(url), "test-key")
    url, _ = scripted_endpoint((401, {"error": {"message": "Invalid key test-key"}}, {}))
    with pytest.raises(flow_tool.EndpointError, match="HTTP 401.*AZURE_ML_API_KEY does not match"):
        flow_tool.query_azml_endpoint(QUESTION, chat_url(url), "test-key")
    url, received = scripted_endpoint((429, {"error": {"message": "busy"}}, {"Retry-After": "0"}))
    with pytest.raises(flow_tool.EndpointError, match=rf"HTTP 429\) after {flow_tool.MAX_ATTEMPTS} attempt\(s\): busy"):
        flow_tool.query_azml_endpoint(QUESTION, chat_url(url), "test-key")
    url, _ = scripted_endpoint((500, {"error": {"message": "upstream said test-key"}}, {}))
    with pytest.raises(flow_tool.EndpointError) as error:
        flow_tool.query_azml_endpoint(QUESTION, chat_url(url), "test-key")
    assert "HTTP 500" in str(error.value) and "test-key" not in str(error.value)


def test_each_contract_refuses_the_others_answer(scripted_endpoint):
    url, _ = scripted_endpoint((200, ["an answer list"], {}))
    with pytest.raises(flow_tool.EndpointError, match=r"outside the contract \(a chat.completion"):
        flow_tool.query_azml_endpoint(QUESTION, chat_url(url), "test-key")
    url, _ = scripted_endpoint((200, CHAT_REPLY, {}))
    with pytest.raises(flow_tool.EndpointError, match=r"outside the contract \(a JSON list of answers\)"):
        flow_tool.query_azml_endpoint(QUESTION, url, "test-key")


# --- Against the real local endpoint ----------------------------------------------------------------
@pytest.mark.slow
def test_the_flow_answers_with_the_fine_tuned_model(demo_run, pf):
    started = time.perf_counter()
    answer = ask(pf, QUESTION)
    print(f"PFClient().test: {time.perf_counter() - started:.1f} s")
    assert "Bill Gates" in answer and not answer.startswith(QUESTION)


@pytest.mark.slow
def test_history_reaches_the_endpoint(demo_run, pf):
    history = [{"inputs": {"input_data": QUESTION}, "outputs": {"answer": FIRST_ANSWER}}]
    assert "Redmond" in ask(pf, FOLLOW_UP, history)
    assert "Redmond" not in ask(pf, FOLLOW_UP)  # "its" means nothing without the first turn


@pytest.mark.slow
def test_an_endpoint_that_is_down_gets_an_actionable_error_in_time(demo_run, pf, monkeypatch):
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/score"
        monkeypatch.setenv("AZURE_ML_ENDPOINT", url)
        started = time.perf_counter()
        with pytest.raises(Exception) as error:
            ask(pf, QUESTION)
        elapsed = time.perf_counter() - started
    message = str(error.value)
    assert f"the endpoint at {url} is not reachable" in message and "python deploy_model.py" in message
    assert elapsed < 15, f"took {elapsed:.1f} s"  # retries with backoff: ~3 s, far below TOTAL_TIMEOUT_S
    assert secret_key() not in message


@pytest.mark.slow
def test_a_wrong_key_says_so_and_no_key_is_shown(demo_run, pf, monkeypatch, capfd):
    monkeypatch.setenv("AZURE_ML_API_KEY", "not-the-key")
    with pytest.raises(Exception) as error:
        ask(pf, QUESTION)
    message = str(error.value)
    assert "HTTP 401" in message and "AZURE_ML_API_KEY does not match" in message
    shown = message + "".join(capfd.readouterr())
    assert "not-the-key" not in shown and secret_key() not in shown


@pytest.mark.slow
def test_the_script_asks_through_prompt_flow_and_leaves_no_key_behind(demo_run):
    result = run_script("integrate_with_promptflow.py", "--question", QUESTION, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"Q: {QUESTION}" in result.stdout and "Bill Gates" in result.stdout
    assert "make chat" in result.stdout and "--engine fastapi" in result.stdout
    key = secret_key()
    assert key not in result.stdout + result.stderr
    written = [path for folder in (PROJECT_DIR / ".promptflow", WORK_DIR / ".pf") if folder.is_dir()
               for path in folder.rglob("*") if path.is_file()]
    assert any(path.name == "flow.log" for path in written)  # the scan looks where Prompt flow writes
    leaked = [str(path) for path in written if key.encode() in path.read_bytes()]
    assert not leaked, f"the endpoint key is in {leaked}"


@pytest.mark.slow
def test_the_flow_answers_through_the_local_endpoints_chat_completions_too(demo_run, pf, monkeypatch):
    on_score = ask(pf, QUESTION)
    scoring_uri = read_env_file()["AZURE_ML_ENDPOINT"]
    monkeypatch.setenv("AZURE_ML_ENDPOINT", scoring_uri.rsplit("/", 1)[0] + "/v1/chat/completions")
    assert ask(pf, QUESTION) == on_score  # greedy through either contract: the same answer
    history = [{"inputs": {"input_data": QUESTION}, "outputs": {"answer": FIRST_ANSWER}}]
    assert "Redmond" in ask(pf, FOLLOW_UP, history)
    monkeypatch.setenv("AZURE_ML_API_KEY", "not-the-key")
    with pytest.raises(Exception, match="HTTP 401.*AZURE_ML_API_KEY does not match"):
        ask(pf, QUESTION)
