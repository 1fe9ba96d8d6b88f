"""How good a model's answers are on held-out chats: F1 and ROUGE-L against the reference answers, perplexity per chat.

    quality = AnswerQuality(chats, tokenizer)      # the held-out chats, formatted with the model's own template
    quality.perplexity(score_chat)                 # score_chat(ids) -> summed NLL of ids[1:]: one forward per chat
    quality.answers(generate)                      # generate(prompt_ids) -> answer ids; F1/ROUGE-L of the answers

One definition of each figure for the whole job: fine_tune.py's summary (the model before and after training)
and onnx_export.py (each candidate against the unquantized model) both use this module.

- **Perplexity per chat**: each held-out chat on its own, formatted with the chat template as in training,
  scored teacher-forced (every token predicted from the ones before it), exp(summed NLL / predicted tokens)
  over all chats. Unlike the trainer's eval loss it does not depend on packing or the training length
  (chats packed into 2048-token blocks see other chats' tokens as context).
- **F1** and **ROUGE-L** of the greedy answer to each chat's first question against the chat's first answer:
  the same arithmetic as azure-ai-evaluation's F1ScoreEvaluator (SQuAD's token F1) and RougeScoreEvaluator
  (rouge_score's LCS F-measure, no stemmer), which evaluate_flow.py runs through the flow;
  tests/test_answer_quality.py holds this module to those evaluators. Written here because the Azure job
  uploads finetuning_dir/ alone and does not install azure-ai-evaluation.
"""

import math
import re
import string
from collections import Counter

# The held-out chats scored: the first MAX_CHATS, each cut to MAX_CHAT_TOKENS, and no more than MAX_TOKENS in all
# (the 48 sample chats are ~5,000 tokens; ultrachat's chats ~1,000 each, so 24 of them). It bounds the cost where it
# matters: each ONNX candidate is scored on the job node's CPU, ~20 tokens/s a core for Phi-3.5-mini's prefill.
MAX_CHATS, MAX_CHAT_TOKENS, MAX_TOKENS = 48, 512, 12_288
ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCTUATION = set(string.punctuation)
ROUGE_TOKEN = re.compile(r"[a-z0-9]+")


def f1_score(answer, reference):
    """SQuAD's token F1: lower-case, punctuation and articles removed, split on whitespace, bag-of-words overlap."""
    def words(text):
        return ARTICLES.sub(" ", "".join(ch for ch in text.lower() if ch not in PUNCTUATION)).split()

    predicted, expected = words(answer), words(reference)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if not common:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def rouge_l(answer, reference):
    """ROUGE-L F-measure: the longest common subsequence of lower-case alphanumeric words."""
    predicted, expected = ROUGE_TOKEN.findall(answer.lower()), ROUGE_TOKEN.findall(reference.lower())
    if not predicted or not expected:
        return 0.0
    previous = [0] * (len(predicted) + 1)
    for word in expected:
        current = [0]
        for j, other in enumerate(predicted):
            current.append(previous[j] + 1 if word == other else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if not lcs:
        return 0.0
    precision, recall = lcs / len(predicted), lcs / len(expected)
    return 2 * precision * recall / (precision + recall)


def first_exchange(chat):
    """The messages up to the first question (a system message included), and the first answer to it."""
    first_user = next(i for i, message in enumerate(chat) if message["role"] == "user")
    reference = next((m["content"] for m in chat[first_user + 1:] if m["role"] == "assistant"), "")
    return chat[:first_user + 1], reference


class AnswerQuality:
    """Held-out chats as token ids in the model's template: the whole chats (perplexity) and first questions (answers)."""

    def __init__(self, chats, tokenizer):
        self.tokenizer = tokenizer
        chats = chats[:MAX_CHATS]
        self.chats, total = [], 0
        for chat in chats:
            chat_ids = ids(tokenizer, chat)[:MAX_CHAT_TOKENS]
            if self.chats and total + len(chat_ids) > MAX_TOKENS:
                break
            self.chats.append(chat_ids)
            total += len(chat_ids)
        self.questions, self.references = [], []
        for chat in chats:
            question, reference = first_exchange(chat)
            self.questions.append(ids(tokenizer, question, add_generation_prompt=True))
            self.references.append(reference)

    def perplexity(self, score_chat):
        """exp(summed NLL / predicted tokens) over the chats; score_chat(ids) returns the summed NLL of ids[1:]."""
        nll = sum(score_chat(chat) for chat in self.chats)
        return math.exp(nll / sum(len(chat) - 1 for chat in self.chats))

    def answers(self, generate, limit=None):
        """The greedy answers to the first `limit` questions, with their mean F1 and ROUGE-L and the tokens made."""
        texts, tokens = [], 0
        for prompt in self.questions[:limit]:
            answer_ids = generate(prompt)
            tokens += len(answer_ids)
            texts.append(self.tokenizer.decode(answer_ids, skip_special_tokens=True).strip())
        references = self.references[:len(texts)]
        return {"answers": texts, "new_tokens": tokens,
                "f1": sum(map(f1_score, texts, references)) / max(len(texts), 1),
                "rouge_l": sum(map(rouge_l, texts, references)) / max(len(texts), 1)}


def ids(tokenizer, messages, add_generation_prompt=False):
    """A chat's token ids in the tokenizer's chat template (what training saw; with the answer prompt, what serving sends)."""
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, return_dict=True)
    return [int(i) for i in encoded["input_ids"]]


class TransformersScorer:
    """A transformers model as AnswerQuality's two callables: summed NLL of a chat, greedy answer ids."""

    def __init__(self, model, stop_ids, pad_id, max_new_tokens):
        self.model, self.stop_ids, self.pad_id, self.max_new_tokens = model, stop_ids, pad_id, max_new_tokens

    def nll(self, chat_ids):
        """The summed negative log-likelihood of tokens 1..n-1, each predicted from those before it."""
        import torch

        device = next(self.model.parameters()).device
        with torch.inference_mode():
            batch = torch.tensor([chat_ids], device=device)
            logits = self.model(batch).logits[0, :-1].float()
            return torch.nn.functional.cross_entropy(logits, batch[0, 1:], reduction="sum").item()

    def generate(self, prompt_ids):
        """The greedy answer's ids, without the stop token."""
        import torch

        device = next(self.model.parameters()).device
        with torch.inference_mode():
            batch = torch.tensor([prompt_ids], device=device)
            output = self.model.generate(batch, attention_mask=torch.ones_like(batch), do_sample=False,
                                         max_new_tokens=self.max_new_tokens, eos_token_id=self.stop_ids,
                                         pad_token_id=self.pad_id)[0, len(prompt_ids):].tolist()
        return [token for token in output if token not in self.stop_ids and token != self.pad_id]
