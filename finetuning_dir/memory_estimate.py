"""How much memory fine-tuning needs, per method, before anything is loaded — and which method fits.

    python finetuning_dir/memory_estimate.py --model-name microsoft/Phi-4-mini-instruct --max-length 2048 --batch-size 4

fine_tune.py prints this estimate and picks the method with it (--method auto: the most faithful that fits:
full, then LoRA, then QLoRA), or refuses a method that will not fit, naming one that would. Only the model's
config.json is read (AutoConfig), never its weights. Like fine_tune.py it runs inside the Azure job.

What is counted, for N parameters (tied embeddings once) at the training precision (bf16 on GPUs that have it,
else fp32; the optimizer's states take the parameters' dtype, as torch's AdamW does):

    full    weights + gradients + AdamW's two moments              (2 + 2 + 4 = 8 bytes a parameter in bf16)
    lora    frozen weights + adapters with their gradients and moments in fp32 (PEFT keeps adapters in fp32)
    qlora   the linear layers' weights in 4-bit NF4 (0.5 byte + ~0.13 bit of double-quantized scales), the
            embeddings, head and norms in bf16, the adapters as for lora

plus activations at --max-length x --batch-size: with gradient checkpointing one saved input per layer and one
layer recomputed at a time (~34 values per token and hidden unit, Korthikanti et al. 2022, with a fused attention
kernel that keeps no score matrix); without it, every layer's. The logits and their gradient in fp32 (batch x
length x vocabulary x 8 bytes: 13 GB for Phi-4-mini's 200k vocabulary at 4 x 2048) are counted apart. A further 10 % and
1 GiB cover the CUDA context, the allocator's fragmentation and temporary buffers. It is an estimate: docs/benchmarks.md
holds the command that measures the peaks on a GPU.
"""

import argparse
import json
import math
import os
import sys

GIB = 1024 ** 3
METHODS = ("full", "lora", "qlora")  # the most faithful first: auto takes the first that fits
NF4_BYTES = 0.5 + 0.127 / 8  # 4 bits a weight, plus double-quantized scales (QLoRA paper: 0.127 bits a parameter)
OVERHEAD_SHARE, OVERHEAD_BYTES = 0.10, 1 * GIB  # on a GPU: the CUDA context, the allocator's fragmentation
# On a CPU the peak is the process's resident memory, measured (2026-12-06; docs/benchmarks.md section 7): the
# libraries (torch, transformers, TRL, datasets, MLflow: 0.46 GiB after import) with the data and the evaluation's
# buffers take 0.9 GiB (the tiny model's whole run peaked at 0.93), and the loaded weights count ~0.8x once more
# (SmolLM2-135M, fp32: full and LoRA, batches of 4-16 x 142 tokens, with and without checkpointing). LoRA's
# activations and logits take 2x the formula's (PEFT keeps a dropout copy of each adapted layer's input, and TRL's
# entropy and accuracy metrics their own copies of the logits). Within 13 % of every measured peak. On a GPU the
# formula is not yet measured (no GPU lent when this was written).
CPU_PROCESS_BYTES, CPU_WEIGHTS_AGAIN, CPU_OVERHEAD_SHARE, CPU_LORA_FACTOR = 0.9 * GIB, 0.8, 0.10, 2.0


class MethodError(ValueError):
    """The chosen method cannot run here; the message names one that can."""


def shape(config):
    """The numbers that size a Phi-3-family model, from its config (a dict or a transformers config)."""
    get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
    hidden, heads = get("hidden_size"), get("num_attention_heads")
    return {"vocab": get("vocab_size"), "hidden": hidden, "layers": get("num_hidden_layers"),
            "intermediate": get("intermediate_size"), "heads": heads,
            "kv_heads": get("num_key_value_heads") or heads, "head_dim": get("head_dim") or hidden // heads,
            "tied": bool(get("tie_word_embeddings", False))}


def linear_layers(s):
    """(inputs, outputs) of each linear layer in one decoder layer: qkv, o, gate_up, down (Phi-3's fused names)."""
    q, kv = s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
    return [(s["hidden"], q + 2 * kv), (q, s["hidden"]), (s["hidden"], 2 * s["intermediate"]), (s["intermediate"], s["hidden"])]


def parameter_counts(s, lora_rank=16):
    """Parameters: total, in the decoder layers' linear layers, and of LoRA adapters on every linear layer."""
    per_layer_linear = sum(i * o for i, o in linear_layers(s))
    norms = (2 * s["layers"] + 1) * s["hidden"]
    embeddings = s["vocab"] * s["hidden"] * (1 if s["tied"] else 2)
    linear = per_layer_linear * s["layers"]
    lora = lora_rank * sum(i + o for i, o in linear_layers(s)) * s["layers"]
    return {"total": linear + embeddings + norms, "linear": linear, "lora": lora}


def estimate(config, method, max_length, batch_size, bf16, lora_rank=16, gradient_checkpointing=True, has_cuda=True):
    """Bytes by part for one method: weights, gradients, optimizer, activations, logits, overhead, total."""
    s, counts = shape(config), None
    counts = parameter_counts(s, lora_rank)
    width = 2 if bf16 else 4
    if method == "full":
        parts = {"weights": counts["total"] * width, "gradients": counts["total"] * width,
                 "optimizer": counts["total"] * 2 * width}
    elif method in ("lora", "qlora"):
        frozen = (counts["linear"] * NF4_BYTES + (counts["total"] - counts["linear"]) * 2 if method == "qlora"
                  else counts["total"] * width)
        parts = {"weights": frozen + counts["lora"] * 4, "gradients": counts["lora"] * 4,
                 "optimizer": counts["lora"] * 8}
    else:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    tokens = max_length * batch_size
    act_width = 2 if (bf16 or method == "qlora") else 4
    per_layer = 34 * tokens * s["hidden"] * act_width / 2  # Korthikanti's 34 bytes are for 2-byte values
    saved = s["layers"] * tokens * s["hidden"] * act_width
    parts["activations"] = (saved + per_layer) if gradient_checkpointing else per_layer * s["layers"]
    parts["logits"] = 2 * tokens * s["vocab"] * 4
    if not has_cuda and method != "full":
        parts["activations"] *= CPU_LORA_FACTOR
        parts["logits"] *= CPU_LORA_FACTOR
    subtotal = sum(parts.values())
    parts["overhead"] = (subtotal * OVERHEAD_SHARE + OVERHEAD_BYTES if has_cuda
                         else subtotal * CPU_OVERHEAD_SHARE + CPU_PROCESS_BYTES + CPU_WEIGHTS_AGAIN * parts["weights"])
    parts["total"] = subtotal + parts["overhead"]
    parts["parameters"] = counts["total"]
    parts["trainable"] = counts["total"] if method == "full" else counts["lora"]
    return parts


def device_memory():
    """(bytes, what) the training can use: the first GPU's total memory, or the machine's available RAM."""
    try:
        import torch

        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            return total, f"{torch.cuda.get_device_name(0)} ({total / GIB:.0f} GiB)"
    except ImportError:
        pass
    try:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not Linux: assume it fits and let the OS say otherwise
        return math.inf, "this machine's memory (not measured here)"
    return available, f"this machine's available memory ({available / GIB:.0f} GiB, no CUDA GPU)"


def choose_method(requested, estimates, memory, has_cuda, what):
    """The method to train with and why; MethodError when the request cannot run here (naming one that can)."""
    runnable = [m for m in METHODS if m != "qlora" or has_cuda]
    fitting = [m for m in runnable if estimates[m]["total"] <= memory]
    need = {m: f"{estimates[m]['total'] / GIB:.1f} GiB" for m in METHODS}
    if requested == "qlora" and not has_cuda:
        alternative = f"; {fitting[0]} fits in {what}" if fitting else ""
        raise MethodError("FINETUNE_METHOD=qlora needs a CUDA GPU (bitsandbytes' 4-bit NF4 kernels) and this machine "
                          f"has none: use lora or full{alternative}.")
    if requested == "auto":
        if not fitting:
            raise MethodError(f"No method fits in {what}: full needs {need['full']}, lora {need['lora']}, qlora "
                              f"{need['qlora']}{'' if has_cuda else ' (and needs a CUDA GPU)'}; lower --max-length or "
                              "--batch-size (raise --grad-accum to keep the batch), or use a larger GPU.")
        chosen = fitting[0]
        skipped = [m for m in METHODS[:METHODS.index(chosen)]]
        why = (f"{', '.join(f'{m} needs {need[m]}' for m in skipped)} — more than {what}; " if skipped else "") + \
              f"{chosen} needs {need[chosen]} and fits"
        return chosen, f"auto chose {chosen}: {why}"
    if requested not in METHODS:
        raise MethodError(f"unknown method {requested!r}; choose auto, {', '.join(METHODS)}")
    if estimates[requested]["total"] > memory:
        instead = f"use {fitting[0]} (~{need[fitting[0]]})" if fitting else "lower --max-length or --batch-size"
        raise MethodError(f"{requested} needs ~{need[requested]} and {what} has less: {instead}.")
    return requested, f"{requested} needs {need[requested]} and fits in {what}"


def report(estimates, what):
    """The table fine_tune.py prints before loading the model."""
    lines = [f"Memory estimate (GiB) against {what}:",
             f"  {'method':<6} {'weights':>8} {'grads':>8} {'optim':>8} {'activ.':>8} {'logits':>8} {'total':>8}  trainable"]
    for method, parts in estimates.items():
        cells = " ".join(f"{parts[key] / GIB:>8.1f}" for key in ("weights", "gradients", "optimizer", "activations",
                                                                  "logits", "total"))
        lines.append(f"  {method:<6} {cells}  {parts['trainable'] / 1e6:,.1f}M of {parts['parameters'] / 1e6:,.1f}M")
    return "\n".join(lines)


def plan(config, requested, max_length, batch_size, bf16, has_cuda, lora_rank=16, gradient_checkpointing=True,
         memory=None):
    """Estimates for every method, the chosen one and why (printed by fine_tune.py before it loads anything)."""
    memory, what = (memory, f"{memory / GIB:.0f} GiB") if memory else device_memory()
    estimates = {m: estimate(config, m, max_length, batch_size, bf16, lora_rank, gradient_checkpointing, has_cuda)
                 for m in METHODS}
    method, why = choose_method(requested, estimates, memory, has_cuda, what)
    return method, why, report(estimates, what)


def main(argv=None):
    """Print the estimate for a model (its config only) at a length and batch."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-name", required=True, help="Hub id or folder (only config.json is read)")
    parser.add_argument("--method", default="auto", choices=["auto", *METHODS])
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--gpu-gib", type=float, default=None, help="plan for a GPU of this size instead of this machine")
    args = parser.parse_args(argv)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(args.model_name)
    memory = args.gpu_gib * GIB if args.gpu_gib else None
    has_cuda = bool(args.gpu_gib) or device_memory()[1].find("no CUDA") < 0
    try:
        method, why, table = plan(config, args.method, args.max_length, args.batch_size, bf16=has_cuda,
                                  has_cuda=has_cuda, lora_rank=args.lora_r, memory=memory)
    except MethodError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(table)
    print(why)
    print(json.dumps({"method": method}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
