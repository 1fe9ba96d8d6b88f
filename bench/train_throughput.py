"""Fine-tuning throughput of fine_tune.py's training path: tokens/s, step time, peak memory and MFU per profile.

    python bench/train_throughput.py --size tiny                                   # the local tiny Phi-3, CPU, ~1.5 min
    python bench/train_throughput.py --size mini --profiles tutorial,tuned,lora    # Phi-3-mini shape, one GPU, ~3 min
    python bench/train_throughput.py --size mini --profiles tutorial,lora,qlora --serving   # your own GPU (make venv-gpu)

Prints the machine, the FLOP/s peak the MFU is measured against, one row per profile (tokens/s, step time, peak
memory, MFU, the settings used) and the ratio tuned / tutorial measured in the same run; --json FILE also writes
the rows. Timing: a TrainerCallback notes the end of every optimizer step (after the GPU has finished); the first
--warmup-steps are left out, tokens/s comes from the median step, and on a CPU each profile is measured twice,
interleaved, keeping the faster (--repeats), because a shared CPU's neighbours come and go.

Nothing is downloaded: the model is a `Phi3ForCausalLM` with random weights (same shapes, same FLOPs as trained
weights) and the data are random token ids, packed rows of exactly --max-length tokens.

The path is fine_tune.py's own: `fine_tune.parse_args([...])` -> `fine_tune.load_model_and_tokenizer` (dtype,
attention kernel, use_cache, LoRA wrapping) -> `fine_tune.sft_config` -> `trl.SFTTrainer(...).train()`. Only the
weights' source differs: `from_pretrained` is replaced, for that one call, by a random-init model built with the
arguments fine_tune.py passes to it. The data are pre-tokenized `input_ids` rows, which TRL uses as they are and
packs with the strategy sft_config chose (every row is already full, so packing changes nothing).

Profiles (each a fine_tune.py command line, printed in the table):
    tutorial    the tutorial's settings: eager attention, gradient checkpointing, batch 4, packing, bf16 on GPUs
    tuned       the same training (4 x --max-length tokens per optimizer step, same maths) made fast:
                flash_attention_2 when flash-attn is installed (then padding-free best-fit packing), else sdpa;
                no gradient checkpointing at the largest micro-batch that fits (4, 2x2 or 1x4 accumulation)
    lora        the tutorial's settings plus --lora-r 16 on all linear layers (what the README suggests for
                GPUs under 80 GB)
    qlora       the lora profile with the base in 4-bit NF4 (fine_tune.py --method qlora; CUDA + bitsandbytes only)
    lora-tuned  the tuned settings plus --lora-r 16;  attention-only: the tutorial's with tuned's attention kernel
                (checkpointing kept), to split tuned's gain into its two parts
Fused AdamW is transformers' default optimizer with torch >= 2.8, so every profile already uses it.

MFU = achieved model FLOP/s / peak FLOP/s. FLOPs per token (PaLM's convention, model FLOPs: recomputation by
gradient checkpointing is not counted):
    full fine-tune   6*N + 12*L*d*S
    LoRA             4*N + 6*N_lora + 12*L*d*S   (frozen weights: forward 2N and activation gradients 2N, no
                                                 weight gradients; the adapters cost 6 FLOPs per parameter)
N = every weight a token is multiplied by: all parameters except the input embedding table (the untied output
layer is included, the norms are counted but negligible); L layers, d hidden size, S = --max-length (the full
S x S score matrix, as in PaLM, even though it is causal). Peaks: dense bf16 989 TFLOP/s H100 SXM/H200,
756 H100 PCIe, 835 H100 NVL, 312 A100; on a CPU there is no vendor figure, so the peak is a large fp32
torch.matmul measured here first, and the column says so.
"""

import argparse
import gc
import json
import os
import platform
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path
from unittest import mock

PROJECT_DIR = Path(__file__).resolve().parents[1]
FINETUNING_DIR = PROJECT_DIR / "finetuning_dir"

# Phi-3-mini-4k-instruct / Phi-3.5-mini-instruct: 3.8B parameters.
MINI_SHAPE = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32064)
DEFAULT_LENGTH = {"tiny": 512, "mini": 2048}  # tiny: what fits the sample chats (the tiny recipe's max_length); mini: the tutorial's
DEFAULT_STEPS = {"tiny": 30, "mini": 20}  # optimizer steps per profile, warm-up included
DEFAULT_WARMUP = {"tiny": 5, "mini": 5}  # untimed first steps: allocator growth, kernel selection
SEQUENCES_PER_STEP = 4  # the tutorial's batch 4 without accumulation: every profile trains on this many per step
# Dense bf16 tensor-core peaks in TFLOP/s (vendor data sheets), matched against torch.cuda.get_device_name().
GPU_PEAKS_TFLOPS = (("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H200", 989), ("GH200", 989),
                    ("A100", 312), ("L40S", 362))
PROFILES = ("tutorial", "tuned", "lora", "qlora", "lora-tuned", "attention-only")
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def parse_args(argv=None):
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "mini"], default="tiny",
                        help="tiny: stand_ins/tiny_model.py's MODEL_SIZE (the local model); mini: Phi-3-mini, 3.8B parameters")
    parser.add_argument("--profiles", default="tutorial,tuned,lora",
                        help="comma-separated, from: " + ", ".join(PROFILES))
    parser.add_argument("--max-length", type=int, default=None, help="tokens per sequence (default: tiny 512, mini 2048)")
    parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps per profile (default: tiny 30, mini 20)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="first steps left out of the timing (default: tiny 5, mini 5)")
    parser.add_argument("--num-layers", type=int, default=None, help="override the layer count (a quick smoke test of mini's shape)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, if the table above does not know it")
    parser.add_argument("--repeats", type=int, default=None,
                        help="measure the profiles this many times, interleaved, and keep each one's fastest "
                             "(default: tiny 2, against a busy shared CPU; mini 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, one per core)")
    parser.add_argument("--serving", action="store_true",
                        help="also measure decoding tokens/s as score.py serves on this device (bf16 on a GPU)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    args.max_length = args.max_length or DEFAULT_LENGTH[args.size]
    args.max_steps = args.max_steps or DEFAULT_STEPS[args.size]
    args.warmup_steps = DEFAULT_WARMUP[args.size] if args.warmup_steps is None else args.warmup_steps
    args.repeats = args.repeats or (2 if args.size == "tiny" else 1)
    args.profiles = [name.strip() for name in args.profiles.split(",") if name.strip()]
    unknown = set(args.profiles) - set(PROFILES)
    if unknown:
        parser.error(f"unknown profile(s) {', '.join(sorted(unknown))}; choose from {', '.join(PROFILES)}")
    if args.max_steps <= args.warmup_steps:
        parser.error("--max-steps must be larger than --warmup-steps: nothing would be timed")
    return args


# --- The machine ------------------------------------------------------------------------------------------
def cpu_model():
    """The CPU's model name from /proc/cpuinfo (or platform)."""
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        return match.group(1).strip() if match else platform.processor()
    except OSError:
        return platform.processor() or "unknown CPU"


def ram_gib():
    """Physical memory in GiB (Linux), or None."""
    try:
        kib = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        return kib / 2**20
    except (OSError, AttributeError):
        return None


def gpu_peak_tflops(name):
    """The dense bf16 peak of a GPU from its name, or None when unknown."""
    for key, tflops in GPU_PEAKS_TFLOPS:
        if key.lower() in name.lower():
            return tflops
    return None


def measure_cpu_matmul_peak(seconds=3.0, n=2048):
    """The best fp32 FLOP/s of an n x n torch.matmul on this CPU (all of torch's threads)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)  # warm-up
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        torch.matmul(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - started))
    return best


def describe_device(peak_override):
    """Where the benchmark runs: name, kind, and the peak FLOP/s with a label saying what it is."""
    import torch

    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "ram_gib": ram_gib(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        peak = peak_override or gpu_peak_tflops(name)
        info.update(kind="cuda", device=name, bf16=torch.cuda.is_bf16_supported(),
                    peak_flops=peak * 1e12 if peak else None,
                    peak_label=f"{peak:.0f} TFLOP/s dense bf16 (data sheet)" if peak else "unknown: pass --peak-tflops")
    else:
        peak = peak_override * 1e12 if peak_override else measure_cpu_matmul_peak()
        info.update(kind="cpu", device=f"CPU: {info['cpu']}", bf16=False, peak_flops=peak,
                    peak_label=f"{peak / 1e9:.0f} GFLOP/s fp32 torch.matmul, measured here (no vendor figure)")
    return info


# --- Memory ---------------------------------------------------------------------------------------------------
def reset_peak_memory(kind):
    """Start a new peak: CUDA's allocator statistics, or the process's peak RSS (Linux clear_refs)."""
    import torch

    if kind == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass  # then the peak is the process's peak so far


def peak_memory_gib(kind):
    """Peak memory since reset_peak_memory: torch.cuda.max_memory_allocated, or max RSS on a CPU."""
    import torch

    if kind == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 2**20
    except (OSError, AttributeError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# --- Model, tokenizer, data -----------------------------------------------------------------------------------
def model_shape(size, num_layers=None):
    """The Phi3Config fields of --size (tiny: stand_ins.tiny_model's MODEL_SIZE and VOCAB_SIZE)."""
    if size == "tiny":
        sys.path.insert(0, str(PROJECT_DIR))
        from stand_ins import tiny_model

        shape = {**tiny_model.MODEL_SIZE, "vocab_size": tiny_model.VOCAB_SIZE}
    else:
        shape = dict(MINI_SHAPE)
    if num_layers:
        shape["num_hidden_layers"] = num_layers
    return shape


def phi3_config(shape, max_length):
    """A Phi3Config of the given shape (no rope scaling needed at --max-length)."""
    from transformers import Phi3Config

    positions = max(4096, max_length)
    return Phi3Config(**shape, max_position_embeddings=positions, original_max_position_embeddings=positions,
                      bos_token_id=1, eos_token_id=3, pad_token_id=3, tie_word_embeddings=False)


def make_tokenizer():
    """A minimal fast tokenizer with Phi-3's special tokens: the data are token ids, so only pad/eos matter."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                   bos_token="<s>", eos_token="<|endoftext|>", unk_token="<unk>",
                                   pad_token="<|endoftext|>")


def random_model_loader(model_config, device):
    """A stand-in for AutoModelForCausalLM.from_pretrained: random weights, built on `device`, same kwargs. With a
    quantization_config (qlora) the random weights are saved once and loaded back through the real loader, so
    bitsandbytes quantizes them as it would a downloaded model."""
    import torch
    from transformers import AutoModelForCausalLM, Phi3ForCausalLM

    real_from_pretrained = AutoModelForCausalLM.from_pretrained

    def from_pretrained(name, dtype=torch.float32, attn_implementation="eager", use_cache=False, **kwargs):
        if kwargs.get("quantization_config") is not None:
            folder = Path(tempfile.gettempdir()) / f"bench-random-phi3-{model_config.num_hidden_layers}"
            if not (folder / "config.json").is_file():
                torch.manual_seed(0)
                Phi3ForCausalLM._from_config(model_config, dtype=torch.bfloat16).save_pretrained(folder)
            return real_from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation,
                                        use_cache=use_cache, device_map={"": device}, **kwargs)
        torch.manual_seed(0)
        with torch.device(device):
            model = Phi3ForCausalLM._from_config(model_config, dtype=dtype, attn_implementation=attn_implementation)
        model.config.use_cache = use_cache
        return model

    return from_pretrained


def synthetic_dataset(rows, length, vocab_size, seed=0):
    """`rows` packed rows of `length` random token ids (ids of the special tokens left out)."""
    import torch
    from datasets import Dataset

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(SPECIAL_TOKENS), vocab_size, (rows, length), generator=generator)
    return Dataset.from_dict({"input_ids": ids.tolist()})


# --- Profiles -----------------------------------------------------------------------------------------------
def fast_attention(kind):
    """flash_attention_2 on a GPU where flash-attn imports, else sdpa (PyTorch's fused attention)."""
    if kind != "cuda":
        return "sdpa"
    try:
        import flash_attn  # noqa: F401 - only whether it imports
    except Exception:  # noqa: BLE001 - missing, or built for another torch: sdpa is the fallback either way
        return "sdpa"
    return "flash_attention_2"


def profile_candidates(name, kind):
    """fine_tune.py options of a profile; a list tried in order, the first that fits in memory is measured."""
    tutorial = ["--attn-implementation", "eager", "--batch-size", "4", "--grad-accum", "1", "--gradient-checkpointing"]
    lora = ["--lora-r", "16", "--lora-alpha", "32", "--lora-target-modules", "all-linear"]
    attention = ["--attn-implementation", fast_attention(kind)]
    # Same 4 sequences per optimizer step: a smaller micro-batch with accumulation, before checkpointing again.
    tuned = [attention + ["--batch-size", "4", "--grad-accum", "1", "--no-gradient-checkpointing"]]
    if kind == "cuda":
        tuned += [attention + ["--batch-size", "2", "--grad-accum", "2", "--no-gradient-checkpointing"],
                  attention + ["--batch-size", "1", "--grad-accum", "4", "--no-gradient-checkpointing"],
                  attention + ["--batch-size", "4", "--grad-accum", "1", "--gradient-checkpointing"]]
    sdpa_only = ["--attn-implementation", fast_attention(kind), "--batch-size", "4", "--grad-accum", "1", "--gradient-checkpointing"]
    return {"tutorial": [tutorial], "tuned": tuned, "lora": [tutorial + lora],
            "qlora": [tutorial + lora + ["--method", "qlora"]], "attention-only": [sdpa_only],
            "lora-tuned": [options + lora for options in tuned]}[name]


def fine_tune_argv(options, work_dir, max_length, max_steps):
    """A full fine_tune.py command line for `options` (the data files are never read: data come from memory)."""
    return ["--train-file", "synthetic.jsonl", "--eval-file", "synthetic.jsonl",
            "--model_output_dir", str(work_dir / "model_output"), "--checkpoint-dir", str(work_dir / "checkpoints"),
            "--model-name", "random-phi3", "--max-length", str(max_length), "--max-steps", str(max_steps),
            "--eval-strategy", "no", "--logging-steps", "1000000", "--save-steps", "1000000", *options]


def flops_per_token(model, model_config, seq_len, lora):
    """Model FLOPs per trained token (see the module docstring); returns (flops, N, N_lora)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embedding = base.get_input_embeddings().weight.numel()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    n_lora = trainable if lora else 0
    n = total - n_lora - embedding
    attention = 12 * model_config.num_hidden_layers * model_config.hidden_size * seq_len
    flops = (4 * n + 6 * n_lora if lora else 6 * n) + attention
    return flops, n, n_lora


def step_timer_class():
    """The TrainerCallback class that records when each optimizer step ends (transformers imported lazily)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time at the end of every optimizer step, after the device has finished; saves nothing."""

        def __init__(self, synchronize):
            self.synchronize = synchronize
            self.ends = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.synchronize()
            self.ends = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kwargs):
            self.synchronize()
            self.ends.append(time.perf_counter())
            control.should_save = False  # the trainer would write a checkpoint at the last step

    return StepTimer


def train_once(options, setup, max_steps):
    """Build model, SFTConfig and SFTTrainer through fine_tune.py, train max_steps; returns the raw figures."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import SFTTrainer

    import fine_tune

    kind = setup["device"]["kind"]
    use_cpu = kind != "cuda"
    use_bf16 = kind == "cuda" and setup["device"]["bf16"]  # fine_tune.py's rule: bf16 on GPUs that have it
    with tempfile.TemporaryDirectory(prefix="bench-train-") as folder:
        args = fine_tune.parse_args(fine_tune_argv(options, Path(folder), setup["max_length"], max_steps))
        reset_peak_memory(kind)
        with mock.patch.object(AutoModelForCausalLM, "from_pretrained", random_model_loader(setup["config"], setup["torch_device"])), \
                mock.patch.object(AutoTokenizer, "from_pretrained", lambda *a, **k: make_tokenizer()):
            model, tokenizer = fine_tune.load_model_and_tokenizer(args, use_bf16)
        timer = step_timer_class()(torch.cuda.synchronize if kind == "cuda" else (lambda: None))
        trainer = SFTTrainer(model=model, args=fine_tune.sft_config(args, use_bf16, use_cpu),
                             train_dataset=setup["dataset"], processing_class=tokenizer, callbacks=[timer])
        trainer.remove_callback(PrinterCallback)  # the end-of-training metrics dict; the table says it better
        rows = len(trainer.train_dataset)
        tokens_per_row = fine_tune.count_tokens(trainer.train_dataset) / rows
        try:
            trainer.train()
            memory = peak_memory_gib(kind)
            flops, n, n_lora = flops_per_token(trainer.model, setup["config"], setup["max_length"], args.lora_r > 0)
            return {"step_ends": timer.ends, "peak_memory_gib": memory, "flops_per_token": flops, "n": n,
                    "n_lora": n_lora, "tokens_per_row": tokens_per_row, "optim": str(trainer.args.optim.value),
                    "packing_strategy": trainer.args.packing_strategy, "dtype": str(next(model.parameters()).dtype),
                    "tokens_per_step": args.batch_size * args.grad_accum * tokens_per_row}
        finally:
            del trainer, model
            free_memory(kind)


def free_memory(kind):
    """Give the memory of a failed attempt back before the next one."""
    import torch

    gc.collect()
    if kind == "cuda":
        torch.cuda.empty_cache()


def is_out_of_memory(error):
    """True for a CUDA (or CPU allocator) out-of-memory error."""
    import torch

    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def estimate_gib(options, setup):
    """finetuning_dir/memory_estimate.py's total for the profile's method, length and batch (GiB)."""
    import memory_estimate

    method = "qlora" if "qlora" in options else "lora" if "--lora-r" in options else "full"
    batch = int(options[options.index("--batch-size") + 1]) if "--batch-size" in options else 4
    bf16 = setup["device"]["kind"] == "cuda" and setup["device"]["bf16"]
    parts = memory_estimate.estimate(setup["config"], method, setup["max_length"], batch, bf16,
                                     gradient_checkpointing="--no-gradient-checkpointing" not in options)
    return parts["total"] / memory_estimate.GIB


def run_profile(name, setup, max_steps, warmup):
    """Measure one profile: the first candidate that fits; returns its table row."""
    notes = []
    if name == "qlora" and setup["device"]["kind"] != "cuda":
        return {"profile": name, "options": "", "tokens_per_s": None, "notes": ["needs a CUDA GPU (bitsandbytes)"]}
    for options in profile_candidates(name, setup["device"]["kind"]):
        raw = None
        try:
            raw = train_once(options, setup, max_steps)
        except (RuntimeError, MemoryError) as error:
            if not is_out_of_memory(error):
                raise
            notes.append(f"out of memory with {' '.join(options)}")
        if raw is None:
            free_memory(setup["device"]["kind"])  # outside the except block: its traceback held the tensors
            continue
        steps = [b - a for a, b in zip(raw["step_ends"], raw["step_ends"][1:])][warmup:]
        if not steps:
            raise RuntimeError(f"profile {name}: the trainer ran {len(raw['step_ends']) - 1} steps, none after warm-up")
        median = sorted(steps)[len(steps) // 2]
        tokens_per_s = raw["tokens_per_step"] / median  # the median step: robust to a busy neighbour on a shared CPU
        achieved = tokens_per_s * raw["flops_per_token"]
        peak = setup["device"]["peak_flops"]
        if raw["tokens_per_row"] != setup["max_length"]:
            notes.append(f"rows hold {raw['tokens_per_row']:.0f} tokens after TRL's packing, not {setup['max_length']}")
        return {"profile": name, "options": " ".join(options), "tokens_per_s": tokens_per_s,
                "step_s_median": median, "step_s_mean": sum(steps) / len(steps),
                "tokens_per_s_mean": raw["tokens_per_step"] * len(steps) / sum(steps),
                "timed_steps": len(steps), "tokens_per_step": raw["tokens_per_step"],
                "peak_memory_gib": raw["peak_memory_gib"], "flops_per_token": raw["flops_per_token"],
                "params_n": raw["n"], "params_lora": raw["n_lora"], "achieved_tflops": achieved / 1e12,
                "mfu": achieved / peak if peak else None, "optim": raw["optim"], "dtype": raw["dtype"],
                "packing_strategy": raw["packing_strategy"], "estimate_gib": estimate_gib(options, setup),
                "notes": notes}
    return {"profile": name, "options": "", "tokens_per_s": None, "notes": notes + ["no candidate fitted in memory"]}


# --- Output -----------------------------------------------------------------------------------------------------
def print_header(device, args, shape):
    """The machine and what is measured."""
    ram = f"{device['ram_gib']:.0f} GiB RAM" if device["ram_gib"] else "RAM unknown"
    print(f"Machine: {device['device']}; {device['cores']} CPU cores ({device['cpu']}), {ram}; torch {device['torch']}, "
          f"{device['torch_threads']} threads")
    print(f"Peak for MFU: {device['peak_label']}")
    print(f"Model: Phi-3 --size {args.size} {shape}; {args.max_length} tokens per row; {SEQUENCES_PER_STEP} rows per "
          f"optimizer step; {args.max_steps} steps per profile, the first {args.warmup_steps} untimed; tokens/s from the "
          f"median step; best of {args.repeats} interleaved run(s) per profile")


def print_table(rows, kind):
    """One line per profile, then the options each used."""
    memory = "peak GPU mem" if kind == "cuda" else "peak RSS"
    mfu = "MFU" if kind == "cuda" else "MFU (vs fp32 matmul)"
    print(f"\n{'profile':<14} {'tokens/s':>10} {'step s':>8} {memory + ' GiB':>17} {'TFLOP/s':>8} {mfu:>21}  dtype / optimizer / packing")
    for row in rows:
        if row["tokens_per_s"] is None:
            print(f"{row['profile']:<14} {'-':>10}  ({'; '.join(row['notes'])})")
            continue
        mfu_text = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
        print(f"{row['profile']:<14} {row['tokens_per_s']:>10,.0f} {row['step_s_median']:>8.3f} {row['peak_memory_gib']:>17.2f} "
              f"{row['achieved_tflops']:>8.3f} {mfu_text:>21}  {row['dtype']} / {row['optim']} / {row['packing_strategy']}")
    print()
    for row in rows:
        print(f"  {row['profile']}: fine_tune.py {row['options']}" + (f"  [{'; '.join(row['notes'])}]" if row["notes"] else ""))
        if row["tokens_per_s"] is not None:
            print(f"    FLOPs/token {row['flops_per_token'] / 1e6:,.1f} M (N = {row['params_n'] / 1e6:,.2f} M"
                  + (f", N_lora = {row['params_lora'] / 1e6:,.2f} M" if row["params_lora"] else "") + ")")
            print(f"    memory: peak {row['peak_memory_gib']:.2f} GiB; finetuning_dir/memory_estimate.py's estimate "
                  f"{row['estimate_gib']:.2f} GiB (what fine_tune.py --method auto decides with)")
    speeds = {row["profile"]: row["tokens_per_s"] for row in rows}
    if speeds.get("tutorial") and speeds.get("tuned"):
        print(f"\ntuned / tutorial = {speeds['tuned'] / speeds['tutorial']:.2f}x (same run, same machine)")


def measure_serving(setup, new_tokens=128, prompt_tokens=64, repeats=3):
    """Decoding tokens/s of transformers' generate() at batch 1 in bf16 (fp16 without bf16; fp32 on a CPU), as score.py
    serves on a GPU: random weights, a random prompt, every token generated (no early stop); the best of `repeats`."""
    import torch
    from transformers import Phi3ForCausalLM

    kind = setup["device"]["kind"]
    dtype = (torch.bfloat16 if setup["device"]["bf16"] else torch.float16) if kind == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(setup["torch_device"]):
        model = Phi3ForCausalLM._from_config(setup["config"], dtype=dtype, attn_implementation="sdpa").eval()
    ids = torch.randint(len(SPECIAL_TOKENS), setup["config"].vocab_size, (1, prompt_tokens), device=setup["torch_device"])
    synchronize = torch.cuda.synchronize if kind == "cuda" else (lambda: None)
    best = float("inf")
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)  # warm-up
        for _ in range(repeats):
            synchronize()
            started = time.perf_counter()
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            synchronize()
            best = min(best, time.perf_counter() - started)
    del model
    free_memory(kind)
    return {"dtype": str(dtype), "new_tokens": new_tokens, "prompt_tokens": prompt_tokens, "tokens_per_s": new_tokens / best}


def main(argv=None):
    """Measure every requested profile and print the table."""
    args = parse_args(argv)
    sys.path.insert(0, str(FINETUNING_DIR))
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")  # one GPU: SFTTrainer refuses DataParallel over several
    os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import torch
    from transformers.utils import logging as transformers_logging

    if args.threads:
        torch.set_num_threads(args.threads)
    transformers_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices from inside transformers
    device = describe_device(args.peak_tflops)
    shape = model_shape(args.size, args.num_layers)
    print_header(device, args, shape)
    setup = {"device": device, "config": phi3_config(shape, args.max_length), "max_length": args.max_length,
             "torch_device": "cuda" if device["kind"] == "cuda" else "cpu",
             "dataset": synthetic_dataset(SEQUENCES_PER_STEP * args.max_steps, args.max_length, shape["vocab_size"])}
    best = {}
    for repeat in range(args.repeats):
        for name in args.profiles:
            started = time.perf_counter()
            row = run_profile(name, setup, args.max_steps, args.warmup_steps)
            print(f"  measured {name} in {time.perf_counter() - started:.1f} s: "
                  + (f"{row['tokens_per_s']:,.0f} tokens/s" if row["tokens_per_s"] else "no result"), flush=True)
            if name not in best or (row["tokens_per_s"] or 0) > (best[name]["tokens_per_s"] or 0):
                best[name] = row
    rows = [best[name] for name in args.profiles]
    print_table(rows, device["kind"])
    serving = measure_serving(setup) if args.serving else None
    if serving:
        print(f"\nServing (transformers generate(), batch 1, {serving['dtype']}, {serving['prompt_tokens']}-token prompt, "
              f"{serving['new_tokens']} new tokens): {serving['tokens_per_s']:,.1f} tokens/s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": device, "size": args.size, "shape": shape, "max_length": args.max_length,
                                         "max_steps": args.max_steps, "warmup_steps": args.warmup_steps, "repeats": args.repeats,
                                         "torch_cuda": torch.version.cuda, "rows": rows, "serving": serving},
                                        indent=2) + "\n")
        print(f"Wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
