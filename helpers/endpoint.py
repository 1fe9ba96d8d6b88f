"""What step 3 does with every new endpoint, on every road: ask it one question, then publish its URL and key.

    answer = smoke_test(url, key)   # the contract's smoke request; the answer, or StepError (the key never shown)
    publish(url, key)               # AZURE_ML_ENDPOINT and AZURE_ML_API_KEY into .env (mode 600) for the flow

The request follows the URL as the flow's does: .../score gets the managed endpoint's body, .../chat/completions
the serverless endpoints' one. An Azure deployment is asked through the SDK instead (it addresses one
deployment, not the traffic split): deploy_model.py sends smoke_request() and reads smoke_answer().
"""

import requests

import config
from helpers.errors import StepError
from helpers.files import update_env_file
from scoring_dir.contract import SMOKE_MAX_NEW_TOKENS, SMOKE_QUESTION, speaks_chat_completions

SMOKE_TIMEOUT_S = (10, 120)  # connect, read: a new endpoint answers one short question well within two minutes


def smoke_request(chat=False):
    """The smoke request's body, in the chat-completions contract (`chat`) or the managed endpoint's."""
    if chat:
        return {"messages": [{"role": "user", "content": SMOKE_QUESTION}], "max_tokens": SMOKE_MAX_NEW_TOKENS,
                "temperature": 0}
    return {"input_data": [SMOKE_QUESTION], "params": {"max_new_tokens": SMOKE_MAX_NEW_TOKENS, "do_sample": False}}


def smoke_answer(body, chat=False):
    """The answer in a smoke response's JSON body; StepError when the body is outside the contract."""
    try:
        answer = body["choices"][0]["message"]["content"] if chat else (body[0] if len(body) == 1 else None)
    except (KeyError, IndexError, TypeError):
        answer = None
    if not isinstance(answer, str):
        raise StepError(f"The smoke request got an answer outside the contract: {str(body)[:300]}")
    return answer


def smoke_test(url, key):
    """POST the smoke request to `url` with `key`; returns the answer."""
    chat = speaks_chat_completions(url)
    try:
        response = requests.post(url, json=smoke_request(chat), headers={"Authorization": f"Bearer {key}"},
                                 timeout=SMOKE_TIMEOUT_S)
    except requests.RequestException as error:
        raise StepError(f"The endpoint at {url} did not answer the smoke request ({type(error).__name__}).") from None
    if response.status_code != 200:
        text = response.text.replace(key, "<key>")[:300]
        raise StepError(f"The smoke request to {url} got HTTP {response.status_code}: {text}")
    try:
        body = response.json()
    except ValueError:
        raise StepError(f"The smoke request to {url} got an answer that is not JSON: "
                        f"{response.text.replace(key, '<key>')[:300]}") from None
    return smoke_answer(body, chat)


def publish(url, key):
    """Write the endpoint's URL and key to .env (atomically, readable by you alone), where the flow reads them."""
    update_env_file(config.ENV_FILE, {"AZURE_ML_ENDPOINT": url, "AZURE_ML_API_KEY": key})
    print(f"Wrote AZURE_ML_ENDPOINT and AZURE_ML_API_KEY to {config.shown(config.ENV_FILE)} (readable by you only).")
