"""The job's answer-quality figures (finetuning_dir/answer_quality.py): F1 and ROUGE-L held to Microsoft's own
evaluators (azure-ai-evaluation, which evaluate_flow.py runs), perplexity per chat to its definition."""

import json
import math
import random

import pytest

import config
from finetuning_dir.answer_quality import AnswerQuality, f1_score, first_exchange, rouge_l


def sample_pairs():
    """Answer/reference pairs from the bundled chats (random pairs, and each answer against a reworded one) plus edge cases."""
    texts = [message["content"] for line in config.SAMPLE_DATASET_PATH.read_text(encoding="utf-8").splitlines()
             for message in json.loads(line)["messages"]]
    rng = random.Random(0)
    pairs = [(rng.choice(texts), rng.choice(texts)) for _ in range(150)]
    pairs += [(text, text.replace("the ", "a ").upper()) for text in texts[:30]]
    return pairs + [("The Eiffel Tower, in Paris!", "the eiffel tower is in paris"), ("", "Paris"), ("Paris", ""),
                    ("a an the", "the"), ("co-operate, re-use", "cooperate reuse"), ("Ünïcode café", "unicode cafe")]


def test_f1_and_rouge_l_equal_azure_ai_evaluations_evaluators():
    from azure.ai.evaluation import F1ScoreEvaluator, RougeScoreEvaluator, RougeType

    f1_evaluator, rouge_evaluator = F1ScoreEvaluator(), RougeScoreEvaluator(rouge_type=RougeType.ROUGE_L)
    for answer, reference in sample_pairs():
        assert f1_score(answer, reference) == pytest.approx(
            f1_evaluator(response=answer, ground_truth=reference)["f1_score"], abs=1e-12), (answer, reference)
        assert rouge_l(answer, reference) == pytest.approx(
            rouge_evaluator(response=answer, ground_truth=reference)["rouge"], abs=1e-12), (answer, reference)


def test_the_first_exchange_keeps_a_system_message_and_finds_the_first_answer():
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Who?"},
            {"role": "assistant", "content": "Me."}]
    assert first_exchange(chat) == (chat[:2], "Hello.")


class CharacterTokenizer:
    """A tokenizer whose template is plain text and whose ids are characters: enough to check the arithmetic."""

    def apply_chat_template(self, messages, add_generation_prompt=False, return_dict=True):
        text = "".join(f"{m['role']}:{m['content']}|" for m in messages) + ("assistant:" if add_generation_prompt else "")
        return {"input_ids": [ord(ch) for ch in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


def test_perplexity_is_per_chat_weighted_by_predicted_tokens_and_answers_are_scored():
    chats = [[{"role": "user", "content": "ab"}, {"role": "assistant", "content": "cd"}],
             [{"role": "user", "content": "x"}, {"role": "assistant", "content": "Paris"}]]
    quality = AnswerQuality(chats, CharacterTokenizer())
    seen = []

    def score_chat(ids):
        seen.append(len(ids))
        return 0.5 * (len(ids) - 1)  # 0.5 nats a predicted token

    assert quality.perplexity(score_chat) == pytest.approx(math.exp(0.5))
    assert seen == [len("user:ab|assistant:cd|"), len("user:x|assistant:Paris|")]  # whole chats, one call each
    result = quality.answers(lambda prompt: [ord(ch) for ch in "Paris"])
    assert result["answers"] == ["Paris", "Paris"] and result["new_tokens"] == 10
    assert result["f1"] == pytest.approx(0.5) and result["rouge_l"] == pytest.approx(0.5)


def test_the_scored_chats_are_bounded_in_number_and_tokens(monkeypatch):
    from finetuning_dir import answer_quality

    monkeypatch.setattr(answer_quality, "MAX_TOKENS", 50)
    chats = [[{"role": "user", "content": "x" * 10}, {"role": "assistant", "content": "y" * 10}]] * 10
    quality = AnswerQuality(chats, CharacterTokenizer())
    assert len(quality.chats) == 50 // len("user:xxxxxxxxxx|assistant:yyyyyyyyyy|")  # whole chats up to the budget
    assert len(quality.questions) == 10  # the answers are bounded by their own count (export_onnx's questions)
