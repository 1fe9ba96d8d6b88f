"""Export the fine-tuned model for ONNX Runtime GenAI, its precision chosen by measurement — the end of step 2's job.

    python finetuning_dir/onnx_export.py --model-dir outputs/jobs/<job>/model_output --eval-file data/test_data.jsonl

fine_tune.py calls export_onnx() right after it has written the MLflow model (unless --no-onnx-export), so
one registered model carries both runtimes. Each candidate precision is built with ONNX Runtime GenAI's model
builder (`python -m onnxruntime_genai.models.builder -i <hf folder> -o <out> -p int4|int8|fp32 -e cpu`) in a
temporary folder and measured against the MLflow model under transformers on held-out chats:

    identical    the share of greedy answers (first question of each chat) that are the very same text
    perplexity   on the whole held-out chats, and its increase over transformers'

The smallest candidate that keeps both within the rule is copied into <model-dir>/onnx/ (whole or not at
all): on a CPU, decoding reads every weight once per token, so fewer bytes per weight answer faster
(docs/benchmarks.md). The figures of every candidate go to <model-dir>/onnx_export.json. When none passes,
no onnx/ folder is written and the model serves with transformers. score.py picks the runtime
(SERVING_RUNTIME in config.py).

Like fine_tune.py it runs inside the Azure job, so it imports nothing from the project but chat_data.
"""

import argparse
import contextlib
import io
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from chat_data import read_chat_jsonl  # its neighbour, as the job imports it (Azure ML runs this folder)

# Candidates, smallest weights first, each with the model builder's options. int4 with block_size 128: one
# scale per 128 weights instead of 32 reads fewer bytes per token and decoded Phi-3-mini's layers ~1.5x faster
# than the builder's default (bench/decode_runtimes.py, docs/benchmarks.md); accuracy_level 4 (int8
# activations) is the builder's CPU default, written out so the export does not change when the default does.
CANDIDATES = {
    "int4": ["block_size=128", "accuracy_level=4"],
    "int8": ["accuracy_level=4"],
    "fp32": [],
}
ONNX_FOLDER = "onnx"  # inside the MLflow model's folder; score.py looks for it there
RECORD_FILE = "onnx_export.json"
MAX_PERPLEXITY_TOKENS = 1024  # per held-out chat; longer chats are cut (the sample chats are ~100 tokens)


class ExportError(RuntimeError):
    """The export cannot be made as asked (a missing model, an onnx/ folder that is already there)."""


def export_onnx(model_dir, eval_file, min_identical=1.0, max_perplexity_increase=0.01, questions=40,
                max_new_tokens=128, candidates=None, log=print):
    """Build each candidate, measure it against transformers, install the smallest that passes; return the record."""
    model_dir = Path(model_dir)
    target = model_dir / ONNX_FOLDER
    if target.exists():
        raise ExportError(f"{target} already exists: an export is never overwritten (remove it to export again)")
    started = time.perf_counter()
    chats = [record["messages"] for record in read_chat_jsonl(eval_file)][:questions]
    rule = {"min_identical": min_identical, "max_perplexity_increase": max_perplexity_increase}
    with tempfile.TemporaryDirectory(prefix="onnx-export-") as work:
        work = Path(work)
        hf_folder = plain_transformers_folder(model_dir, work / "hf")
        reference = Reference(hf_folder, max_new_tokens)
        baseline = reference.measure(chats)
        results = {}
        for precision, options in (candidates or CANDIDATES).items():
            folder = work / precision
            build_seconds = build(hf_folder, folder, precision, options, work / "cache")
            figures = measure_onnx(folder, reference, chats, baseline)
            results[precision] = {"builder_options": options, "build_seconds": round(build_seconds, 2), **figures,
                                  "passes": passes(figures, rule)}
            log(f"  onnx {precision:<5} identical {figures['identical']}/{figures['questions']}, perplexity "
                f"{figures['perplexity']:.4f} ({figures['perplexity_increase']:+.2%}), "
                f"{figures['tokens_per_second']:,.0f} tokens/s")
        chosen = next((precision for precision, result in results.items() if result["passes"]), None)
        if chosen:
            install(work / chosen, target)
    record = {"chosen": chosen, "rule": rule, "questions": len(chats), "max_new_tokens": max_new_tokens,
              "transformers": baseline["summary"], "candidates": results,
              "seconds": round(time.perf_counter() - started, 1)}
    write_json_atomically(model_dir / RECORD_FILE, record)
    return record


def passes(figures, rule):
    """The rule: enough identical answers and a perplexity no more than the allowed share above transformers'."""
    return (figures["identical"] >= math.ceil(rule["min_identical"] * figures["questions"] - 1e-9)
            and figures["perplexity_increase"] <= rule["max_perplexity_increase"])


def plain_transformers_folder(model_dir, folder):
    """The MLflow model's weights and tokenizer side by side, as the builder reads a Hugging Face folder (links, not copies)."""
    weights, tokenizer = model_dir / "model", model_dir / "components" / "tokenizer"
    if not (weights / "config.json").is_file():
        raise ExportError(f"no model/config.json in {model_dir}: is it an MLflow model from fine_tune.py?")
    folder.mkdir(parents=True)
    for source in [*weights.iterdir(), *(tokenizer.iterdir() if tokenizer.is_dir() else [])]:
        if source.name == "config.json":
            continue
        try:
            os.symlink(source.resolve(), folder / source.name)
        except OSError:  # Windows without the right to make links
            shutil.copy2(source, folder / source.name)
    config = json.loads((weights / "config.json").read_text(encoding="utf-8"))
    rope = config.get("rope_parameters")
    # transformers 5 saves Phi-3.5-mini's LongRoPE as rope_parameters {"rope_type": "longrope", ...}; the builder
    # (0.18.0, builders/phi.py) also reads the older key "type" there and fails without it (KeyError: 'type').
    if isinstance(rope, dict) and "rope_type" in rope and "type" not in rope:
        config["rope_parameters"] = {**rope, "type": rope["rope_type"]}
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


def build(hf_folder, output, precision, options, cache):
    """Run ONNX Runtime GenAI's model builder in this process (its chatter kept for errors only); return seconds."""
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    started, chatter = time.perf_counter(), io.StringIO()
    quantizer_log = logging.getLogger("onnxruntime.quantization")
    level, quantizer_log.level = quantizer_log.level, logging.WARNING
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            extra = parse_extra_options(None, str(hf_folder), str(output), precision, "cpu", str(cache), list(options))
            create_model(None, str(hf_folder), str(output), precision, "cpu", str(cache), **extra)
    except Exception as error:
        raise ExportError(f"the model builder failed for {precision} ({type(error).__name__}: {error}); its output "
                          f"ended:\n{chatter.getvalue()[-2000:]}") from error
    finally:
        quantizer_log.level = level
    return time.perf_counter() - started


class Reference:
    """The fine-tuned model under transformers (fp32, CPU): the answers and perplexity every candidate must keep."""

    def __init__(self, hf_folder, max_new_tokens):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(hf_folder)
        self.model = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval()
        self.max_new_tokens = max_new_tokens
        self.stop_ids = stop_token_ids(self.tokenizer, self.model.generation_config.eos_token_id)

    def prompt_ids(self, chat):
        """The token ids of the chat's first question, formatted as score.py formats it."""
        first_question = chat[:next(i for i, message in enumerate(chat) if message["role"] == "user") + 1]
        ids = self.tokenizer.apply_chat_template(first_question, add_generation_prompt=True, return_dict=True)
        return list(ids["input_ids"])

    def chat_ids(self, chat):
        """The token ids of the whole chat (for perplexity), cut to MAX_PERPLEXITY_TOKENS."""
        return list(self.tokenizer.apply_chat_template(chat, return_dict=True)["input_ids"])[:MAX_PERPLEXITY_TOKENS]

    def text(self, token_ids):
        """An answer's text, as score.py returns it."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True).strip()

    def measure(self, chats):
        """Greedy answers and the summed negative log-likelihood under transformers."""
        import torch

        answers, nll, tokens = [], 0.0, 0
        with torch.inference_mode():
            for chat in chats:
                ids = torch.tensor([self.prompt_ids(chat)])
                output = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                             max_new_tokens=self.max_new_tokens, eos_token_id=self.stop_ids,
                                             pad_token_id=self.tokenizer.pad_token_id or self.stop_ids[0])
                answers.append(self.text(output[0, ids.shape[1]:]))
                full = torch.tensor([self.chat_ids(chat)])
                loss = self.model(full, labels=full).loss.item()  # mean over the chat's len - 1 predictions
                nll, tokens = nll + loss * (full.shape[1] - 1), tokens + full.shape[1] - 1
        perplexity = math.exp(nll / tokens)
        return {"answers": answers, "perplexity": perplexity,
                "summary": {"perplexity": round(perplexity, 6), "tokens": tokens}}


def stop_token_ids(tokenizer, eos_token_id):
    """The model's end-of-text ids plus <|end|> (the end of a turn), as score.py stops at them."""
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    if isinstance(end, int) and end != tokenizer.unk_token_id and end not in ids:
        ids.append(end)
    return ids


def measure_onnx(folder, reference, chats, baseline):
    """One candidate's identical answers, perplexity and decode speed, on the same chats."""
    import numpy as np
    import onnxruntime_genai as og

    og.disable_telemetry_events()
    model = og.Model(str(folder))
    identical, new_tokens, seconds, nll, tokens = 0, 0, 0.0, 0.0, 0
    for chat, expected in zip(chats, baseline["answers"]):
        started = time.perf_counter()
        answer_ids = greedy_onnx(og, model, reference.prompt_ids(chat), reference.max_new_tokens, reference.stop_ids)
        seconds += time.perf_counter() - started
        new_tokens += len(answer_ids)
        identical += reference.text(answer_ids) == expected
        ids = reference.chat_ids(chat)
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + 1)
        generator = og.Generator(model, params)
        generator.append_tokens(np.array(ids, dtype=np.int32))
        logits = generator.get_output("logits")[0, :-1].astype(np.float64)  # predictions of tokens 1..n-1
        log_probs = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        nll -= log_probs[np.arange(len(ids) - 1), ids[1:]].sum()
        tokens += len(ids) - 1
    perplexity = math.exp(nll / tokens)
    return {"identical": identical, "questions": len(chats), "perplexity": round(perplexity, 6),
            "perplexity_increase": round(perplexity / baseline["perplexity"] - 1, 6),
            "tokens_per_second": round(new_tokens / seconds, 1) if seconds else 0.0}


def greedy_onnx(og, model, prompt_ids, max_new_tokens, stop_ids):
    """Greedy decoding with ONNX Runtime GenAI: the new token ids, without the stop token."""
    import numpy as np

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + max_new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(prompt_ids, dtype=np.int32))
    answer = []
    while not generator.is_done() and len(answer) < max_new_tokens:
        generator.generate_next_token()
        token = int(generator.get_next_tokens()[0])
        if token in stop_ids:
            break
        answer.append(token)
    return answer


def install(candidate, target):
    """Copy the chosen export beside the MLflow model under a temporary name, then rename it: whole or not at all."""
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        shutil.copytree(candidate, partial)
        os.replace(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def write_json_atomically(path, data):
    """Write JSON to a temporary file beside `path`, then rename it into place."""
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    partial.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, path)


def summary_line(record):
    """One line for the job's summary: the choice and why."""
    if not record["chosen"]:
        return (f"no precision kept the answers ({record['rule']['min_identical']:.0%} identical, perplexity "
                f"+{record['rule']['max_perplexity_increase']:.0%} at most): score.py serves with transformers")
    figures = record["candidates"][record["chosen"]]
    return (f"{record['chosen']} ({figures['identical']}/{figures['questions']} identical answers, perplexity "
            f"{figures['perplexity_increase']:+.2%}, {figures['tokens_per_second']:,.0f} tokens/s; "
            f"exported in {record['seconds']:.0f} s)")


def parse_args(argv=None):
    """The export on its own, for a model fine-tuned with --no-onnx-export."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model-dir", required=True, type=Path, help="the MLflow model fine_tune.py wrote")
    parser.add_argument("--eval-file", required=True, type=Path, help="held-out JSONL chats (ultrachat schema)")
    parser.add_argument("--min-identical", type=float, default=1.0, help="share of greedy answers that must be identical")
    parser.add_argument("--max-perplexity-increase", type=float, default=0.01, help="allowed perplexity increase (0.01: 1%%)")
    parser.add_argument("--questions", type=int, default=40, help="held-out chats to compare on")
    return parser.parse_args(argv)


def main(argv=None):
    """Export, print the choice."""
    args = parse_args(argv)
    try:
        record = export_onnx(args.model_dir, args.eval_file, args.min_identical, args.max_perplexity_increase,
                             args.questions)
    except (ExportError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"ONNX export: {summary_line(record)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
