"""Step 4 — ask the fine-tuned model through Prompt flow, then chat with it in the browser.

    python integrate_with_promptflow.py                                   # one question through the flow
    python integrate_with_promptflow.py --question "Who founded Microsoft?"
    make chat     # pf flow serve --source ./ --port 8080 --host localhost --engine fastapi; open http://localhost:8080
    pf flow test --flow . --inputs input_data="Who founded Microsoft?"   # the same flow, from the Prompt flow CLI

flow.dag.yml has one python node, `integrate_with_promptflow`, which runs my_python_tool() below: it sends the
chat so far plus the new question to the endpoint deploy_model.py deployed and returns the answer. The URL and
key are read from .env (AZURE_ML_ENDPOINT, AZURE_ML_API_KEY, written by deploy_model.py) on every call, so a chat
that is already running follows a redeploy; an environment variable overrides .env. The URL says the contract: one
ending in /chat/completions (a serverless endpoint, or the local one's /v1/chat/completions) gets `messages`, any
other (.../score: managed online endpoints, local or Azure) gets `input_data`. `pf flow test` writes
its logs and outputs to .promptflow/; the key is never logged. `make chat` serves with `--engine fastapi`
because the default flask engine's chat page answers 400 in Prompt flow 1.18.5.
"""

import argparse
import asyncio
import logging
import sys
import time
from pathlib import Path

import requests
from promptflow.core import tool  # Prompt flow runs the function marked @tool (this import takes 2-4 s)
from requests.adapters import HTTPAdapter
from urllib3.exceptions import MaxRetryError, ResponseError
from urllib3.util.retry import Retry

import config
from helpers.errors import StepError, exit_code
from scoring_dir.contract import PARAMS, speaks_chat_completions

FLOW_DIR = Path(__file__).resolve().parent  # flow.dag.yml sits next to this file
ENDPOINT_SETTING = "AZURE_ML_ENDPOINT"
KEY_SETTING = "AZURE_ML_API_KEY"

# What every turn asks of the model (scoring_dir/score.py checks each value). Greedy decoding gives the
# same answer to the same chat, which is what tests, evaluations and most support bots want; set
# "do_sample": True for varied answers (then temperature counts: higher is more varied). The tutorial's
# "return_full_text": True would repeat the question at the top of every reply in the chat window.
CHAT_PARAMS = PARAMS  # the contract's defaults (scoring_dir/contract.py)
MAX_HISTORY_TURNS = 10  # earlier turns sent with each question: more context, longer (slower) prompts

# HTTP: give up early on a dead address, wait as long as the endpoint itself allows for an answer.
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = config.REQUEST_TIMEOUT_MS / 1000 + 10  # the endpoint answers 504 after REQUEST_TIMEOUT_MS
TOTAL_TIMEOUT_S = 2 * config.REQUEST_TIMEOUT_MS / 1000  # no retry starts that would wait past this
MAX_ATTEMPTS = 4  # for busy (429), unavailable (503) or unreachable endpoints
RETRY_STATUSES = (429, 503)
MAX_RETRY_WAIT_S = 30  # a longer Retry-After is cut to this; one that ends past the deadline is not waited for
BACKOFF_FACTOR = 0.5  # without Retry-After, retries wait 0, 1, 2 s: longer spares a busy endpoint, costs the user

logger = logging.getLogger(__name__)


def query_azml_endpoint(input_data, endpoint_url, api_key, chat_history=None, params=None):
    """Ask the endpoint to answer `input_data` after `chat_history` (Prompt flow's format); returns the answer."""
    chat = speaks_chat_completions(endpoint_url)  # a serverless endpoint (or the local /v1/chat/completions)
    conversation, params = to_conversation(input_data, chat_history), params or CHAT_PARAMS
    body = ({"messages": conversation, "max_tokens": params["max_new_tokens"],  # temperature 0: greedy decoding
             "temperature": params["temperature"] if params["do_sample"] else 0} if chat
            else {"input_data": [conversation], "params": params})
    response = post_with_retries(endpoint_url, body, api_key)
    status = response.status_code
    if status in RETRY_STATUSES:  # retries are spent, or the next wait would end past the deadline
        attempts = len(response.raw.retries.history) + 1
        raise EndpointError(f"the endpoint at {endpoint_url} is still busy (HTTP {status}) after {attempts} "
                            f"attempt(s): {server_message(response, api_key)}. Try again later, or give the endpoint "
                            "more instances (AZURE_DEPLOYMENT_INSTANCE_COUNT) or MAX_CONCURRENT_REQUESTS_PER_INSTANCE.")
    if status in (401, 403):
        raise EndpointError(f"the endpoint at {endpoint_url} refused the key (HTTP {status}): {KEY_SETTING} does not "
                            "match the endpoint's key. Run `python deploy_model.py` again (it writes the current key "
                            f"to .env), or fix {KEY_SETTING}.")
    if 400 <= status < 500:
        raise EndpointError(f"the endpoint at {endpoint_url} rejected the request (HTTP {status}): "
                            f"{server_message(response, api_key)}")
    if status != 200:
        raise EndpointError(f"the endpoint at {endpoint_url} failed (HTTP {status}): {server_message(response, api_key)}"
                            ". Its log has the details: outputs/endpoint/*.log locally, "
                            "`az ml online-deployment get-logs` on Azure.")
    try:
        answer = response.json()["choices"][0]["message"]["content"] if chat else response.json()[0]
    except (ValueError, KeyError, IndexError, TypeError):
        answer = None
    if not isinstance(answer, str):
        contract = 'a chat.completion, {"choices": [{"message": {"content": ...}}]}' if chat else "a JSON list of answers"
        raise EndpointError(f"the endpoint at {endpoint_url} answered outside the contract ({contract}): "
                            f"{without_key(response.text, api_key, 200)}")
    return answer


def setup_asyncio_policy():
    """On Windows, use the selector event loop: Prompt flow's async code fails on the default proactor loop."""
    if sys.platform.startswith("win") and not isinstance(
        asyncio.get_event_loop_policy(), asyncio.WindowsSelectorEventLoopPolicy
    ):
        asyncio.set_event_loop_policy(asyncio.WindowsSelectorEventLoopPolicy())


@tool
def my_python_tool(input_data: str, chat_history: list = None) -> str:
    """The flow's node: answer the question, with the chat so far as context."""
    if not input_data or not input_data.strip():
        raise ValueError("input_data is empty: type a question")
    setup_asyncio_policy()
    endpoint_url, api_key = endpoint_settings()
    return query_azml_endpoint(input_data, endpoint_url, api_key, chat_history)


# --- The pieces: settings, the conversation, HTTP with retries ----------------------------------------
class EndpointError(StepError):
    """The endpoint could not answer; the message says what to do. It never contains the key."""


def endpoint_settings():
    """(url, key) of the endpoint as they are now: the environment, else .env read again (a redeploy rewrites it)."""
    try:
        return config.fresh(ENDPOINT_SETTING, KEY_SETTING, hint="run `python deploy_model.py` first: it writes them")
    except config.MissingSettingsError as error:
        raise EndpointError(str(error)) from None


def to_conversation(input_data, chat_history=None):
    """Prompt flow's chat history plus the new question, as the endpoint's list of {role, content} messages."""
    messages = []
    for turn in (chat_history or [])[-MAX_HISTORY_TURNS:]:
        question = (turn.get("inputs") or {}).get("input_data")
        answer = (turn.get("outputs") or {}).get("answer")
        if isinstance(question, str) and isinstance(answer, str):  # a turn that failed has no answer: skip it
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": input_data})
    return messages


class DeadlineRetry(Retry):
    """urllib3's Retry that also gives up when the wait before the next attempt would end at `deadline`."""

    def __init__(self, *args, deadline=float("inf"), **kwargs):
        super().__init__(*args, **kwargs)
        self.deadline = deadline  # a time.monotonic() value

    def new(self, **kwargs):
        """The next Retry (urllib3 makes one per attempt), with the same deadline."""
        kwargs.setdefault("deadline", self.deadline)
        return super().new(**kwargs)

    def increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None):
        """Count the failed attempt; out of retries or of time, raise MaxRetryError as urllib3 does."""
        retry = super().increment(method, url, response, error, _pool, _stacktrace)
        retry_after = retry.get_retry_after(response) if response is not None else None  # capped at retry_after_max
        wait = retry_after or retry.get_backoff_time()  # what retry.sleep() will wait
        if time.monotonic() + wait >= self.deadline:
            reason = error or ResponseError(f"no time left to wait {wait:.1f} s after HTTP {response.status}")
            raise MaxRetryError(_pool, url, reason) from reason
        what = f"HTTP {response.status}" if response is not None else type(error).__name__
        logger.warning("%s from %s; retrying in %.1f s (attempt %d of %d)", what, url, wait,
                       len(retry.history) + 1, MAX_ATTEMPTS)
        return retry


def post_with_retries(url, body, api_key):
    """POST the request; urllib3 retries a busy (429/503) or unreachable endpoint until MAX_ATTEMPTS or the deadline."""
    retry = DeadlineRetry(
        total=MAX_ATTEMPTS - 1,
        read=False,  # a read timeout means the model is generating: surface it, do not send the question again
        other=0,  # e.g. a TLS error: another try gives the same answer
        status_forcelist=RETRY_STATUSES,
        allowed_methods={"POST"},  # answering changes nothing on the server, so the POST is safe to repeat
        backoff_factor=BACKOFF_FACTOR,
        retry_after_max=MAX_RETRY_WAIT_S,
        raise_on_status=False,  # out of tries: return the last 429/503, whose text the error shows
        deadline=time.monotonic() + TOTAL_TIMEOUT_S,
    )
    # A session per question, because the retry policy carries this question's deadline; the connection
    # handshake it costs is nothing next to generating an answer.
    with requests.Session() as session:
        adapter = HTTPAdapter(max_retries=retry)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        timeout = (CONNECT_TIMEOUT_S, READ_TIMEOUT_S)  # per attempt
        try:
            return session.post(url, json=body, headers=headers, timeout=timeout)
        except (requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema, requests.exceptions.InvalidURL):
            raise EndpointError(f"{ENDPOINT_SETTING}={url!r} is not an http(s) URL: expected the scoring URI, e.g. "
                                "https://<endpoint>.<region>.inference.ml.azure.com/score or .../v1/chat/completions") from None
        except requests.exceptions.ReadTimeout:
            raise EndpointError(f"the endpoint at {url} did not answer within {timeout[1]:.0f} s: "
                                "ask for fewer max_new_tokens, or raise REQUEST_TIMEOUT_MS") from None
        except requests.exceptions.ConnectionError as error:  # refused, DNS, connect timeout, reset
            raise EndpointError(f"the endpoint at {url} is not reachable ({type(error).__name__}): run `python "
                                f"deploy_model.py` (it starts the local endpoint again), or check {ENDPOINT_SETTING}"
                                ) from None


def without_key(text, api_key, limit):
    """`text` with the key replaced by <key>, then cut to `limit` characters (so no part of the key is left)."""
    return (text.replace(api_key, "<key>") if api_key else text)[:limit]


def server_message(response, api_key):
    """The error the endpoint sent: {"error": ...} from ours, {"message": ...} or {"error": {"message"}} from Azure."""
    try:
        body = response.json()
        text = (body.get("error") or body.get("message")) if isinstance(body, dict) else None
        text = text.get("message") or text if isinstance(text, dict) else text  # {"error": {"message": ...}}: OpenAI's
        text = str(text or body)
    except ValueError:
        text = response.text
    return without_key(text, api_key, 500)


def parse_args(argv=None):
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--question", default="Who founded Microsoft?", help="what to ask (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv=None):
    """Ask one question through the flow (Prompt flow's SDK, as `pf flow test` does) and print the answer."""
    args = parse_args(argv)
    setup_asyncio_policy()
    try:
        endpoint_url, _ = endpoint_settings()  # a missing setting fails here, before Prompt flow starts
    except EndpointError as error:
        return exit_code(error)
    from promptflow.client import PFClient

    print(f"Asking the flow in {config.shown(FLOW_DIR / 'flow.dag.yml')} (endpoint {endpoint_url}) ...")
    started = time.perf_counter()
    try:
        outputs = PFClient().test(flow=FLOW_DIR, inputs={"input_data": args.question, "chat_history": []})
    except Exception as error:  # noqa: BLE001 - Prompt flow wraps the tool's EndpointError in its own exceptions
        return exit_code(f"the flow failed: {error}")
    print(f"Q: {args.question}\nA: {outputs['answer']}\n({time.perf_counter() - started:.1f} s; "
          "inputs, outputs and logs in .promptflow/)")
    print(f"Chat with the model in your browser: `make chat` (or `pf flow serve --source ./ --port "
          f"{config.PROMPTFLOW_PORT} --host localhost --engine fastapi`), then open http://localhost:{config.PROMPTFLOW_PORT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
