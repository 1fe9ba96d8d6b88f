"""Fine-tune Phi-3 with TRL's SFTTrainer and write an MLflow model — the training job of step 2.

    python finetuning_dir/fine_tune.py --config recipes/phi-3.5-mini/sft/config_tutorial.yaml \\
        --train-file data/train_data.jsonl --eval-file data/test_data.jsonl --model_output_dir outputs/model_output

The recipe (--config, TRL's convention: a YAML file whose keys are this script's options; the command line
wins) holds everything a run trains with; setup_ml.py passes the same recipe to the Azure ML job and to the
local one, plus only what belongs to the run (data, output folder). Without --config the options' defaults are
the tutorial's recipe. Under torchrun or Azure ML's PyTorch distribution it trains on every process; only
rank 0 saves the model and reports.

Writes an MLflow transformers model into --model_output_dir (checkpoints go to --checkpoint-dir), then exports
it for ONNX Runtime GenAI into the same folder, its precision chosen by measurement (onnx_export.py;
--no-onnx-export skips it): score.py serves that export on CPUs. reporting.py prints the summary (eval loss
and perplexity before -> after, train loss, tokens/s, wall time) and logs it to MLflow.
"""

import argparse
import atexit
import errno
import gc
import math
import os
import shutil
import sys
import time
import warnings
from importlib.metadata import version
from pathlib import Path

# Its neighbours, imported as the job imports them: Azure ML runs this folder as the job's code.
from answer_quality import AnswerQuality, TransformersScorer, ids
from chat_data import ChatDataError, read_chat_jsonl
from chat_stops import stop_token_ids
from memory_estimate import MethodError, estimate, plan
from onnx_export import export_onnx, summary_line
from reporting import LiveMetrics, report, summary_metrics

TUTORIAL_BASE_MODEL = "microsoft/Phi-3.5-mini-instruct"
# Params a caller may send with each request; a signature with a params schema makes MLflow honour them. The
# endpoint contract's defaults (scoring_dir/contract.py PARAMS), written here because the job uploads this folder
# alone; tests/test_scripts.py keeps the two equal.
GENERATION_PARAMS = {"max_new_tokens": 128, "temperature": 0.7, "top_p": 1.0, "do_sample": False, "return_full_text": False}
MIN_CURVE_POINTS = 10  # the loss curve's points at least, whatever the run's length (--logging-steps)
# Too short to change the answers: fewer steps x learning rate than this. The tutorial's recipe on the 264 sample chats
# (9 steps x 5e-6 = 4.5e-5) left every held-out answer's F1 where the base model had it (docs/benchmarks.md, section
# 7); on the tutorial's ~1,663 ultrachat chats it is ~850 steps x 5e-6 = 4.3e-3. A floor of a quarter of that for a
# full fine-tune; LoRA's adapters start at zero and learn at 10-50x a full fine-tune's rate, hence a higher floor.
MIN_LEARNING = {"full": 1e-3, "lora": 5e-3, "qlora": 5e-3}
# What the saved model needs to load and serve; pinned to the versions that trained it.
MODEL_REQUIREMENTS = ("torch", "transformers", "accelerate", "tokenizers", "safetensors", "mlflow")


DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}  # no space, a file-size limit, a quota


def is_disk_full(error):
    """True for a write refused for room: an OSError, or the same error as a Rust library (safetensors) words it."""
    if isinstance(error, OSError):
        return error.errno in DISK_FULL
    return any(f"(os error {code})" in str(error) for code in DISK_FULL)


class UsageError(ValueError):
    """An option that cannot be used as given (a checkpoint to resume, an output folder); checked before training."""


def parse_args(argv=None):
    """The recipe (--config) as defaults, then the command line: the tutorial's CLI plus the knobs users need."""
    parser = build_parser()
    recipe = argparse.ArgumentParser(add_help=False)
    recipe.add_argument("--config", type=Path)
    config_file = recipe.parse_known_args(argv)[0].config
    if config_file:
        parser.set_defaults(**read_recipe(config_file, parser))
    return parser.parse_args(argv)


def read_recipe(path, parser):
    """The recipe's {option: value}; a key that is no option of this script is an error naming it."""
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        parser.error(f"--config {path}: {error}")
    options = {action.dest for action in parser._actions} - {"help", "config"}
    if not isinstance(values, dict) or set(values) - options:
        parser.error(f"--config {path}: unknown option(s) {sorted(set(values) - options) if isinstance(values, dict) else values}; "
                     "a recipe's keys are this script's options with underscores (learning_rate, epochs, ...)")
    return values


def build_parser():
    """The options; their defaults are the tutorial's recipe."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", type=Path, default=None,
                        help="a recipe: YAML whose keys are these options (recipes/); the command line wins")
    data = parser.add_argument_group("data and output")
    data.add_argument("--train-file", required=True, type=Path, help="JSONL chats in the ultrachat schema")
    data.add_argument("--eval-file", required=True, type=Path, help="JSONL chats for evaluation")
    data.add_argument("--model_output_dir", required=True, type=Path, help="where the MLflow model is written")
    data.add_argument("--checkpoint-dir", type=Path, default=Path("checkpoints"), help="trainer checkpoints (kept apart from the model)")
    data.add_argument("--resume-from-checkpoint", default=None, help="a checkpoint folder, or 'latest' in --checkpoint-dir")

    model = parser.add_argument_group("model")
    model.add_argument("--model-name", default=TUTORIAL_BASE_MODEL, help="Hub id or local folder of the base model")
    model.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"],
                       help="sdpa: PyTorch's fused attention, the same maths as the tutorial's eager, measured 1.37x "
                            "faster (docs/benchmarks.md); flash_attention_2 needs the flash-attn package")
    model.add_argument("--require-gpu", action="store_true",
                       help="stop with the reason when torch sees no GPU, instead of training on the CPU "
                            "(setup_ml.py passes it on GPU clusters)")
    model.add_argument("--method", default="auto", choices=["auto", "full", "lora", "qlora"],
                       help="full: every weight (the tutorial's); lora: adapters on a frozen model; qlora: adapters on a "
                            "4-bit NF4 model (CUDA only); auto: the most faithful that fits in memory (memory_estimate.py)")
    model.add_argument("--lora-r", type=int, default=0, help="LoRA rank for lora/qlora (0: 16); with --method auto, "
                                                             "a rank above 0 asks for lora")
    model.add_argument("--lora-alpha", type=int, default=32, help="LoRA scaling; usually 2x the rank")
    model.add_argument("--lora-dropout", type=float, default=0.05)
    model.add_argument("--lora-target-modules", default="all-linear", help="comma-separated module names, or all-linear")

    train = parser.add_argument_group("training (defaults: the tutorial's)")
    train.add_argument("--epochs", type=float, default=3)
    train.add_argument("--learning-rate", type=float, default=5e-6)
    train.add_argument("--lr-scheduler", default="cosine")
    train.add_argument("--warmup-ratio", type=float, default=0.2)
    train.add_argument("--batch-size", type=int, default=4, help="per device, for training and evaluation")
    train.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    train.add_argument("--max-length", type=int, default=2048, help="tokens per sequence")
    train.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (-1: run all epochs)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True, help="pack short chats into full sequences")
    train.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                       help="trade ~30%% speed for much less activation memory")
    train.add_argument("--group-by-length", action="store_true",
                       help="batch chats of similar length together (less padding when not packing)")
    train.add_argument("--assistant-only-loss", action="store_true",
                       help="learn only the assistant's words (needs {%% generation %%} in the chat template)")
    train.add_argument("--eval-strategy", default="epoch", choices=["epoch", "steps", "no"])
    train.add_argument("--logging-steps", type=int, default=0,
                       help="steps between points of the loss curve (0: from the run's length, ~20 points); a value that "
                            "would draw fewer than MIN_CURVE_POINTS is lowered, so every run draws a curve")
    train.add_argument("--save-steps", type=int, default=500)
    train.add_argument("--loss-curves", type=Path, default=None,
                       help="also draw the loss curves into this PNG file (needs matplotlib; the local job sets it)")
    onnx = parser.add_argument_group("ONNX Runtime GenAI export (the CPU serving runtime; see onnx_export.py)")
    onnx.add_argument("--onnx-export", action=argparse.BooleanOptionalAction, default=True,
                      help="export the model into --model_output_dir/onnx, its precision chosen by measurement")
    onnx.add_argument("--onnx-max-perplexity-increase", type=float, default=0.05,
                      help="the most a candidate may raise perplexity per held-out chat (0.05: 5%%)")
    onnx.add_argument("--onnx-max-score-loss", type=float, default=0.03,
                      help="the most a candidate may lower F1 and ROUGE-L of the held-out answers (0.03: 3 points)")
    train.add_argument("--fast-exit", action="store_true",
                       help="end the process right after the summary, skipping Python's slow teardown of torch "
                            "(2-5 s); single-process runs only (setup_ml.py's local job uses it)")
    return parser


def is_distributed():
    """True under torchrun or Azure ML's PyTorch distribution (more than one training process)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process():
    """True on rank 0 (or when not distributed): the one process that saves and logs."""
    return int(os.environ.get("RANK", "0")) == 0


def load_chat_dataset(path):
    """Check a JSONL file and keep only `messages` (TRL reads `prompt` as a prompt/completion pair)."""
    from datasets import Dataset

    return Dataset.from_list([{"messages": record["messages"]} for record in read_chat_jsonl(path)])


def choose_method(args, use_bf16, use_cpu, train_dataset):
    """Print the memory estimate of every method and return the one to train with (before loading the weights)."""
    from transformers import AutoConfig

    requested = "lora" if args.method == "auto" and args.lora_r > 0 else args.method  # a LoRA rank asks for lora
    model_config = AutoConfig.from_pretrained(args.model_name)
    length = sequence_length(args, train_dataset)
    method, why, table = plan(model_config, requested, length, args.batch_size, use_bf16, has_cuda=not use_cpu,
                              lora_rank=args.lora_r or 16, gradient_checkpointing=args.gradient_checkpointing)
    args.memory_estimate = estimate(model_config, method, length, args.batch_size, use_bf16,
                                    args.lora_r or 16, args.gradient_checkpointing, has_cuda=not use_cpu)["total"]
    if is_main_process():
        print(f"{table}\nMethod: {why} (batches of {args.batch_size} x {length} tokens)", flush=True)
    if method == "qlora":
        try:
            import bitsandbytes  # noqa: F401 - QLoRA's 4-bit kernels
        except ImportError:
            raise MethodError("qlora needs bitsandbytes: pip install -r requirements-gpu.txt (README: your own GPU)") from None
    return method


def sequence_length(args, train_dataset):
    """The longest row a batch will hold: --max-length when packing fills every row, else the longest chat (rows are
    padded to the longest in their batch), at most --max-length."""
    if args.packing:
        return args.max_length
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_name)
    return min(args.max_length, max(len(ids(tokenizer, row["messages"])) for row in train_dataset))


def load_model_and_tokenizer(args, use_bf16):
    """Load the base model and its tokenizer, set up for args.method (for qlora: in 4-bit NF4, bitsandbytes)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    method = args.method  # resolved by choose_method(): full, lora or qlora
    quantization = {}
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        quantization["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if use_bf16 else torch.float16)
    model = AutoModelForCausalLM.from_pretrained(
        args.model_name,
        dtype=torch.bfloat16 if use_bf16 else torch.float32,
        attn_implementation=args.attn_implementation,
        use_cache=False,  # the KV cache is for generation; it conflicts with gradient checkpointing
        **quantization,
    )
    tokenizer = AutoTokenizer.from_pretrained(args.model_name)
    tokenizer.model_max_length = args.max_length
    # The tutorial pads with <unk> because old collators masked every pad-token id out of the loss, and
    # padding with the end-of-text token would then hide the end of every answer. TRL's collator masks
    # padding by position, so we keep Phi-3.5's own pad token, <|endoftext|>, a real token it was
    # trained with, rather than <unk>, which the model never sees in text.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|endoftext|>" if "<|endoftext|>" in tokenizer.get_vocab() else tokenizer.eos_token
    tokenizer.padding_side = "right"
    if method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    if method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        targets = args.lora_target_modules if args.lora_target_modules == "all-linear" else args.lora_target_modules.split(",")
        model = get_peft_model(model, LoraConfig(r=args.lora_r or 16, lora_alpha=args.lora_alpha,
                                                 lora_dropout=args.lora_dropout, target_modules=targets,
                                                 task_type="CAUSAL_LM"))
    return model, tokenizer


def plain_model(model, args):
    """The model to save: LoRA adapters merged into the weights; for qlora, into a bf16 copy of the base model
    (a 4-bit model cannot take them), so the MLflow model and serving are the same for every method."""
    if args.method != "qlora":
        return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    import tempfile

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="adapter-") as adapter:
        model.save_pretrained(adapter)  # the adapters only (a few MB)
        base = AutoModelForCausalLM.from_pretrained(args.model_name, dtype=torch.bfloat16)
        return PeftModel.from_pretrained(base, adapter).merge_and_unload()


def sft_config(args, use_bf16, use_cpu):
    """The SFTConfig: the tutorial's values, from the command line."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(args.checkpoint_dir),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler,
        warmup_steps=args.warmup_ratio,  # a float below 1 is a ratio of the total steps
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        activation_checkpointing=args.gradient_checkpointing,  # transformers 5's name for gradient checkpointing
        bf16=use_bf16,
        use_cpu=use_cpu,
        max_length=args.max_length,
        packing=args.packing,
        # Best-fit packing runs padding-free, which only FlashAttention keeps apart ("bfd_split" splits a chat
        # longer than max_length instead of dropping its end); other kernels need whole-block packing, where
        # chats share a block (as the tutorial's TRL did).
        packing_strategy="bfd_split" if args.attn_implementation.startswith("flash") else "wrapped",
        assistant_only_loss=args.assistant_only_loss,
        train_sampling_strategy="group_by_length" if args.group_by_length else "random",
        eval_strategy=args.eval_strategy,
        logging_steps=max(args.logging_steps, 1),  # plan_steps() sets the interval from the run's length
        save_steps=args.save_steps,
        save_total_limit=2,  # a Phi-3.5-mini checkpoint with optimizer state is ~45 GB
        seed=args.seed,
        report_to="none",  # metrics go to MLflow below, once, after the model is safe on disk
        disable_tqdm=not sys.stderr.isatty(),
        dataset_num_proc=None,
    )


def resolve_checkpoint(value, checkpoint_dir):
    """Turn --resume-from-checkpoint into a folder ('latest' = newest checkpoint-N in checkpoint_dir)."""
    if value in (None, ""):
        return None
    if value != "latest":
        return value
    checkpoints = sorted(Path(checkpoint_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    if not checkpoints:
        raise UsageError(f"--resume-from-checkpoint latest: no checkpoint-* folder in {checkpoint_dir}")
    return str(checkpoints[-1])


def check_output_dir(path):
    """Refuse, before any training, a model folder that already holds files (a model is never overwritten)."""
    if Path(path).is_dir() and any(Path(path).iterdir()):
        raise UsageError(f"--model_output_dir {path} is not empty: choose a new folder (a model is never overwritten)")


def count_tokens(dataset):
    """Tokens the trainer sees in one pass over a processed dataset (padding excluded)."""
    return sum(len(ids) for ids in dataset["input_ids"])


def plan_steps(trainer, args):
    """The run's optimizer steps; sets the loss curve's interval and the warmup from them, and prints the plan."""
    batches = len(trainer.get_train_dataloader())  # per process, as the Trainer counts them
    per_epoch = max(batches // args.grad_accum, 1)
    steps = args.max_steps if args.max_steps > 0 else max(math.ceil(args.epochs * per_epoch), 1)
    interval = max(steps // 20, 1) if args.logging_steps <= 0 else args.logging_steps
    if steps // interval < MIN_CURVE_POINTS:
        interval = max(steps // MIN_CURVE_POINTS, 1)  # a 9-step run logging every 20 steps would draw no curve
    trainer.args.logging_steps = interval
    # The Trainer rounds a warmup ratio up: a 1-step run would train at learning rate 0. Rounded down, a short run
    # still warms up when it has steps to spare, and its steps all learn.
    trainer.args.warmup_steps = int(args.warmup_ratio * steps) if args.warmup_ratio < 1 else int(args.warmup_ratio)
    if is_main_process():
        print(f"Plan: {steps} optimizer steps ({per_epoch} an epoch), warmup {trainer.args.warmup_steps}, learning rate "
              f"{args.learning_rate:g}, a loss-curve point every {interval} step(s)", flush=True)
    return steps


def held_out_perplexity(model, tokenizer, eval_chats):
    """Perplexity per held-out chat (answer_quality.py: the export measures its candidates the same way)."""
    was_training = model.training
    model.eval()
    try:
        scorer = TransformersScorer(model, stop_token_ids(tokenizer), tokenizer.pad_token_id, max_new_tokens=0)
        return AnswerQuality(eval_chats, tokenizer).perplexity(scorer.nll)
    finally:
        model.train(was_training)


def too_short(steps, args):
    """A warning when the run's steps x learning rate are below MIN_LEARNING for its method, else None."""
    learning = steps * args.learning_rate
    if learning >= MIN_LEARNING[args.method]:
        return None
    return (f"warning: {steps} step(s) at learning rate {args.learning_rate:g} ({learning:.1e}) are too few for that rate: "
            f"a {args.method} fine-tune needs {MIN_LEARNING[args.method]:.0e} or more to change a pretrained model's "
            "answers, so they will stay the base model's. Train longer (more data, epochs or MAX_STEPS) or at a higher "
            "rate (LoRA learns at 1e-4 to 3e-4: recipes/smollm2-135m/sft/config_lora_cpu.yaml).")


def peak_memory():
    """The process's peak memory so far, in bytes: the GPU's allocations on CUDA, else the peak resident set."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS counts bytes, Linux KiB


def save_mlflow_model(model, tokenizer, output_dir):
    """Write an MLflow transformers model (a plain model: plain_model() merged any adapters) whose signature
    accepts the generation params and whose generation config stops at the end of a turn (chat_stops.py)."""
    import mlflow
    from mlflow.models import infer_signature

    model.config.use_cache = True  # training turned it off; serving wants it
    # Every reader of the saved model (score.py's two runtimes, the ONNX export) stops where this says.
    model.generation_config.eos_token_id = stop_token_ids(tokenizer, model.generation_config.eos_token_id)
    # The pyfunc flavour formats each plain question with this, so a question gets an answer (MLflow's
    # text-generation task does not apply the chat template itself).
    prompt_template = tokenizer.apply_chat_template(
        [{"role": "user", "content": "{prompt}"}], add_generation_prompt=True, tokenize=False
    )
    signature = infer_signature(["Who founded Microsoft?"], ["An answer."], params=GENERATION_PARAMS)
    mlflow.transformers.save_model(
        transformers_model={"model": model, "tokenizer": tokenizer},
        path=str(output_dir),
        task="text-generation",
        signature=signature,
        prompt_template=prompt_template,
        pip_requirements=[f"{name}=={version(name).split('+')[0]}" for name in MODEL_REQUIREMENTS],  # drop "+cpu"
    )


def main(argv=None):
    """The SFT recipe: load the data, load the model, train, save, export, report; returns the exit code."""
    return run(parse_args(argv))


def run(args):
    """main() with its options parsed."""
    started = time.perf_counter()
    os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")  # no Trainer autolog: Azure ML caps run params
    if Path(args.model_name).is_dir():
        # A local base model needs no Hub: absolute, so no library mistakes "models/x" for a Hub id, and
        # offline, so nothing (MLflow's model-card lookup) waits on Hub retries.
        args.model_name = str(Path(args.model_name).resolve())
        os.environ.setdefault("HF_HUB_OFFLINE", "1")

    # --- Load the data (checked before any weight is loaded) ---
    try:
        train_dataset = load_chat_dataset(args.train_file)
        eval_dataset = load_chat_dataset(args.eval_file)
        resume = resolve_checkpoint(args.resume_from_checkpoint, args.checkpoint_dir)
        check_output_dir(args.model_output_dir)
    except (ChatDataError, UsageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    import torch
    from transformers.utils import logging as transformers_logging
    from trl import SFTTrainer

    transformers_logging.set_verbosity_error()
    use_cpu = not torch.cuda.is_available()
    if use_cpu and args.require_gpu:
        print(f"error: --require-gpu, and torch {torch.__version__} (CUDA build {torch.version.cuda}) sees no GPU: "
              "the GPU driver may be older than that CUDA build (see the warning above) or the node has no GPU. "
              "Install a torch built for the node's CUDA (conda.yml), or drop --require-gpu to train on the CPU.",
              file=sys.stderr)
        return 3
    use_bf16 = not use_cpu and torch.cuda.is_bf16_supported()  # A100/H100 yes; CPU and older GPUs: fp32
    try:
        args.method = choose_method(args, use_bf16, use_cpu, train_dataset)  # once, before any weight is loaded
    except MethodError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    # --- Load the model ---
    model, tokenizer = load_model_and_tokenizer(args, use_bf16)
    trainer = SFTTrainer(model=model, args=sft_config(args, use_bf16, use_cpu), train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=tokenizer)
    tracker = LiveMetrics(args) if is_main_process() else None
    if tracker:
        trainer.add_callback(tracker.callback())

    # --- Train (evaluated before and after) ---
    steps = plan_steps(trainer, args)
    warning = too_short(steps, args) if is_main_process() else None
    if warning:  # before anything is spent on it: Ctrl+C now costs nothing
        print(warning, file=sys.stderr, flush=True)
    eval_chats = [row["messages"] for row in eval_dataset]
    eval_loss_before = trainer.evaluate()["eval_loss"]
    perplexity_before = held_out_perplexity(trainer.model, tokenizer, eval_chats) if is_main_process() else None
    if resume and is_main_process():
        print(f"Resuming from {resume}")
    train_result = trainer.train(resume_from_checkpoint=resume)
    last_log = trainer.state.log_history[-2] if len(trainer.state.log_history) > 1 else {}
    eval_loss_after = (last_log["eval_loss"] if last_log.get("step") == trainer.state.global_step and "eval_loss" in last_log
                       else trainer.evaluate()["eval_loss"])  # the last epoch's evaluation, when it was at the last step
    if not is_main_process():
        return 0
    perplexity_after = held_out_perplexity(trainer.model, tokenizer, eval_chats)
    memory = {"peak_memory_bytes": peak_memory(), "memory_estimate_bytes": args.memory_estimate}

    # --- Save the model first: nothing after this may lose it ---
    try:
        save_mlflow_model(plain_model(trainer.model, args), tokenizer, args.model_output_dir)
    except Exception as error:  # noqa: BLE001 - safetensors reports a full disk as its own error type
        if not is_disk_full(error):
            raise
        shutil.rmtree(args.model_output_dir, ignore_errors=True)  # half a model must never be registered
        print(f"error: no room to save the model in {args.model_output_dir} ({error}): free some disk space and run "
              "the job again; nothing was kept.", file=sys.stderr)
        return 4

    # --- Export it for CPUs (optional: a failure is a warning) ---
    metrics = summary_metrics(trainer, train_result, eval_loss_before, eval_loss_after, count_tokens)
    metrics.update(memory, perplexity_before=perplexity_before, perplexity_after=perplexity_after, planned_steps=steps)
    log_history = trainer.state.log_history
    del trainer, model  # the export loads the model again: its memory goes back first
    gc.collect()
    export_started = time.perf_counter()
    onnx_record = export_for_cpus(args) if args.onnx_export else None
    metrics["export_seconds"] = time.perf_counter() - export_started if onnx_record else 0.0

    # --- Report (optional: a failure is a warning, not a failed job) ---
    metrics["wall_time_seconds"] = time.perf_counter() - started
    report(tracker, metrics, log_history, args.model_output_dir, args.loss_curves,
           summary_line(onnx_record) if onnx_record else None)
    return 0


def export_for_cpus(args):
    """The ONNX Runtime GenAI export (onnx_export.py); a failure is a warning: the MLflow model is already safe."""
    print("Exporting for ONNX Runtime GenAI (candidates fastest first, each against the unquantized model on held-out chats)")
    try:
        return export_onnx(args.model_output_dir, args.eval_file, args.onnx_max_perplexity_increase,
                           args.onnx_max_score_loss)
    except Exception as error:  # noqa: BLE001 - the job's model must not be lost to an optional export
        warnings.warn(f"No ONNX export ({type(error).__name__}: {error}); score.py serves with transformers")
        return None


def exit_now(code):
    """End the process at once: exit handlers run and output is flushed, but the interpreter is not torn down."""
    atexit._run_exitfuncs()  # what a normal exit runs first (logging.shutdown, MLflow's flushes, ...)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    options = parse_args()
    exit_code = run(options)
    if options.fast_exit and not is_distributed():
        exit_now(exit_code)
    sys.exit(exit_code)
