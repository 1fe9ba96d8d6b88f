"""The chat-completions contract (OpenAI's, which Azure's serverless endpoints speak), translated to score.py's.

stand_ins/endpoint_server.py answers `POST /v1/chat/completions` with it, so the flow's serverless branch, the
`openai` client and Microsoft Agent Framework's OpenAIChatCompletionClient can all talk to the local endpoint:

    {"model": "phi", "messages": [{"role": "user", "content": "Who founded Microsoft?"}], "max_tokens": 64,
     "temperature": 0}
    -> {"id": "chatcmpl-...", "object": "chat.completion", "choices": [{"message": {"role": "assistant",
        "content": "..."}, "finish_reason": "stop", "index": 0}], ...}

A request becomes one score.py request ({"input_data": [messages], "params": {...}}), so limits, checks and
generation are score.py's own. Absent `temperature` means score.py's default (greedy, like the flow asks for);
0 is greedy too; above 0 samples at that temperature. One answer per request (`n` 1) and no streaming: Azure's
managed endpoints cannot stream either, and the flow does not need it.
"""

import json
import time
import uuid

# Keys a client may send; the ones not listed in TRANSLATED change nothing here and are accepted so that
# ordinary clients (openai, Agent Framework) work unchanged. Anything else is refused, naming it.
TRANSLATED = ("messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stream")
ACCEPTED = TRANSLATED + ("model", "user", "seed", "stream_options", "store", "metadata")
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}  # developer: newer clients'


def as_score_request(body, bad_request):
    """The chat-completions body (bytes) as score.py's request (JSON text); `bad_request(message)` is raised."""
    try:
        request = json.loads(body)
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
        raise bad_request(f"the request body is not valid JSON: {error}") from None
    if not isinstance(request, dict):
        raise bad_request('the request body must be a JSON object: {"messages": [...], "max_tokens": ...}')
    unknown = sorted(set(request) - set(ACCEPTED))
    if unknown:
        raise bad_request(f"unknown or unsupported key(s) {', '.join(unknown)}; allowed: {', '.join(ACCEPTED)}")
    if request.get("stream"):
        raise bad_request("streaming is not supported: send stream false (or leave it out)")
    if request.get("n", 1) != 1:
        raise bad_request("n must be 1: this endpoint gives one answer per request")
    params = {}
    tokens = request.get("max_completion_tokens", request.get("max_tokens"))
    if tokens is not None:
        params["max_new_tokens"] = tokens  # score.py checks it against MAX_NEW_TOKENS_LIMIT
    temperature = request.get("temperature")
    if temperature is not None:
        sample = not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature == 0)
        params["do_sample"] = sample
        if sample:
            params["temperature"] = temperature
    if request.get("top_p") is not None:
        params["top_p"] = request["top_p"]
    return json.dumps({"input_data": [messages_of(request.get("messages"), bad_request)], "params": params})


def messages_of(messages, bad_request):
    """The messages as score.py's [{"role", "content"}]: text parts joined, "developer" read as "system"."""
    if not isinstance(messages, list) or not messages:
        raise bad_request('messages must be a non-empty list of {"role": ..., "content": ...}')
    converted = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            role = message.get("role") if isinstance(message, dict) else None
            raise bad_request(f"messages[{i}] has role {json.dumps(role)}; allowed: {', '.join(ROLES)}")
        content = message.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": "..."}], as some clients send it
            if not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                       for part in content):
                raise bad_request(f"messages[{i}] content must be text: this model reads no images or audio")
            content = "".join(part["text"] for part in content)
        if not isinstance(content, str):
            raise bad_request(f"messages[{i}] content must be a string")
        converted.append({"role": ROLES[message["role"]], "content": content})
    return converted


def completion(answer, model):
    """score.py's answer as a chat.completion object."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
    }


# score.py's words for what a chat-completions client calls otherwise, in error messages.
SCORE_TERMS = {"param max_new_tokens": "max_tokens", "param temperature": "temperature", "param top_p": "top_p",
               "input_data[0]": "messages", "input_data": "messages"}


def error_body(status, message):
    """An error as OpenAI-compatible endpoints send it (Azure's serverless ones too): {"error": {"message", ...}}."""
    for score_term, chat_term in SCORE_TERMS.items():
        message = message.replace(score_term, chat_term)
    kind = {401: "authentication_error", 429: "rate_limit_error"}.get(status, "invalid_request_error"
                                                                     if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "code": str(status)}}
