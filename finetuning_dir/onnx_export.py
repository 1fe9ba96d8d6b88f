"""Export the fine-tuned model for ONNX Runtime GenAI, its precision chosen by answer quality — the end of step 2's job.

    python finetuning_dir/onnx_export.py --model-dir outputs/jobs/<job>/model_output --eval-file data/test_data.jsonl

fine_tune.py calls export_onnx() right after it has written the MLflow model (unless --no-onnx-export), so
one registered model carries both runtimes. Each candidate is built with ONNX Runtime GenAI's model builder
(`python -m onnxruntime_genai.models.builder -i <hf folder> -o <out> -p int4|int8|fp32 -e cpu --extra_options
...`) in a temporary folder and compared with the unquantized model under transformers on the held-out chats,
by what users get from it (answer_quality.py, the same definitions as the job's summary):

    perplexity   per chat, teacher-forced: one forward pass per chat, cheap at any model size
    F1, ROUGE-L  of the greedy answers to the first questions against the reference answers

The rule: perplexity at most ONNX_MAX_PERPLEXITY_INCREASE above the unquantized model's, and F1 and ROUGE-L
at most ONNX_MAX_SCORE_LOSS below its own. Candidates go fastest first (on a CPU, decoding reads every
weight once per token, so fewer bytes per weight answer faster; docs/benchmarks.md); the first that keeps
the rule is copied into <model-dir>/onnx/ (whole or not at all) and the slower ones are not measured. The
cost is bounded whatever the model's size: a candidate generates answers only when its perplexity already
passes, and at most `questions` answers of `max_new_tokens` tokens (the unquantized reference runs on the
job's GPU when there is one). Every figure goes to <model-dir>/onnx_export.json; when no candidate passes,
no onnx/ folder is written and the model serves with transformers. score.py picks the runtime
(SERVING_RUNTIME in config.py).

Like fine_tune.py it runs inside the Azure job, so it imports nothing from the project but its neighbours.
"""

import argparse
import contextlib
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# Its neighbours, as the job imports them (Azure ML runs this folder as the job's code).
from answer_quality import AnswerQuality, TransformersScorer
from chat_data import read_chat_jsonl
from chat_stops import stop_token_ids

# Candidates, fastest first, each with the model builder's options (a name's first part is the builder's precision:
# "int4-b32" builds int4) (measured on a real pretrained model and at
# Phi-3-mini's dimensions: docs/benchmarks.md, "Choosing the export"; bench/export_candidates.py tries more).
# - int4: block_size 128 (one scale per 128 weights, not the default 32: fewer bytes per token, ~1.5x faster at
#   Phi-3-mini's dimensions); the output projection (lm_head) in int8 and the input embeddings unquantized,
#   because 4 bits there cost most of int4's damage (a tied model's one shared matrix is quantized to 4 bits
#   by default: shared_embeddings=false keeps them apart).
# - int8, fp32: the builder's defaults.
# accuracy_level 4 (int8 activations) is the builder's CPU default, written out so the export does not change
# when the default does.
CANDIDATES = {
    "int4": ["block_size=128", "accuracy_level=4", "shared_embeddings=false", "matmul_mixed_precision=last_matmul:int8"],
    "int8": ["accuracy_level=4", "shared_embeddings=false"],
    "fp32": ["shared_embeddings=false"],
}
ONNX_FOLDER = "onnx"  # inside the MLflow model's folder; score.py looks for it there
RECORD_FILE = "onnx_export.json"
DEFAULT_RULE = {"max_perplexity_increase": 0.05, "max_score_loss": 0.03}
QUESTIONS, MAX_NEW_TOKENS = 32, 64  # the answers each measured candidate generates (bounds the export's cost)


class ExportError(RuntimeError):
    """The export cannot be made as asked (a missing model, an onnx/ folder that is already there)."""


def export_onnx(model_dir, eval_file, max_perplexity_increase=DEFAULT_RULE["max_perplexity_increase"],
                max_score_loss=DEFAULT_RULE["max_score_loss"], questions=QUESTIONS, max_new_tokens=MAX_NEW_TOKENS,
                candidates=None, measure_all=False, log=print):
    """Build candidates fastest first, measure each against transformers, install the first that keeps the rule;
    return the record. measure_all: measure every candidate (benchmarks) instead of stopping at the first."""
    model_dir = Path(model_dir)
    target = model_dir / ONNX_FOLDER
    if target.exists():
        raise ExportError(f"{target} already exists: an export is never overwritten (remove it to export again)")
    started = time.perf_counter()
    chats = [record["messages"] for record in read_chat_jsonl(eval_file)]
    rule = {"max_perplexity_increase": max_perplexity_increase, "max_score_loss": max_score_loss}
    with tempfile.TemporaryDirectory(prefix="onnx-export-") as work:
        work = Path(work)
        hf_folder = plain_transformers_folder(model_dir, work / "hf")
        reference = Reference(hf_folder, chats, max_new_tokens)
        baseline = reference.measure(questions)
        log(f"  transformers  perplexity {baseline['perplexity']:.4f}, F1 {baseline['f1']:.3f}, ROUGE-L "
            f"{baseline['rouge_l']:.3f} ({baseline['seconds']:.0f} s, {reference.device})")
        results, chosen = {}, None
        for precision, options in (candidates or CANDIDATES).items():
            if chosen and not measure_all:
                results[precision] = {"builder_options": options, "measured": False,
                                      "why": f"{chosen}, faster, kept the rule"}
                continue
            folder = work / precision
            try:
                build_seconds = build(hf_folder, folder, precision.split("-")[0], options, work / "cache")
            except ExportError as error:  # one candidate the builder cannot make: the others still can be
                results[precision] = {"builder_options": options, "measured": False, "why": str(error).split("\n")[0]}
                log(f"  onnx {precision:<8} not built: {results[precision]['why']}")
                continue
            figures = measure_onnx(folder, reference, baseline, rule, questions, answer_always=measure_all)
            results[precision] = {"builder_options": options, "build_seconds": round(build_seconds, 2),
                                  "measured": True, **figures}
            log(f"  onnx {precision:<8} {describe(figures)}")
            if figures["passes"] and not chosen:
                chosen = precision
                install(folder, target)
    record = {"chosen": chosen, "rule": rule, "chats": len(chats), "questions": min(questions, len(chats)),
              "max_new_tokens": max_new_tokens, "transformers": {key: value for key, value in baseline.items()
                                                                 if key != "answers"},
              "candidates": results, "seconds": round(time.perf_counter() - started, 1)}
    write_json_atomically(model_dir / RECORD_FILE, record)
    return record


def passes(figures, rule):
    """The rule: perplexity no more than the allowed share above transformers', F1 and ROUGE-L no more than the
    allowed points below (a candidate whose perplexity already fails is not asked for answers)."""
    if figures["perplexity_increase"] > rule["max_perplexity_increase"]:
        return False
    return (figures.get("f1_loss") is not None and figures["f1_loss"] <= rule["max_score_loss"]
            and figures["rouge_l_loss"] <= rule["max_score_loss"])


def describe(figures):
    """A candidate's figures in one line."""
    line = f"perplexity {figures['perplexity']:.4f} ({figures['perplexity_increase']:+.2%})"
    if figures.get("f1") is not None:
        line += (f", F1 {figures['f1']:.3f} ({-figures['f1_loss']:+.3f}), ROUGE-L {figures['rouge_l']:.3f} "
                 f"({-figures['rouge_l_loss']:+.3f}), {figures['tokens_per_second']:,.0f} tokens/s")
    return line + (" - kept the rule" if figures["passes"] else " - outside the rule")


def plain_transformers_folder(model_dir, folder):
    """The MLflow model's weights and tokenizer side by side, as the builder reads a Hugging Face folder (links, not
    copies); a plain transformers folder (a base model) is read as it is."""
    weights, tokenizer = model_dir / "model", model_dir / "components" / "tokenizer"
    if not (weights / "config.json").is_file() and (model_dir / "config.json").is_file():
        weights = model_dir
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
    """Run ONNX Runtime GenAI's model builder in this process; return seconds. Its chatter (progress bars and the
    quantizer's log, whose ERROR lines such as "Gather only supports 4 bits quantization" report a layer kept
    unquantized, not a failure) is kept and shown only when the build fails."""
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    started, chatter = time.perf_counter(), io.StringIO()
    quantizer_log = logging.getLogger("onnxruntime.quantization")  # the parent of every quantizer module's logger
    handler = logging.StreamHandler(chatter)
    saved = quantizer_log.level, quantizer_log.propagate
    quantizer_log.setLevel(logging.WARNING)
    quantizer_log.addHandler(handler)
    quantizer_log.propagate = False  # not to the root logger's handlers (or Python's last-resort stderr)
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            extra = parse_extra_options(None, str(hf_folder), str(output), precision, "cpu", str(cache), list(options))
            create_model(None, str(hf_folder), str(output), precision, "cpu", str(cache), **extra)
    except Exception as error:
        raise ExportError(f"the model builder failed for {precision} ({type(error).__name__}: {error}); its output "
                          f"ended:\n{chatter.getvalue()[-2000:]}") from error
    finally:
        quantizer_log.removeHandler(handler)
        quantizer_log.setLevel(saved[0])
        quantizer_log.propagate = saved[1]
    return time.perf_counter() - started


class Reference:
    """The fine-tuned model under transformers (fp32; on the GPU when there is one): what every candidate must keep."""

    def __init__(self, hf_folder, chats, max_new_tokens):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(hf_folder)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).to(self.device).eval()
        self.stop_ids = stop_token_ids(self.tokenizer, self.model.generation_config.eos_token_id)
        self.max_new_tokens = max_new_tokens
        self.quality = AnswerQuality(chats, self.tokenizer)

    def measure(self, questions):
        """Perplexity per chat, and the greedy answers' F1 and ROUGE-L: the figures to keep."""
        started = time.perf_counter()
        scorer = TransformersScorer(self.model, self.stop_ids, self.tokenizer.pad_token_id or self.stop_ids[0],
                                    self.max_new_tokens)
        answers = self.quality.answers(scorer.generate, questions)
        figures = {"perplexity": round(self.quality.perplexity(scorer.nll), 6), "f1": round(answers["f1"], 4),
                   "rouge_l": round(answers["rouge_l"], 4), "answers": answers["answers"]}
        self.model = None  # its memory goes back before the candidates load
        return {**figures, "seconds": round(time.perf_counter() - started, 1)}


def prefill_logits(model, ids):
    """ONNX Runtime GenAI's logits at every position of `ids` (one prefill, a fresh generator)."""
    import numpy as np
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 1)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray(ids, dtype=np.int32))
    return generator.get_output("logits")[0]


def measure_onnx(folder, reference, baseline, rule, questions, answer_always=False):
    """One candidate: perplexity per chat; when it passes (or answer_always), the answers' F1 and ROUGE-L and the
    decode speed."""
    import numpy as np
    import onnxruntime_genai as og

    og.disable_telemetry_events()
    model = og.Model(str(folder))

    def nll(ids):
        """Summed NLL of tokens 1..n-1 from one prefill of the whole chat."""
        logits = prefill_logits(model, ids)[:-1].astype(np.float64)  # predictions of tokens 1..n-1
        log_probs = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        return float(-log_probs[np.arange(len(ids) - 1), ids[1:]].sum())

    perplexity = reference.quality.perplexity(nll)
    figures = {"perplexity": round(perplexity, 6),
               "perplexity_increase": round(perplexity / baseline["perplexity"] - 1, 6)}
    if figures["perplexity_increase"] <= rule["max_perplexity_increase"] or answer_always:
        seconds = [0.0]

        def generate(prompt_ids):
            started = time.perf_counter()
            answer = greedy_onnx(og, model, prompt_ids, reference.max_new_tokens, reference.stop_ids)
            seconds[0] += time.perf_counter() - started
            return answer

        answers = reference.quality.answers(generate, questions)
        identical = sum(a == b for a, b in zip(answers["answers"], baseline["answers"]))
        figures.update({"f1": round(answers["f1"], 4), "f1_loss": round(baseline["f1"] - answers["f1"], 4),
                        "rouge_l": round(answers["rouge_l"], 4),
                        "rouge_l_loss": round(baseline["rouge_l"] - answers["rouge_l"], 4),
                        "identical_answers": identical, "questions": len(answers["answers"]),
                        "tokens_per_second": round(answers["new_tokens"] / seconds[0], 1) if seconds[0] else 0.0})
    figures["passes"] = passes(figures, rule)
    return figures


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
    rule = record["rule"]
    if not record["chosen"]:
        return (f"no precision kept the answers (perplexity +{rule['max_perplexity_increase']:.0%}, F1/ROUGE-L "
                f"-{rule['max_score_loss']:.2f} at most): score.py serves with transformers "
                f"(exported in {record['seconds']:.0f} s)")
    figures = record["candidates"][record["chosen"]]
    return (f"{record['chosen']} (perplexity {figures['perplexity_increase']:+.2%}, F1 {-figures['f1_loss']:+.3f}, "
            f"ROUGE-L {-figures['rouge_l_loss']:+.3f} against the unquantized model; "
            f"{figures['tokens_per_second']:,.0f} tokens/s; exported in {record['seconds']:.0f} s)")


def parse_args(argv=None):
    """The export on its own, for a model fine-tuned with --no-onnx-export (or a plain transformers folder)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model-dir", required=True, type=Path, help="the MLflow model fine_tune.py wrote")
    parser.add_argument("--eval-file", required=True, type=Path, help="held-out JSONL chats (ultrachat schema)")
    parser.add_argument("--max-perplexity-increase", type=float, default=DEFAULT_RULE["max_perplexity_increase"],
                        help="allowed perplexity increase per chat (0.05: 5%%)")
    parser.add_argument("--max-score-loss", type=float, default=DEFAULT_RULE["max_score_loss"],
                        help="allowed loss of F1 and of ROUGE-L (0.03: 3 points of 100)")
    parser.add_argument("--questions", type=int, default=QUESTIONS, help="held-out first questions each candidate answers")
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help="the longest answer generated")
    parser.add_argument("--measure-all", action="store_true", help="measure every candidate, not only up to the first that passes")
    return parser.parse_args(argv)


def main(argv=None):
    """Export, print the choice."""
    args = parse_args(argv)
    try:
        record = export_onnx(args.model_dir, args.eval_file, args.max_perplexity_increase, args.max_score_loss,
                             args.questions, args.max_new_tokens, measure_all=args.measure_all)
    except (ExportError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"ONNX export: {summary_line(record)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
