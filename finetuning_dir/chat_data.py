"""Reading and checking chat records in the ultrachat_200k schema.

Used by fine_tune.py (inside the training job, so it depends on nothing but the standard library) and by
download_dataset.py. A record is `{"prompt": str, "prompt_id": str, "messages": [{"role", "content"}, ...]}`;
only `messages` is needed for training.
"""

import json
from pathlib import Path

ROLES = ("system", "user", "assistant")


class ChatDataError(ValueError):
    """A chat data file or record that cannot be used; the message says where and why."""


def conversation_problem(record):
    """Return why `record` is not a usable chat (None when it is)."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    messages = record.get("messages")
    if messages is None:
        return "missing 'messages'"
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    expected = "user"
    for turn, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"message {turn} is not an object"
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            return f"message {turn} has unknown role {role!r} (allowed: {', '.join(ROLES)})"
        if not isinstance(content, str) or not content.strip():
            return f"message {turn} ({role}) has empty content"
        if role == "system":
            if turn != 0:
                return f"message {turn} is a system message; only the first message may be one"
            continue
        if role != expected:
            return f"message {turn} is {role!r} where {expected!r} was expected (turns must alternate)"
        expected = "assistant" if role == "user" else "user"
    if messages[-1].get("role") != "assistant":
        return "the last message must be the assistant's answer"
    return None


def read_chat_jsonl(path):
    """Read and check a JSONL chat file; the first bad line raises ChatDataError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise ChatDataError(f"{path}: file not found")
    records = []
    with path.open(encoding="utf-8") as lines:
        try:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ChatDataError(f"{path}, line {number}: not valid JSON ({error.msg}, column {error.colno})") from None
                problem = conversation_problem(record)
                if problem:
                    raise ChatDataError(f"{path}, line {number}: {problem}")
                records.append(record)
        except UnicodeDecodeError as error:
            raise ChatDataError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if not records:
        raise ChatDataError(f"{path}: no records")
    return records
