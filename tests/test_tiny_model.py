"""The embedded base model: a real Phi-3, built deterministically, loaded like the Hub model."""

import hashlib

import pytest

import config
from stand_ins import tiny_model


@pytest.fixture(scope="module")
def base_model_dir():
    """The session's tiny Phi-3 (built on first use, like the local steps do)."""
    return tiny_model.ensure_tiny_phi3()


@pytest.fixture(scope="module")
def loaded(base_model_dir):
    """Tokenizer and model, loaded exactly as microsoft/Phi-3.5-mini-instruct would be."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(base_model_dir), AutoModelForCausalLM.from_pretrained(base_model_dir)


def test_reloads_through_auto_classes_as_phi3(loaded):
    tokenizer, model = loaded
    assert type(model).__name__ == "Phi3ForCausalLM" and model.config.model_type == "phi3"
    assert model.num_parameters() < 10_000_000
    for token in ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"]:
        assert tokenizer.convert_tokens_to_ids(token) != tokenizer.unk_token_id
        assert tokenizer.tokenize(token) == [token]  # one special token each, never split


def test_chat_template_renders_the_phi3_format(loaded):
    tokenizer, _ = loaded
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Who?"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|system|>\nBe brief.<|end|>\n<|user|>\nHi?<|end|>\n<|assistant|>\nHello.<|end|>\n<|user|>\nWho?<|end|>\n<|assistant|>\n"
    )
    # As in Phi-3.5's template, an empty system message renders nothing.
    empty_system = [{"role": "system", "content": ""}, {"role": "user", "content": "Hi?"}]
    assert tokenizer.apply_chat_template(empty_system, tokenize=False, add_generation_prompt=True) == "<|user|>\nHi?<|end|>\n<|assistant|>\n"


def test_template_marks_assistant_tokens_for_assistant_only_loss(loaded):
    tokenizer, _ = loaded
    messages = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello there."}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    marked = [tid for tid, mask in zip(rendered["input_ids"], rendered["assistant_masks"]) if mask]
    assert tokenizer.decode(marked) == "Hello there.<|end|>"


def test_any_utf8_text_tokenizes_and_round_trips(loaded):
    tokenizer, _ = loaded
    text = "Grüße, café crème — 日本語 🎉 € \u00a0 Ω"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_generation_stops_at_end_token(loaded):
    import torch

    tokenizer, model = loaded
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    assert end_id in model.generation_config.eos_token_id

    class ForceEndAtThirdToken(torch.nn.Module):
        """A logits processor that makes <|end|> the only choice at the third new token."""

        def __init__(self, prompt_length):
            super().__init__()
            self.prompt_length = prompt_length

        def forward(self, input_ids, scores):
            if input_ids.shape[1] - self.prompt_length == 2:
                scores = torch.full_like(scores, -float("inf"))
                scores[:, end_id] = 0
            return scores

    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "Hi?"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    length = inputs["input_ids"].shape[1]
    output = model.generate(**inputs, max_new_tokens=20, do_sample=False, logits_processor=[ForceEndAtThirdToken(length)])
    new_tokens = output[0][length:].tolist()
    assert len(new_tokens) == 3 and new_tokens[-1] == end_id


def test_build_is_deterministic(tmp_path, base_model_dir):
    tiny_model.build_tiny_phi3(tmp_path / "again", config.SAMPLE_DATASET_PATH)
    for name in ("model.safetensors", "tokenizer.json"):
        first = hashlib.sha256((base_model_dir / name).read_bytes()).hexdigest()
        second = hashlib.sha256((tmp_path / "again" / name).read_bytes()).hexdigest()
        assert first == second, name


def test_ensure_reuses_an_up_to_date_build(base_model_dir, capsys):
    stamp_time = (base_model_dir / tiny_model.STAMP_FILE).stat().st_mtime_ns
    assert tiny_model.ensure_tiny_phi3() == base_model_dir
    assert (base_model_dir / tiny_model.STAMP_FILE).stat().st_mtime_ns == stamp_time
    assert "Built" not in capsys.readouterr().out


def test_a_model_of_your_own_in_the_folder_is_never_replaced(tmp_path):
    own = tmp_path / "my-phi"
    own.mkdir()
    (own / "config.json").write_text('{"model_type": "phi3"}')
    with pytest.raises(FileExistsError, match="did not build"):
        tiny_model.ensure_tiny_phi3(own, force=True)
    assert sorted(p.name for p in own.iterdir()) == ["config.json"]
