"""Decode speed at Phi-3-mini's dimensions: transformers fp32/bf16, ONNX Runtime GenAI per precision, llama.cpp.

    python bench/decode_runtimes.py                       # 4- and 8-layer slices, ~12 min (+7-10 the first time)
    python bench/decode_runtimes.py --layers 2,4 --json decode.json
    python bench/decode_runtimes.py --model models/smollm2-135m-instruct   # a real model: speed, quality (~5 min)

Nothing is downloaded: each slice is a `Phi3ForCausalLM` with Phi-3-mini's layer dimensions (hidden 3072,
MLP 8192, 32 heads, vocabulary 32064) and random weights, saved to a temporary folder and exported with ONNX
Runtime GenAI's model builder exactly as finetuning_dir/onnx_export.py does (the same builder, the same
options per candidate) plus the builder's defaults for int4. Random weights cost the same FLOPs and bytes as
trained ones.

For each runtime and slice: a 64-token prompt (random ids), then --new-tokens tokens, greedy, every one
generated (no early stop); decode time = total minus the prefill and first token, per token. The per-token
time of the full 32-layer model is extrapolated from the two slices (time = a + b x layers: the embedding and
LM head are a, each layer adds b). Weight bytes read per token are extrapolated the same way, from the
parameters (transformers), the export's initializers (ONNX) or the GGUF tensors (llama.cpp), less the input
embedding table (one row a token; with tied embeddings the table is the output layer too and counts whole).

llama.cpp, the CPU peer (bench/llama_cpp.py: built once from PyPI's llama-cpp-python sdist), decodes the very
same slice folders: converted to GGUF f32 by its own converter, quantized to Q8_0 and Q4_0, timed by llama-bench
with the same prompt length (64 tokens in the context before decoding), new tokens, repetitions and threads (the
machine's cores), and extrapolated the same way; its bytes per token come from the GGUF tensors. Phi-3's
converter reads a SentencePiece tokenizer.model, so each slice also gets a small one (`sentencepiece`).

Each row waits until other processes leave the CPU idle and is measured again (3 tries) when they took more than
10 % of it meanwhile; the progress lines say how much they took (llama.cpp's threads spin at every step of a
token, and lose far more than the others' to a neighbour that takes a core).

The bound: a CPU decoding one sequence reads every weight once per token, so tokens/s can be no more than
memory bandwidth / bytes per token. The bandwidth is measured here (numpy copy of a 1 GiB array: bytes read
+ written per second, best of 5). Each runtime's share of its own bound shows how much is left to gain.

--model FOLDER measures a real transformers model whole (no extrapolation): transformers fp32, the export's ONNX
candidates and llama.cpp's formats, each for speed as above and for quality on the same tokens. The held-out chats
(--eval-file, default data/test_data.jsonl from `python download_dataset.py`), each rendered with the model's chat
template, are one token stream cut into --context-token chunks (the first token of each set to BOS); every chunk
is evaluated from scratch and the second half of its tokens is scored, as llama-perplexity scores. Perplexity =
exp(mean negative log-likelihood of the scored tokens); KL divergence (mean, nats) and "same top token" (the share
of scored positions whose most likely next token is the reference's) compare each runtime with transformers fp32.
llama.cpp's figures come from llama-perplexity --kl-divergence on a file of these token ids and transformers' log-
probabilities; the others' from their logits, computed as llama-perplexity computes them (bench/llama_cpp.py).
"""

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_DIR))
sys.path.insert(1, str(PROJECT_DIR / "finetuning_dir"))  # the job's code folder: its modules import each other

import onnx_export  # noqa: E402 - the export's own builder call and candidates
from bench import llama_cpp  # noqa: E402 - the CPU peer's build, conversion, llama-bench and llama-perplexity

PHI3_MINI = {"hidden_size": 3072, "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 32,
             "vocab_size": 32064}
FULL_LAYERS = 32
PROMPT_TOKENS = 64
# name: (runtime, precision or dtype, builder options)
RUNTIMES = {
    "transformers fp32": ("transformers", "float32", None),
    "transformers bf16": ("transformers", "bfloat16", None),
    "ORT-GenAI int4 (builder defaults)": ("onnx", "int4", []),
    **{f"ORT-GenAI {precision} (the export's: {' '.join(options) or 'defaults'})": ("onnx", precision, options)
       for precision, options in onnx_export.CANDIDATES.items()},
    # llama.cpp's Q4_0 in the builder's terms: blocks of 32 and the output layer at 8 bits (llama-quantize keeps it
    # at Q6_K, or Q8_0 where rows do not split into 256s); the export's int4 but for its blocks of 128.
    # shared_embeddings=false: with tied embeddings the builder (0.18) writes an invalid model for an 8-bit lm_head
    # unless the lookup gets its own (fp32) table.
    "ORT-GenAI int4 like Q4_0 (block 32; lm_head int8)": (
        "onnx", "int4", ["block_size=32", "accuracy_level=4", "matmul_mixed_precision=last_matmul:int8",
                         "shared_embeddings=false"]),
    # The export's int8 in blocks of 128 (the builder's default is 32): one fp32 scale per 128 weights instead of 32,
    # 8.25 bits a weight instead of 9.0 (Q8_0: 8.5), and a quarter of the scale loads.
    "ORT-GenAI int8 (block 128)": ("onnx", "int8", ["block_size=128", "accuracy_level=4", "shared_embeddings=false"]),
    **{f"llama.cpp {kind}": ("llama.cpp", kind, None) for kind in llama_cpp.FORMATS},
}
# --model's default: the quality reference (transformers fp32), the ONNX exports, llama.cpp's formats
MODEL_RUNTIMES = [name for name in RUNTIMES if name not in ("transformers bf16", "ORT-GenAI int4 (builder defaults)")]
REFERENCE = "transformers fp32"
# The two cores are shared: a row is measured when other processes leave the CPU idle, and again (3 tries in all)
# when they took more than 10 % of it meanwhile (llama.cpp's spinning threads lose most to a busy neighbour).
QUIET_SHARE = 0.10
ROW_ATTEMPTS = 3
QUIET_WAIT_S = 900  # the longest wait for quiet before a row runs anyway (its share of others is printed)
SLICE_TOKENIZER_VOCABULARY = 1000  # the converter pads it to 32064 entries; the ids decoded are random anyway


def parse_args(argv=None):
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--layers", default="4,8", help="two slice depths to extrapolate from")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per runtime and slice (the fastest counts)")
    parser.add_argument("--runtimes", default=None,
                        help=f"comma-separated names from: {', '.join(RUNTIMES)} (default: all of them; with --model: "
                             f"{', '.join(MODEL_RUNTIMES)})")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="llama.cpp's threads (ONNX Runtime and torch use one a core by themselves)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    parser.add_argument("--model", type=Path, default=None,
                        help="a transformers model folder to measure whole, speed and quality (instead of the slices)")
    parser.add_argument("--eval-file", type=Path, default=PROJECT_DIR / "data" / "test_data.jsonl",
                        help="held-out JSONL chats for --model's quality figures")
    parser.add_argument("--context", type=int, default=512, help="--model: tokens per perplexity chunk (half scored)")
    args = parser.parse_args(argv)
    args.layers = [int(n) for n in args.layers.split(",")]
    default = MODEL_RUNTIMES if args.model else list(RUNTIMES)
    args.runtimes = [name.strip() for name in (args.runtimes or ",".join(default)).split(",") if name.strip()]
    if len(args.layers) != 2 or args.layers[0] >= args.layers[1]:
        parser.error("--layers takes two depths, the smaller first (e.g. 4,8)")
    unknown = [name for name in args.runtimes if name not in RUNTIMES]
    if unknown:
        parser.error(f"unknown runtime(s) {unknown}; choose from: {', '.join(RUNTIMES)}")
    if args.model:
        if not (args.model / "config.json").is_file():
            parser.error(f"--model {args.model}: no config.json there (python -m stand_ins.pretrained_model makes one)")
        if not args.eval_file.is_file():
            parser.error(f"--eval-file {args.eval_file} not found: run `python download_dataset.py` first (it writes "
                         "the held-out chats to data/test_data.jsonl)")
        if REFERENCE not in args.runtimes:
            args.runtimes.insert(0, REFERENCE)  # the quality figures are measured against it
    return args


def memory_bandwidth_gbs(size_bytes=1 << 30, repeats=5):
    """Bytes read + written per second by a numpy copy of a large array (GB/s, best of `repeats`)."""
    import numpy as np

    source = np.ones(size_bytes // 8)
    target = np.empty_like(source)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - started)
    return 2 * source.nbytes / best / 1e9


def build_slice(layers, folder, sentencepiece_tokenizer=False):
    """A Phi-3-mini-shaped model with `layers` layers and random weights, saved with a tokenizer the builder copies
    (and, for llama.cpp's converter, a SentencePiece tokenizer.model as Phi-3's own)."""
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    from stand_ins.tiny_model import ensure_tiny_phi3

    torch.manual_seed(0)
    config = Phi3Config(**PHI3_MINI, num_hidden_layers=layers, max_position_embeddings=4096,
                        original_max_position_embeddings=4096, tie_word_embeddings=False,
                        bos_token_id=1, eos_token_id=PHI3_MINI["vocab_size"] - 1, pad_token_id=0)
    model = Phi3ForCausalLM(config)
    model.generation_config.eos_token_id = PHI3_MINI["vocab_size"] - 1
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        source = Path(ensure_tiny_phi3()) / name
        if source.is_file():
            shutil.copy2(source, folder / name)
    if sentencepiece_tokenizer:
        write_sentencepiece_tokenizer(folder / "tokenizer.model")
    return model


def write_sentencepiece_tokenizer(path):
    """A small SentencePiece model trained on the sample chats: what llama.cpp's Phi-3 converter reads."""
    import sentencepiece

    from config import SAMPLE_DATASET_PATH

    records = [json.loads(line) for line in Path(SAMPLE_DATASET_PATH).read_text(encoding="utf-8").splitlines() if line]
    sentences = [message["content"] for record in records for message in record["messages"]]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model,
                                             vocab_size=SLICE_TOKENIZER_VOCABULARY, hard_vocab_limit=False,
                                             byte_fallback=True, minloglevel=2)
    Path(path).write_bytes(model.getvalue())


def prompt_ids(vocab_size=PHI3_MINI["vocab_size"]):
    """The same 64 random token ids for every runtime."""
    import numpy as np

    return np.random.default_rng(0).integers(10, vocab_size - 10, PROMPT_TOKENS).tolist()


def transformers_row(model, precision, args):
    """A row for guarded(): the model's decode timed with transformers, and the weight bytes it reads per token."""
    def row():
        per_token, prefill = time_transformers(model, args.new_tokens, args.repeats)
        return {"seconds_per_token": per_token, "prefill_seconds": prefill,
                "weight_bytes": weight_bytes_per_token("transformers", model, precision)}
    return row


def time_transformers(model, new_tokens, repeats):
    """(seconds per decoded token, prefill seconds) with transformers' generate(), greedy, no early stop."""
    import torch

    ids = torch.tensor([prompt_ids(model.config.vocab_size)])
    options = {"attention_mask": torch.ones_like(ids), "do_sample": False, "pad_token_id": 0}

    def run(tokens):
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **options)
        return time.perf_counter() - started

    run(2)  # warm-up
    best_first, best_all = min(run(1) for _ in range(repeats)), min(run(new_tokens + 1) for _ in range(repeats))
    return (best_all - best_first) / new_tokens, best_first


def time_onnx(folder, new_tokens, repeats, vocab_size=PHI3_MINI["vocab_size"]):
    """(seconds per decoded token, prefill seconds) with ONNX Runtime GenAI, greedy, no early stop."""
    import numpy as np
    import onnxruntime_genai as og

    og.disable_telemetry_events()
    model = og.Model(str(folder))
    ids = np.array(prompt_ids(vocab_size), dtype=np.int32)

    def run():
        params = og.GeneratorParams(model)
        length = PROMPT_TOKENS + new_tokens + 1
        params.set_search_options(max_length=length, min_length=length, do_sample=False)
        generator = og.Generator(model, params)
        started = time.perf_counter()
        generator.append_tokens(ids)
        generator.generate_next_token()
        first = time.perf_counter()
        for _ in range(new_tokens):
            generator.generate_next_token()
        return (time.perf_counter() - first) / new_tokens, first - started

    run()  # warm-up
    return min(run() for _ in range(repeats))


def onnx_logits(folder):
    """A function: token ids -> ONNX Runtime GenAI's logits at every position (one fresh generator a call)."""
    import onnxruntime_genai as og

    og.disable_telemetry_events()
    model = og.Model(str(folder))
    return lambda ids: onnx_export.prefill_logits(model, ids)  # the export's own prefill


def weight_bytes_per_token(runtime, model_or_folder, dtype):
    """Bytes of weights one decoded token reads: all but the input embedding table (one row of it is read), unless
    the table is also the output layer (tied embeddings): then it is read whole."""
    if runtime == "transformers":
        model, element = model_or_folder, 2 if dtype == "bfloat16" else 4
        table = model.get_input_embeddings().weight
        tied = table is model.get_output_embeddings().weight
        return (sum(p.numel() for p in model.parameters()) - (0 if tied else table.numel())) * element
    if runtime == "llama.cpp":
        return llama_cpp.weight_bytes_per_token(model_or_folder)
    return onnx_weight_bytes_per_token(model_or_folder)


def onnx_weight_bytes_per_token(folder):
    """The same for an ONNX export: every initializer but those only a Gather reads (the embedding table, fp32 for
    the CPU); with tied embeddings the builder has the lookup read the (quantized) output layer, which counts."""
    import onnx

    model = onnx.load(str(Path(folder) / "model.onnx"), load_external_data=False)
    readers = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    total = 0
    for tensor in model.graph.initializer:
        if readers.get(tensor.name, set()) <= {"Gather"}:
            continue
        external = {entry.key: entry.value for entry in tensor.external_data}
        total += int(external["length"]) if "length" in external else onnx.numpy_helper.to_array(tensor).nbytes
    return total


def extrapolate(values_by_layers, layers=FULL_LAYERS):
    """a + b x layers through two (layers, value) points."""
    (l1, v1), (l2, v2) = sorted(values_by_layers.items())
    slope = (v2 - v1) / (l2 - l1)
    return v1 + slope * (layers - l1)


def onnx_row(folder, export, precision, options, new_tokens, repeats, kl_base=None):
    """Build one ONNX export and time it, and with a KL base file score it too (run in a child process: the
    builder's memory goes with it)."""
    if not export.exists():
        with contextlib.redirect_stdout(io.StringIO()):
            onnx_export.build(folder, export, precision, options, export.parent / "cache")
    vocab = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
    per_token, prefill = time_onnx(export, new_tokens, repeats, vocab)
    figures = {"seconds_per_token": per_token, "prefill_seconds": prefill,
               "weight_bytes": weight_bytes_per_token("onnx", export, precision)}
    if kl_base:
        figures["quality"] = llama_cpp.kl_statistics(kl_base, onnx_logits(export))
    shutil.rmtree(export)
    return figures


def in_child(function, *arguments):
    """function(*arguments) in a fresh process: a runtime's memory and threads go with it."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as child:
        return child.submit(function, *arguments).result()


def llama_cpp_row(path, args, kl_base=None):
    """One GGUF file timed by llama-bench (and scored by llama-perplexity)."""
    bench = llama_cpp.bench(path, args.threads, args.new_tokens, args.repeats)
    figures = {"seconds_per_token": 1 / bench["decode_tokens_per_second"],
               "prefill_seconds": PROMPT_TOKENS / bench["prefill_tokens_per_second"],
               "weight_bytes": llama_cpp.weight_bytes_per_token(path), "llama_bench": bench}
    if kl_base:
        figures["quality"] = llama_cpp.kl_divergence(path, kl_base, args.threads)
    return figures


def busy_seconds():
    """CPU seconds so far: of every process on the machine, and of this one with its finished children."""
    import psutil

    machine, own = psutil.cpu_times(), os.times()
    return (machine.user + machine.nice + machine.system + getattr(machine, "irq", 0) + getattr(machine, "softirq", 0),
            own.user + own.system + own.children_user + own.children_system)


def wait_for_quiet():
    """Wait until the machine is idle (other processes under QUIET_SHARE of its CPU), at most QUIET_WAIT_S."""
    import psutil

    deadline = time.monotonic() + QUIET_WAIT_S
    while psutil.cpu_percent(interval=5) / 100 > QUIET_SHARE and time.monotonic() < deadline:
        pass


def guarded(where, name, row):
    """row() on an otherwise idle machine: waits for quiet first, and measures again (ROW_ATTEMPTS in all) when other
    processes took more than QUIET_SHARE of the CPU meanwhile; returns the least disturbed try's figures, with the
    share the others took."""
    tries = []
    for attempt in range(1, ROW_ATTEMPTS + 1):
        wait_for_quiet()
        (machine, own), started = busy_seconds(), time.perf_counter()
        figures = row()
        (machine_after, own_after), seconds = busy_seconds(), time.perf_counter() - started
        share = max(0.0, (machine_after - machine) - (own_after - own)) / (seconds * (os.cpu_count() or 1))
        tries.append({**figures, "others_share": share, "attempts": attempt})
        print(f"  {where}  {name:<58} {1 / figures['seconds_per_token']:7.2f} tokens/s  ({seconds:.0f} s, other "
              f"processes {share:.0%} of the CPU)", flush=True)
        if share <= QUIET_SHARE:
            break
    return min(tries, key=lambda figures: figures["others_share"])


def measure(args, work):
    """Every runtime on both slices; returns {name: {layers: figures}}."""
    import gc

    import torch

    results = {name: {} for name in args.runtimes}
    llama_names = [name for name in args.runtimes if RUNTIMES[name][0] == "llama.cpp"]
    for layers in args.layers:
        where, folder = f"{layers} layers", work / f"slice-{layers}"
        model, typed = build_slice(layers, folder, sentencepiece_tokenizer=bool(llama_names)), None
        for name in args.runtimes:  # transformers first, while the model is in memory
            runtime, precision, options = RUNTIMES[name]
            if runtime != "transformers":
                continue
            typed = model.to(getattr(torch, precision)).eval()
            results[name][layers] = guarded(where, name, transformers_row(typed, precision, args))
        del model, typed
        gc.collect()
        for name in args.runtimes:
            runtime, precision, options = RUNTIMES[name]
            if runtime == "onnx":
                export = work / f"{layers}-onnx-{list(RUNTIMES).index(name)}"
                results[name][layers] = guarded(where, name, lambda: in_child(
                    onnx_row, folder, export, precision, options, args.new_tokens, args.repeats))
        if llama_names:
            files = llama_cpp.gguf_files(folder, work / f"gguf-{layers}", [RUNTIMES[n][1] for n in llama_names],
                                         threads=args.threads)
            for name in llama_names:
                path = files[RUNTIMES[name][1]]
                results[name][layers] = guarded(where, name, lambda: llama_cpp_row(path, args))
            shutil.rmtree(work / f"gguf-{layers}")
        shutil.rmtree(folder)
    return results


def held_out_chunks(tokenizer, eval_file, context):
    """The held-out chats, each rendered with the model's chat template, as one token stream cut into chunks of
    `context` tokens (the rest dropped), each starting with BOS (llama-perplexity puts it there when the model
    adds one; put here always, every runtime sees the same ids)."""
    import numpy as np
    from chat_data import read_chat_jsonl

    ids = [token for record in read_chat_jsonl(eval_file)
           for token in tokenizer.apply_chat_template(record["messages"], return_dict=True)["input_ids"]]
    count = len(ids) // context
    if count < 1:
        raise SystemExit(f"{eval_file} has {len(ids)} tokens: fewer than one chunk of {context} (lower --context)")
    chunks = np.array(ids[:count * context], dtype=np.int32).reshape(count, context)
    if tokenizer.bos_token_id is not None:
        chunks[:, 0] = tokenizer.bos_token_id
    return chunks, len(ids)


def measure_model(args, work):
    """Every runtime on the whole model: speed as for the slices, quality on the held-out chats' tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    results = {}
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    chunks, stream = held_out_chunks(tokenizer, args.eval_file, args.context)
    print(f"Held-out chats: {stream} tokens -> {len(chunks)} chunks of {args.context}, "
          f"{len(chunks) * len(llama_cpp.scored_positions(args.context))} tokens scored")

    def reference_logits(ids):
        with torch.inference_mode():
            return model(torch.from_numpy(ids.astype("int64"))[None]).logits[0].numpy()

    kl_base = llama_cpp.write_kl_base(work / "kl-base.bin", chunks, reference_logits)
    for name in sorted(args.runtimes, key=lambda name: name != REFERENCE):  # fp32 first: .to() converts in place
        runtime, precision, options = RUNTIMES[name]
        if runtime != "transformers":
            continue
        typed = model.to(getattr(torch, precision)).eval()
        results[name] = {**guarded("model", name, transformers_row(typed, precision, args)),
                         "quality": llama_cpp.kl_statistics(kl_base, reference_logits)}
    for name in args.runtimes:
        runtime, precision, options = RUNTIMES[name]
        if runtime == "onnx":
            export = work / f"model-onnx-{list(RUNTIMES).index(name)}"
            results[name] = guarded("model", name, lambda: in_child(
                onnx_row, args.model, export, precision, options, args.new_tokens, args.repeats, kl_base))
    llama_names = [name for name in args.runtimes if RUNTIMES[name][0] == "llama.cpp"]
    if llama_names:
        files = llama_cpp.gguf_files(args.model, work / "gguf-model", [RUNTIMES[n][1] for n in llama_names],
                                     threads=args.threads)
        for name in llama_names:
            path = files[RUNTIMES[name][1]]
            results[name] = guarded("model", name, lambda: llama_cpp_row(path, args, kl_base))
    return results


def bound_row(seconds, weights, bandwidth_gbs):
    """tokens/s, GB read per token, the bandwidth bound and the share of it reached."""
    bound = bandwidth_gbs * 1e9 / weights
    return {"tokens_per_second": 1 / seconds, "weight_gb_per_token": weights / 1e9,
            "bound_tokens_per_second": bound, "share_of_bound": (1 / seconds) / bound}


def summarize(results, bandwidth_gbs):
    """Per runtime: extrapolated tokens/s, speed-up over transformers bf16, bytes/token, the bound and its share."""
    rows = {}
    for name, by_layers in results.items():
        seconds = extrapolate({n: figures["seconds_per_token"] for n, figures in by_layers.items()})
        weights = extrapolate({n: figures["weight_bytes"] for n, figures in by_layers.items()})
        rows[name] = {**bound_row(seconds, weights, bandwidth_gbs),
                      "slices": {str(n): {"tokens_per_second": 1 / f["seconds_per_token"],
                                          "prefill_seconds": f["prefill_seconds"]} for n, f in by_layers.items()}}
    reference = rows.get("transformers bf16", {}).get("tokens_per_second")
    for row in rows.values():
        row["vs_transformers_bf16"] = row["tokens_per_second"] / reference if reference else None
    return rows


def summarize_model(results, bandwidth_gbs):
    """Per runtime of --model: tokens/s, bytes/token, the bound, and the quality figures beside the reference's."""
    rows = {name: {**bound_row(figures["seconds_per_token"], figures["weight_bytes"], bandwidth_gbs),
                   **figures["quality"]} for name, figures in results.items()}
    for row in rows.values():
        row["perplexity_increase"] = row["perplexity"] / rows[REFERENCE]["perplexity"] - 1
    return rows


def print_table(rows, args, bandwidth_gbs):
    """The markdown table docs/benchmarks.md takes."""
    print(f"\nPhi-3-mini dimensions, {FULL_LAYERS} layers extrapolated from {args.layers[0]} and {args.layers[1]}; "
          f"{PROMPT_TOKENS}-token prompt, {args.new_tokens} new tokens, greedy; memory bandwidth {bandwidth_gbs:.1f} GB/s\n")
    print(f"| runtime | {args.layers[0]} layers | {args.layers[1]} layers | tokens/s ({FULL_LAYERS} layers) | "
          "x transformers bf16 | GB read per token | bound (tokens/s) | share of bound |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        ratio = f"{row['vs_transformers_bf16']:.2f}x" if row["vs_transformers_bf16"] else "-"
        slices = " | ".join(f"{row['slices'][str(n)]['tokens_per_second']:.2f}" for n in args.layers)
        print(f"| {name} | {slices} | {row['tokens_per_second']:.2f} | {ratio} | {row['weight_gb_per_token']:.2f} | "
              f"{row['bound_tokens_per_second']:.2f} | {row['share_of_bound']:.0%} |")


def print_model_table(rows, args, bandwidth_gbs):
    """--model's markdown table: speed and quality side by side."""
    print(f"\n{args.model.name}, whole; {PROMPT_TOKENS}-token prompt, {args.new_tokens} new tokens; memory bandwidth "
          f"{bandwidth_gbs:.1f} GB/s; quality on {rows[REFERENCE]['tokens']} scored tokens of {args.eval_file.name}\n")
    print("| runtime | tokens/s | GB read per token | share of bound | perplexity | vs transformers fp32 | "
          "KL divergence | same top token |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['tokens_per_second']:.1f} | {row['weight_gb_per_token']:.3f} | "
              f"{row['share_of_bound']:.0%} | {row['perplexity']:.4f} | {row['perplexity_increase']:+.2%} | "
              f"{max(row['kl_divergence'], 0):.5f} | {row['same_top']:.2%} |")  # below 0: the base's rounding


def main(argv=None):
    """Measure the bandwidth, then every runtime, and print the table."""
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.2f} (1 min) at start; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    if any(RUNTIMES[name][0] == "llama.cpp" for name in args.runtimes):
        try:
            llama_cpp.ensure_built()  # before any timing: the first build keeps both cores busy for minutes
        except llama_cpp.LlamaCppError as error:
            print(f"Error: {error}", file=sys.stderr)
            return 1
    bandwidth = memory_bandwidth_gbs()
    print(f"Memory bandwidth (numpy copy, read + write): {bandwidth:.1f} GB/s")
    try:
        with tempfile.TemporaryDirectory(prefix="bench-decode-") as work:
            results = measure_model(args, Path(work)) if args.model else measure(args, Path(work))
    except llama_cpp.LlamaCppError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 1
    print(f"Load average {os.getloadavg()[0]:.2f} (1 min) at the end; {time.strftime('%H:%M UTC', time.gmtime())}")
    if args.model:
        rows = summarize_model(results, bandwidth)
        print_model_table(rows, args, bandwidth)
    else:
        rows = summarize(results, bandwidth)
        print_table(rows, args, bandwidth)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"bandwidth_gbs": bandwidth, "layers": args.layers, "model": str(args.model),
                                         "new_tokens": args.new_tokens, "rows": rows, "measured": results},
                                        indent=2, default=str) + "\n")
        print(f"Wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
