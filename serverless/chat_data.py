"""Step 1 on the serverless road: the split as chat-completions JSONL, the format serverless fine-tuning reads.

    TARGET=serverless python download_dataset.py   # or --chat-completions: data/train_chat.jsonl, data/test_chat.jsonl

`{"messages": [{"role": ..., "content": ...}, ...]}` and nothing else on each line.
"""

import json

from finetuning_dir.chat_data import conversation_problem
from helpers.errors import StepError
from helpers.files import write_generated_file


def save_chat_completions_jsonl(dataset, filepath, force=False):
    """Write the chats as chat-completions JSONL (messages only, each line checked again); returns what happened."""
    lines = []
    for index, record in enumerate(dataset):
        chat = {"messages": [{"role": message["role"], "content": message["content"]} for message in record["messages"]]}
        problem = conversation_problem(chat)
        if problem:  # step 1 checked every record already, so only a change of the rules could get here
            raise StepError(f"record {index}: {problem}")
        lines.append(json.dumps(chat, ensure_ascii=False) + "\n")
    return write_generated_file(filepath, "".join(lines), force=force)
