"""Stops from the model (finetuning_dir/chat_stops.py): the end-of-turn token each chat-template family writes after
an answer, found from the tokenizer's own template, and the same list in the saved model, score.py and the export.

The templates are the model families' own, as their tokenizer_config.json ships them (Hugging Face Hub, read
2024-2025; the Hub cannot be reached here, so each is copied below with the model it comes from). The tokenizers
are small word-level ones with each family's special tokens: the derivation reads only the template and which
tokens are special, never the vocabulary's size. The ChatML family is also checked on a real tokenizer
(SmolLM2-135M-Instruct, tests/test_real_model.py).
"""

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from finetuning_dir.chat_stops import end_of_turn_id, stop_token_ids

# microsoft/Phi-3.5-mini-instruct
PHI3 = ("{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
        "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
        "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
        "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
# microsoft/Phi-4-mini-instruct (its tool-calling branch left out)
PHI4 = ("{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}")
# Qwen/Qwen2.5-0.5B-Instruct's ChatML (its tool-calling branches left out)
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
          "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# meta-llama/Meta-Llama-3-8B-Instruct
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
          "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
          "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# google/gemma-2-2b-it
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
         "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
         "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
         "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
         "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
# mistralai/Mistral-7B-Instruct-v0.1: the answer ends with the end of text itself
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
           "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")

# family: (template, special tokens, bos, eos, the end of a turn)
FAMILIES = {
    "phi-3": (PHI3, ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "<s>", "<|endoftext|>", "<|end|>"),
    "phi-4": (PHI4, ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "<s>", "<|endoftext|>", "<|end|>"),
    "chatml": (CHATML, ["<|im_start|>", "<|im_end|>"], None, "<|endoftext|>", "<|im_end|>"),
    "llama-3": (LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|begin_of_text|>",
                "<|end_of_text|>", "<|eot_id|>"),
    "gemma": (GEMMA, ["<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<end_of_turn>"),
    "mistral": (MISTRAL, [], "<s>", "</s>", "</s>"),
}


def family_tokenizer(family):
    """A word-level tokenizer with the family's special tokens and chat template."""
    template, specials, bos, eos, _ = FAMILIES[family]
    words = ["<unk>", "Question", "?", "Answer-7f3c", "assistant", "user", "system", "model", "[INST]", "[/INST]", "\n"]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token=eos,
                                        **({"bos_token": bos} if bos else {}), chat_template=template)
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    return tokenizer


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_end_of_a_turn_is_read_from_each_familys_template(family):
    tokenizer = family_tokenizer(family)
    expected = FAMILIES[family][4]
    assert tokenizer.convert_ids_to_tokens(end_of_turn_id(tokenizer)) == expected
    stops = stop_token_ids(tokenizer, eos_token_id=None)
    assert tokenizer.convert_ids_to_tokens(stops) == list(dict.fromkeys([FAMILIES[family][3], expected]))


def test_the_generation_configs_own_ids_come_first_and_none_twice():
    tokenizer = family_tokenizer("llama-3")
    eot, eos = tokenizer.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>"])
    assert stop_token_ids(tokenizer, eot) == [eot, eos]  # Llama 3.1's generation_config lists both; no repeats
    assert stop_token_ids(tokenizer, [eos, eot]) == [eos, eot]


def test_a_tokenizer_without_a_template_stops_at_its_end_of_text():
    tokenizer = family_tokenizer("chatml")
    tokenizer.chat_template = None
    assert end_of_turn_id(tokenizer) is None
    assert stop_token_ids(tokenizer) == [tokenizer.eos_token_id]


def test_plain_text_after_the_answer_is_no_stop():
    """A template that ends an answer with a newline only (no special token) gives no end-of-turn stop."""
    tokenizer = family_tokenizer("chatml")
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] + ' ' + m['content'] + '\n' }}{% endfor %}"
    assert end_of_turn_id(tokenizer) is None


@pytest.mark.parametrize("family", ["phi-4", "llama-3"])
def test_the_saved_model_score_py_and_the_export_read_one_list(family, tmp_path):
    """fine_tune.save_mlflow_model writes the stops into generation_config.json; score.py and the export's
    reference read them back from there, the same ids in the same order."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetuning_dir import fine_tune, onnx_export
    from stand_ins.endpoint_server import load_scoring_script
    from tests.test_score import SCORE_PY

    score = load_scoring_script(SCORE_PY)  # as Azure ML imports it

    tokenizer = family_tokenizer(family)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True))
    model.generation_config.eos_token_id = tokenizer.eos_token_id  # only the end of text, as many models ship it
    model.to(torch.float32)
    fine_tune.save_mlflow_model(model, tokenizer, tmp_path / "model")
    saved = json.loads((tmp_path / "model" / "model" / "generation_config.json").read_text())["eos_token_id"]
    expected = stop_token_ids(tokenizer, tokenizer.eos_token_id)
    assert saved == expected and len(expected) == 2
    score._set_generation_limits(tmp_path / "model" / "model", tokenizer)
    assert score._stop_ids == expected
    folder = onnx_export.plain_transformers_folder(tmp_path / "model", tmp_path / "hf")
    reference = onnx_export.Reference(folder, [[{"role": "user", "content": "Question ?"},
                                                {"role": "assistant", "content": "Answer-7f3c"}]], 4)
    assert reference.stop_ids == expected
