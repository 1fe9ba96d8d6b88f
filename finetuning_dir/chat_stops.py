"""Where a model's answer ends: the end-of-turn token its chat template writes after every assistant message.

Phi-3 and Phi-4 close a turn with `<|end|>`, ChatML models (Qwen, SmolLM) with `<|im_end|>`, Llama 3 with
`<|eot_id|>`, Gemma with `<end_of_turn>`, Mistral with `</s>`. A model whose generation config names only its
end-of-text token talks on past its answer, into a new turn. So the stops are read from the model itself:

    stop_token_ids(tokenizer, generation_config.eos_token_id)

renders a one-answer chat with the tokenizer's own chat template and takes the special token that follows the
answer, plus the end-of-text token and whatever the generation config already lists. fine_tune.py writes the
list into the saved model's generation_config.json (`eos_token_id`), which is where every reader finds it:
score.py (both runtimes), the ONNX export (the model builder copies it into genai_config.json) and the
export's measurements. Like the rest of this folder it imports only its arguments' libraries.
"""

ANSWER = "Answer-7f3c"  # a text no template changes, to find where the answer ends


def end_of_turn_id(tokenizer):
    """The special token the chat template writes right after an assistant's answer, or None (no template)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    chat = [{"role": "user", "content": "Question?"}, {"role": "assistant", "content": ANSWER}]
    try:
        text = tokenizer.apply_chat_template(chat, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that raises on this chat (rare) simply gives no stop
        return None
    if ANSWER not in text:
        return None
    after = text.split(ANSWER, 1)[1].lstrip(" ")  # a template may put a space before the end (Llama 2 style)
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = set(tokenizer.all_special_ids) | {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
    return ids[0] if ids and ids[0] in special else None


def stop_token_ids(tokenizer, eos_token_id=None):
    """The ids that end an answer: the generation config's end-of-text id(s), the tokenizer's, and the end of a turn."""
    listed = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    ids = [*listed, tokenizer.eos_token_id, end_of_turn_id(tokenizer)]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))  # in order, once each
