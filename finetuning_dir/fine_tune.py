"""Fine-tune Phi-3 with TRL's SFTTrainer and write an MLflow model — the training job of step 2.

    python finetuning_dir/fine_tune.py --train-file data/train_data.jsonl --eval-file data/test_data.jsonl \\
        --model_output_dir outputs/model_output

setup_ml.py runs this for you, as an Azure ML command job (TARGET=azure) or as a local process. The
defaults are the tutorial's: microsoft/Phi-3.5-mini-instruct, 3 epochs, lr 5e-6, cosine schedule, warmup
0.2, batch 4, gradient checkpointing, packing, max length 2048, seed 0 — except the attention kernel: sdpa,
which computes what the tutorial's eager attention computes, faster (measured in bench/train_throughput.py).
Under torchrun or Azure ML's PyTorch distribution it trains on every process; only rank 0 saves the model
and logs metrics.

Writes an MLflow transformers model into --model_output_dir (checkpoints go to --checkpoint-dir) and
prints eval loss and perplexity before -> after, train loss, tokens/s and wall time. Then it exports the
model for ONNX Runtime GenAI into the same folder, its precision chosen by measurement (onnx_export.py;
--no-onnx-export skips it): score.py serves that export on CPUs.
"""

import argparse
import atexit
import math
import os
import sys
import time
import warnings
from importlib.metadata import version
from pathlib import Path

if __package__:  # imported from the project (tests, benchmarks): one module name, finetuning_dir.chat_data
    from .chat_data import ChatDataError, read_chat_jsonl
    from .memory_estimate import MethodError, plan
    from .onnx_export import export_onnx, summary_line
else:  # run as a script, as in the job, whose code folder is this one
    from chat_data import ChatDataError, read_chat_jsonl
    from memory_estimate import MethodError, plan
    from onnx_export import export_onnx, summary_line

TUTORIAL_BASE_MODEL = "microsoft/Phi-3.5-mini-instruct"
# Params a caller may send with each request; a signature with a params schema makes MLflow honour them.
GENERATION_PARAMS = {"max_new_tokens": 128, "temperature": 0.7, "top_p": 1.0, "do_sample": False, "return_full_text": False}
# What the saved model needs to load and serve; pinned to the versions that trained it.
MODEL_REQUIREMENTS = ("torch", "transformers", "accelerate", "tokenizers", "safetensors", "mlflow")


class UsageError(ValueError):
    """An option that cannot be used as given (a checkpoint to resume, an output folder); checked before training."""


def parse_args(argv=None):
    """The tutorial's CLI (--train-file, --eval-file, --model_output_dir) plus the knobs users need."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    train.add_argument("--logging-steps", type=int, default=20)
    train.add_argument("--save-steps", type=int, default=500)
    train.add_argument("--loss-curves", type=Path, default=None,
                       help="also draw the loss curves into this PNG file (needs matplotlib; the local job sets it)")
    onnx = parser.add_argument_group("ONNX Runtime GenAI export (the CPU serving runtime; see onnx_export.py)")
    onnx.add_argument("--onnx-export", action=argparse.BooleanOptionalAction, default=True,
                      help="export the model into --model_output_dir/onnx, its precision chosen by measurement")
    onnx.add_argument("--onnx-min-identical", type=float, default=1.0,
                      help="share of held-out greedy answers a precision must keep identical to transformers'")
    onnx.add_argument("--onnx-max-perplexity-increase", type=float, default=0.01,
                      help="the most a precision may raise held-out perplexity (0.01: 1%%)")
    train.add_argument("--fast-exit", action="store_true",
                       help="end the process right after the summary, skipping Python's slow teardown of torch "
                            "(2-5 s); single-process runs only (setup_ml.py's local job uses it)")
    return parser.parse_args(argv)


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


def choose_method(args, use_bf16, use_cpu):
    """Print the memory estimate of every method and return the one to train with (before loading the weights)."""
    from transformers import AutoConfig

    requested = "lora" if args.method == "auto" and args.lora_r > 0 else args.method
    method, why, table = plan(AutoConfig.from_pretrained(args.model_name), requested, args.max_length,
                              args.batch_size, use_bf16, has_cuda=not use_cpu, lora_rank=args.lora_r or 16,
                              gradient_checkpointing=args.gradient_checkpointing)
    if is_main_process():
        print(f"{table}\nMethod: {why}", flush=True)
    if method == "qlora":
        try:
            import bitsandbytes  # noqa: F401 - QLoRA's 4-bit kernels
        except ImportError:
            raise MethodError("qlora needs bitsandbytes: pip install -r requirements-gpu.txt (README: your own GPU)") from None
    return method


def load_model_and_tokenizer(args, use_bf16):
    """Load the base model and its tokenizer, set up for training (for qlora: in 4-bit NF4, bitsandbytes)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    method = args.method if args.method != "auto" else ("lora" if args.lora_r > 0 else "full")  # as choose_method
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
        logging_steps=args.logging_steps,
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


def save_mlflow_model(model, tokenizer, output_dir):
    """Write an MLflow transformers model whose signature accepts the generation params."""
    import mlflow
    from mlflow.models import infer_signature

    if hasattr(model, "merge_and_unload"):  # LoRA: fold the adapters in, so the output is a plain model
        model = model.merge_and_unload()
    model.config.use_cache = True  # training turned it off; serving wants it
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


class LiveMetrics:
    """The job's MLflow run, open while it trains: parameters first, then metrics as the Trainer logs them, so
    Azure ML's studio (and `make studio` locally) draws the curves live. No Hugging Face autolog: Azure ML caps a
    run's parameters at 100. A tracking failure warns once and stops logging; it never fails the training."""

    def __init__(self, args):
        self.failed = False
        self.last_tokens = None  # (tokens seen, time) at the last log, for tokens/s
        self.call(self._start, args)

    def _start(self, args):
        """Open the run (inside an Azure ML job: the job's own run) and log the parameters."""
        import mlflow

        mlflow.start_run(run_name=os.environ.get("FINETUNE_RUN_NAME"))
        mlflow.log_params({
            "base_model": args.model_name, "epochs": args.epochs, "learning_rate": args.learning_rate,
            "batch_size": args.batch_size, "grad_accum": args.grad_accum, "max_length": args.max_length,
            "method": args.method, "lora_r": args.lora_r, "seed": args.seed, "packing": args.packing,
            "attn_implementation": args.attn_implementation,
        })

    def call(self, function, *args):
        """Run one tracking call; the first failure is a warning and ends the logging."""
        if self.failed:
            return
        try:
            function(*args)
        except Exception as error:  # noqa: BLE001 - any tracking-server problem must not fail the training
            self.failed = True
            warnings.warn(f"MLflow logging stopped; training goes on. ({type(error).__name__}: {error})")

    def log(self, metrics, step):
        """Log numbers at a training step."""
        import mlflow

        numbers = {key: value for key, value in metrics.items() if isinstance(value, (int, float))}
        self.call(lambda: mlflow.log_metrics(numbers, step=step))

    def on_trainer_log(self, logs, step):
        """What the Trainer logs every --logging-steps: loss, learning rate, eval loss, and tokens/s since the last."""
        figures = {key: logs[key] for key in ("loss", "eval_loss", "learning_rate", "grad_norm") if key in logs}
        now, tokens = time.perf_counter(), logs.get("num_tokens")
        if isinstance(tokens, (int, float)):
            if self.last_tokens and now > self.last_tokens[1]:
                figures["tokens_per_second"] = (tokens - self.last_tokens[0]) / (now - self.last_tokens[1])
            self.last_tokens = (tokens, now)
        self.log(figures, step)

    def callback(self):
        """A TrainerCallback that hands each log of rank 0 to on_trainer_log."""
        from transformers import TrainerCallback

        tracker = self

        class LogToMlflow(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if state.is_world_process_zero and logs:
                    tracker.on_trainer_log(logs, state.global_step)

        return LogToMlflow()

    def finish(self, metrics):
        """Log the summary figures and close the run."""
        import mlflow

        self.log({key: value for key, value in metrics.items() if key != "global_step"}, metrics["global_step"])
        self.call(mlflow.end_run)


def plot_loss_curves(log_history, eval_before, eval_after, path):
    """The training loss per logging step and the eval loss (before, per epoch, after) as a PNG (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    evals = [(0, eval_before)] + [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry]
    evals.append((max([step for step, _ in train + evals] or [0]), eval_after))
    figure, axes = pyplot.subplots(figsize=(7, 4), dpi=100)
    if train:
        axes.plot(*zip(*train), label="training loss", color="tab:blue")
    axes.plot(*zip(*evals), "o--", label="eval loss (test chats)", color="tab:orange")
    axes.set(xlabel="step", ylabel="loss", title="Fine-tuning: loss", yscale="log")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    pyplot.close(figure)


def print_summary(metrics, output_dir):
    """The closing summary a reader looks for."""
    print("\nFine-tuning summary")
    print(f"  eval loss    {metrics['eval_loss_before']:.4f} -> {metrics['eval_loss_after']:.4f}")
    print(f"  perplexity   {metrics['perplexity_before']:.2f} -> {metrics['perplexity_after']:.2f}")
    print(f"  train loss   {metrics['train_loss']:.4f} ({metrics['global_step']} steps)")
    print(f"  tokens/s     {metrics['train_tokens_per_second']:,.0f} ({metrics['train_tokens']:,} tokens, {metrics['world_size']} process(es))")
    print(f"  wall time    {metrics['wall_time_seconds']:.1f} s (training {metrics['train_runtime_seconds']:.1f} s)")
    print(f"  model        {output_dir} (MLflow model)")


def main(argv=None):
    """Check data, load the model, evaluate, train, evaluate, save, log."""
    started = time.perf_counter()
    args = parse_args(argv)
    os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")  # no Trainer autolog: Azure ML caps run params
    if Path(args.model_name).is_dir():
        # A local base model needs no Hub: absolute, so no library mistakes "models/x" for a Hub id, and
        # offline, so nothing (MLflow's model-card lookup) waits on Hub retries.
        args.model_name = str(Path(args.model_name).resolve())
        os.environ.setdefault("HF_HUB_OFFLINE", "1")

    # --- Check the data (before the model is loaded) ---
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
        args.method = choose_method(args, use_bf16, use_cpu)  # before any weight is loaded
    except MethodError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    # --- Load the base model ---
    model, tokenizer = load_model_and_tokenizer(args, use_bf16)
    trainer = SFTTrainer(model=model, args=sft_config(args, use_bf16, use_cpu), train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=tokenizer)
    world_size = trainer.args.world_size
    tracker = LiveMetrics(args) if is_main_process() else None
    if tracker:
        trainer.add_callback(tracker.callback())

    # --- Evaluate, train, evaluate ---
    eval_loss_before = trainer.evaluate()["eval_loss"]
    if resume and is_main_process():
        print(f"Resuming from {resume}")
    train_result = trainer.train(resume_from_checkpoint=resume)
    eval_loss_after = trainer.evaluate()["eval_loss"]
    if not is_main_process():
        return 0

    epochs_done = trainer.state.epoch or 0.0
    train_tokens = int(count_tokens(trainer.train_dataset) * epochs_done)
    runtime = train_result.metrics["train_runtime"]
    metrics = {
        "eval_loss_before": eval_loss_before, "eval_loss_after": eval_loss_after,
        "perplexity_before": math.exp(min(eval_loss_before, 50)), "perplexity_after": math.exp(min(eval_loss_after, 50)),
        "train_loss": train_result.training_loss, "train_tokens": train_tokens,
        "train_tokens_per_second": train_tokens / runtime if runtime else 0.0, "train_runtime_seconds": runtime,
        "global_step": trainer.state.global_step, "world_size": world_size,
    }

    # --- Save the model first: nothing after this may lose it ---
    save_mlflow_model(plain_model(trainer.model, args), tokenizer, args.model_output_dir)
    onnx_record = export_for_cpus(args) if args.onnx_export else None
    metrics["wall_time_seconds"] = time.perf_counter() - started

    # --- Log the summary and the pictures (optional: a failure is a warning, not a failed job) ---
    tracker.finish(metrics)
    if args.loss_curves:
        try:
            plot_loss_curves(trainer.state.log_history, eval_loss_before, eval_loss_after, args.loss_curves)
        except Exception as error:  # noqa: BLE001 - a picture is not worth a failed job
            warnings.warn(f"Could not draw {args.loss_curves} ({type(error).__name__}: {error})")
            args.loss_curves = None
    print_summary(metrics, args.model_output_dir)
    if onnx_record:
        print(f"  onnx export  {summary_line(onnx_record)}")
    if args.loss_curves:
        print(f"  loss curves  {args.loss_curves}")
    return 0


def export_for_cpus(args):
    """The ONNX Runtime GenAI export (onnx_export.py); a failure is a warning: the MLflow model is already safe."""
    print("Exporting for ONNX Runtime GenAI (each precision against transformers on held-out chats)")
    try:
        return export_onnx(args.model_output_dir, args.eval_file, args.onnx_min_identical,
                           args.onnx_max_perplexity_increase)
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
    exit_code = main()
    if parse_args().fast_exit and not is_distributed():
        exit_now(exit_code)
    sys.exit(exit_code)
