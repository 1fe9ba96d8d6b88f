"""Decode speed at Phi-3-mini's dimensions: transformers fp32/bf16 against ONNX Runtime GenAI per precision.

    python bench/decode_runtimes.py                       # 4- and 8-layer slices, ~6 min on 2 cores
    python bench/decode_runtimes.py --layers 2,4 --json decode.json

Nothing is downloaded: each slice is a `Phi3ForCausalLM` with Phi-3-mini's layer dimensions (hidden 3072,
MLP 8192, 32 heads, vocabulary 32064) and random weights, saved to a temporary folder and exported with ONNX
Runtime GenAI's model builder exactly as finetuning_dir/onnx_export.py does (the same builder, the same
options per candidate) plus the builder's defaults for int4. Random weights cost the same FLOPs and bytes as
trained ones.

For each runtime and slice: a 64-token prompt (random ids), then --new-tokens tokens, greedy, every one
generated (no early stop); decode time = total minus the prefill and first token, per token. The per-token
time of the full 32-layer model is extrapolated from the two slices (time = a + b x layers: the embedding and
LM head are a, each layer adds b). Weight bytes read per token are extrapolated the same way, from the
parameters (transformers) or the exported files (ONNX), less the input embedding table (one row a token).

The bound: a CPU decoding one sequence reads every weight once per token, so tokens/s can be no more than
memory bandwidth / bytes per token. The bandwidth is measured here (numpy copy of a 1 GiB array: bytes read
+ written per second, best of 5). Each runtime's share of its own bound shows how much is left to gain.
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
}


def parse_args(argv=None):
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--layers", default="4,8", help="two slice depths to extrapolate from")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per runtime and slice (the fastest counts)")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES), help="comma-separated names from the list above")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    args.layers = [int(n) for n in args.layers.split(",")]
    args.runtimes = [name.strip() for name in args.runtimes.split(",") if name.strip()]
    if len(args.layers) != 2 or args.layers[0] >= args.layers[1]:
        parser.error("--layers takes two depths, the smaller first (e.g. 4,8)")
    unknown = [name for name in args.runtimes if name not in RUNTIMES]
    if unknown:
        parser.error(f"unknown runtime(s) {unknown}; choose from: {', '.join(RUNTIMES)}")
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


def build_slice(layers, folder):
    """A Phi-3-mini-shaped model with `layers` layers and random weights, saved with a tokenizer the builder copies."""
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
    return model


def prompt_ids():
    """The same 64 random token ids for every runtime."""
    import numpy as np

    return np.random.default_rng(0).integers(10, PHI3_MINI["vocab_size"] - 10, PROMPT_TOKENS).tolist()


def time_transformers(model, new_tokens, repeats):
    """(seconds per decoded token, prefill seconds) with transformers' generate(), greedy, no early stop."""
    import torch

    ids = torch.tensor([prompt_ids()])
    options = {"attention_mask": torch.ones_like(ids), "do_sample": False, "pad_token_id": 0}

    def run(tokens):
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **options)
        return time.perf_counter() - started

    run(2)  # warm-up
    best_first, best_all = min(run(1) for _ in range(repeats)), min(run(new_tokens + 1) for _ in range(repeats))
    return (best_all - best_first) / new_tokens, best_first


def time_onnx(folder, new_tokens, repeats):
    """(seconds per decoded token, prefill seconds) with ONNX Runtime GenAI, greedy, no early stop."""
    import numpy as np
    import onnxruntime_genai as og

    og.disable_telemetry_events()
    model = og.Model(str(folder))
    ids = np.array(prompt_ids(), dtype=np.int32)

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


def weight_bytes_per_token(runtime, model_or_folder, dtype):
    """Bytes of weights one decoded token reads: all but the input embedding table (one row of it is read)."""
    hidden, vocab = PHI3_MINI["hidden_size"], PHI3_MINI["vocab_size"]
    if runtime == "transformers":
        element = 2 if dtype == "bfloat16" else 4
        return sum(p.numel() for p in model_or_folder.parameters()) * element - vocab * hidden * element
    files = sum(path.stat().st_size for path in Path(model_or_folder).glob("model.onnx*"))
    return files - vocab * hidden * 4  # the builder keeps the embedding table in fp32 for the CPU


def extrapolate(values_by_layers, layers=FULL_LAYERS):
    """a + b x layers through two (layers, value) points."""
    (l1, v1), (l2, v2) = sorted(values_by_layers.items())
    slope = (v2 - v1) / (l2 - l1)
    return v1 + slope * (layers - l1)


def onnx_row(folder, export, precision, options, new_tokens, repeats):
    """Build one ONNX export of the slice and time it (run in a child process: the builder's memory goes with it)."""
    if not export.exists():
        with contextlib.redirect_stdout(io.StringIO()):
            onnx_export.build(folder, export, precision, options, export.parent / "cache")
    per_token, prefill = time_onnx(export, new_tokens, repeats)
    weights = weight_bytes_per_token("onnx", export, precision)
    shutil.rmtree(export)
    return per_token, prefill, weights


def measure(args, work):
    """Every runtime on both slices; returns {name: {layers: figures}}."""
    import gc
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    import torch

    results = {name: {} for name in args.runtimes}
    for layers in args.layers:
        folder = work / f"slice-{layers}"
        model, typed = build_slice(layers, folder), None
        for name in args.runtimes:  # transformers first, while the model is in memory
            runtime, precision, options = RUNTIMES[name]
            if runtime != "transformers":
                continue
            started = time.perf_counter()
            typed = model.to(getattr(torch, precision)).eval()
            per_token, prefill = time_transformers(typed, args.new_tokens, args.repeats)
            results[name][layers] = {"seconds_per_token": per_token, "prefill_seconds": prefill,
                                     "weight_bytes": weight_bytes_per_token(runtime, typed, precision)}
            print(f"  {layers} layers  {name:<58} {1 / per_token:7.2f} tokens/s  ({time.perf_counter() - started:.0f} s)",
                  flush=True)
        del model, typed
        gc.collect()
        for name in args.runtimes:
            runtime, precision, options = RUNTIMES[name]
            if runtime == "transformers":
                continue
            started = time.perf_counter()
            export = work / f"{layers}-{precision}-{'-'.join(options) or 'defaults'}"
            with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as child:
                per_token, prefill, weights = child.submit(onnx_row, folder, export, precision, options,
                                                           args.new_tokens, args.repeats).result()
            results[name][layers] = {"seconds_per_token": per_token, "prefill_seconds": prefill, "weight_bytes": weights}
            print(f"  {layers} layers  {name:<58} {1 / per_token:7.2f} tokens/s  ({time.perf_counter() - started:.0f} s)",
                  flush=True)
        shutil.rmtree(folder)
    return results


def summarize(results, bandwidth_gbs):
    """Per runtime: extrapolated tokens/s, speed-up over transformers bf16, bytes/token, the bound and its share."""
    rows = {}
    for name, by_layers in results.items():
        seconds = extrapolate({n: figures["seconds_per_token"] for n, figures in by_layers.items()})
        weights = extrapolate({n: figures["weight_bytes"] for n, figures in by_layers.items()})
        bound = bandwidth_gbs * 1e9 / weights
        rows[name] = {"tokens_per_second": 1 / seconds, "weight_gb_per_token": weights / 1e9,
                      "bound_tokens_per_second": bound, "share_of_bound": (1 / seconds) / bound,
                      "slices": {str(n): {"tokens_per_second": 1 / f["seconds_per_token"],
                                          "prefill_seconds": f["prefill_seconds"]} for n, f in by_layers.items()}}
    reference = rows.get("transformers bf16", {}).get("tokens_per_second")
    for row in rows.values():
        row["vs_transformers_bf16"] = row["tokens_per_second"] / reference if reference else None
    return rows


def print_table(rows, args, bandwidth_gbs):
    """The markdown table docs/benchmarks.md takes."""
    print(f"\nPhi-3-mini dimensions, {FULL_LAYERS} layers extrapolated from {args.layers[0]} and {args.layers[1]}; "
          f"{PROMPT_TOKENS}-token prompt, {args.new_tokens} new tokens, greedy; memory bandwidth {bandwidth_gbs:.1f} GB/s\n")
    print("| runtime | tokens/s (32 layers) | x transformers bf16 | GB read per token | bound (tokens/s) | share of bound |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        ratio = f"{row['vs_transformers_bf16']:.2f}x" if row["vs_transformers_bf16"] else "-"
        print(f"| {name} | {row['tokens_per_second']:.2f} | {ratio} | {row['weight_gb_per_token']:.2f} | "
              f"{row['bound_tokens_per_second']:.2f} | {row['share_of_bound']:.0%} |")


def main(argv=None):
    """Measure the bandwidth, then every runtime, and print the table."""
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.2f} (1 min) at start; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    bandwidth = memory_bandwidth_gbs()
    print(f"Memory bandwidth (numpy copy, read + write): {bandwidth:.1f} GB/s")
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as work:
        results = measure(args, Path(work))
    rows = summarize(results, bandwidth)
    print_table(rows, args, bandwidth)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"bandwidth_gbs": bandwidth, "layers": args.layers,
                                         "new_tokens": args.new_tokens, "rows": rows}, indent=2) + "\n")
        print(f"Wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
