"""Step 4 — ask the fine-tuned model through Prompt flow, then chat with it in the browser.

    python integrate_with_promptflow.py                                   # one question through the flow
    python integrate_with_promptflow.py --question "Who founded Microsoft?"
    make chat     # pf flow serve --source ./ --port 8080 --host localhost --engine fastapi; open http://localhost:8080
    pf flow test --flow . --inputs input_data="Who founded Microsoft?"   # the same flow, from the Prompt flow CLI

flow.dag.yml has one python node, `integrate_with_promptflow`, which runs my_python_tool() below: it sends the
chat so far plus the new question to the endpoint deploy_model.py deployed and returns the answer. The URL and
key are read from .env (AZURE_ML_ENDPOINT, AZURE_ML_API_KEY, written by deploy_model.py) on every call, so a chat
that is already running follows a redeploy; an environment variable overrides .env. The local endpoint and an
Azure managed online endpoint speak the same contract, so the flow is the same for both. `pf flow test` writes
its logs and outputs to .promptflow/; the key is never logged. `make chat` serves with `--engine fastapi`
because the default flask engine's chat page answers 400 in Prompt flow 1.18.5.
"""

import argparse
import asyncio
import logging
import os
import sys
import time
from email.utils import parsedate_to_datetime
from pathlib import Path

import requests
from dotenv import dotenv_values
from promptflow.core import tool  # Prompt flow runs the function marked @tool (this import takes 2-4 s)

import config

FLOW_DIR = Path(__file__).resolve().parent  # flow.dag.yml sits next to this file
ENDPOINT_SETTING = "AZURE_ML_ENDPOINT"
KEY_SETTING = "AZURE_ML_API_KEY"

# What every turn asks of the model (scoring_dir/score.py checks each value). Greedy decoding gives the
# same answer to the same chat, which is what tests, evaluations and most support bots want; set
# "do_sample": True for varied answers (then temperature counts: higher is more varied). The tutorial's
# "return_full_text": True would repeat the question at the top of every reply in the chat window.
CHAT_PARAMS = {"max_new_tokens": 128, "do_sample": False, "temperature": 0.7, "return_full_text": False}
MAX_HISTORY_TURNS = 10  # earlier turns sent with each question: more context, longer (slower) prompts

# HTTP: give up early on a dead address, wait as long as the endpoint itself allows for an answer.
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = config.REQUEST_TIMEOUT_MS / 1000 + 10  # the endpoint answers 504 after REQUEST_TIMEOUT_MS
TOTAL_TIMEOUT_S = 2 * config.REQUEST_TIMEOUT_MS / 1000  # all attempts and waits together
MAX_ATTEMPTS = 4  # for busy (429), unavailable (503) or unreachable endpoints
RETRY_STATUSES = (429, 503)
MAX_RETRY_WAIT_S = 30  # a longer Retry-After is cut to this (and to the time left)

logger = logging.getLogger(__name__)
_session = None  # one requests.Session per process: keeps the connection open between turns


class EndpointError(RuntimeError):
    """The endpoint could not answer; the message says what to do. It never contains the key."""


def setup_asyncio_policy():
    """On Windows, use the selector event loop: Prompt flow's async code fails on the default proactor loop."""
    if sys.platform.startswith("win") and not isinstance(
        asyncio.get_event_loop_policy(), asyncio.WindowsSelectorEventLoopPolicy
    ):
        asyncio.set_event_loop_policy(asyncio.WindowsSelectorEventLoopPolicy())


# .env as it was when this module was loaded: config.py copied it into os.environ then (see endpoint_settings).
_DOTENV_AT_LOAD = dotenv_values(config.ENV_FILE)


def endpoint_settings():
    """(url, key) of the endpoint, read afresh: .env, unless the environment sets a different value.

    config.py copies .env into os.environ once, at import; a value still equal to that copy came from .env,
    so today's .env is read instead, and a long-running `pf flow serve` follows a redeploy's new URL and key.
    """
    current = dotenv_values(config.ENV_FILE)
    values = []
    for name in (ENDPOINT_SETTING, KEY_SETTING):
        value = os.environ.get(name)
        if value is None or value == _DOTENV_AT_LOAD.get(name):
            value = current.get(name)
        value = (value or "").strip()
        if config.is_placeholder(value):
            raise EndpointError(f"{name} is not set (or still a placeholder) in {config.shown(config.ENV_FILE)} "
                                "or the environment: run `python deploy_model.py` first, which writes it.")
        values.append(value)
    return tuple(values)


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


def get_session():
    """This process's HTTP session."""
    global _session
    if _session is None:
        _session = requests.Session()
    return _session


def retry_wait_s(response, attempt):
    """How long to wait before the next attempt: the server's Retry-After, else 0.5, 1, 2 ... s."""
    header = (response.headers.get("Retry-After", "") if response is not None else "").strip()
    if header.isdigit():
        return min(float(header), MAX_RETRY_WAIT_S)
    if header:
        try:  # the other form of Retry-After: an HTTP date
            return min(max(parsedate_to_datetime(header).timestamp() - time.time(), 0.0), MAX_RETRY_WAIT_S)
        except (TypeError, ValueError):
            pass
    return min(0.5 * 2 ** (attempt - 1), MAX_RETRY_WAIT_S)


def server_message(response, api_key):
    """The error the endpoint sent: {"error": ...} from ours, {"message": ...} from Azure, else the text."""
    try:
        body = response.json()
        text = (body.get("error") or body.get("message")) if isinstance(body, dict) else None
        text = str(text or body)
    except ValueError:
        text = response.text
    return text[:500].replace(api_key, "<key>") if api_key else text[:500]


def post_with_retries(url, body, api_key, deadline):
    """POST the request; retry a busy (429/503) or unreachable endpoint until MAX_ATTEMPTS or the deadline."""
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    for attempt in range(1, MAX_ATTEMPTS + 1):
        left = deadline - time.monotonic()
        response, problem = None, None
        timeout = (max(min(CONNECT_TIMEOUT_S, left), 1), max(min(READ_TIMEOUT_S, left), 1))  # (connect, read)
        try:
            response = get_session().post(url, json=body, headers=headers, timeout=timeout)
        except (requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema, requests.exceptions.InvalidURL):
            raise EndpointError(f"{ENDPOINT_SETTING}={url!r} is not an http(s) URL: expected the scoring URI, "
                                "e.g. https://<endpoint>.<region>.inference.ml.azure.com/score") from None
        except requests.exceptions.ReadTimeout:
            raise EndpointError(f"the endpoint at {url} did not answer within {timeout[1]:.0f} s: "
                                "ask for fewer max_new_tokens, or raise REQUEST_TIMEOUT_MS") from None
        except requests.exceptions.ConnectionError as error:  # refused, DNS, connect timeout, reset
            problem = type(error).__name__
        if response is not None and response.status_code not in RETRY_STATUSES:
            return response
        wait = retry_wait_s(response, attempt)
        if attempt == MAX_ATTEMPTS or time.monotonic() + wait >= deadline:
            break
        what = f"HTTP {response.status_code}" if response is not None else problem
        logger.warning("%s from %s; retrying in %.1f s (attempt %d of %d)", what, url, wait, attempt + 1, MAX_ATTEMPTS)
        time.sleep(wait)
    if response is None:
        raise EndpointError(f"the endpoint at {url} is not reachable ({problem}): run `python deploy_model.py` "
                            f"(it starts the local endpoint again), or check {ENDPOINT_SETTING}")
    raise EndpointError(f"the endpoint at {url} is still busy (HTTP {response.status_code}) after {attempt} "
                        f"attempt(s): {server_message(response, api_key)}. Try again later, or give the endpoint "
                        "more instances (AZURE_DEPLOYMENT_INSTANCE_COUNT) or MAX_CONCURRENT_REQUESTS_PER_INSTANCE.")


def query_azml_endpoint(input_data, endpoint_url, api_key, chat_history=None, params=None):
    """Ask the endpoint to answer `input_data` after `chat_history` (Prompt flow's format); returns the answer."""
    body = {"input_data": [to_conversation(input_data, chat_history)], "params": params or CHAT_PARAMS}
    response = post_with_retries(endpoint_url, body, api_key, time.monotonic() + TOTAL_TIMEOUT_S)
    status = response.status_code
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
        answer = response.json()[0]
    except (ValueError, KeyError, IndexError, TypeError):
        answer = None
    if not isinstance(answer, str):
        raise EndpointError(f"the endpoint at {endpoint_url} answered outside the contract (a JSON list of answer "
                            f"strings): {response.text[:200]}")
    return answer


@tool
def my_python_tool(input_data: str, chat_history: list = None) -> str:
    """The flow's node: answer the question, with the chat so far as context."""
    if not input_data or not input_data.strip():
        raise ValueError("input_data is empty: type a question")
    setup_asyncio_policy()
    endpoint_url, api_key = endpoint_settings()
    return query_azml_endpoint(input_data, endpoint_url, api_key, chat_history)


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
        print(f"error: {error}", file=sys.stderr)
        return 1
    from promptflow.client import PFClient

    print(f"Asking the flow in {config.shown(FLOW_DIR / 'flow.dag.yml')} (endpoint {endpoint_url}) ...")
    started = time.perf_counter()
    try:
        outputs = PFClient().test(flow=FLOW_DIR, inputs={"input_data": args.question, "chat_history": []})
    except Exception as error:  # noqa: BLE001 - Prompt flow wraps the tool's EndpointError in its own exceptions
        print(f"error: the flow failed: {error}", file=sys.stderr)
        return 1
    print(f"Q: {args.question}\nA: {outputs['answer']}\n({time.perf_counter() - started:.1f} s; "
          "inputs, outputs and logs in .promptflow/)")
    print(f"Chat with the model in your browser: `make chat` (or `pf flow serve --source ./ --port "
          f"{config.PROMPTFLOW_PORT} --host localhost --engine fastapi`), then open http://localhost:{config.PROMPTFLOW_PORT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
