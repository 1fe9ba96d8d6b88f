"""What the training job reports, beside the recipe: live metrics in MLflow, the loss curves, the closing summary.

fine_tune.py uses it; so does nothing else. Reporting never fails a job: a tracking or drawing failure is a
warning (the model is saved before any of it).
"""

import os
import time
import warnings
from pathlib import Path

GIB = 1024 ** 3


def summary_metrics(trainer, train_result, eval_loss_before, eval_loss_after, count_tokens):
    """The run's figures: the trainer's eval loss before -> after, train loss, tokens and tokens/s, steps (fine_tune.py
    adds perplexity per held-out chat, memory and the export's time)."""
    train_tokens = int(count_tokens(trainer.train_dataset) * (trainer.state.epoch or 0.0))
    runtime = train_result.metrics["train_runtime"]
    return {
        "eval_loss_before": eval_loss_before, "eval_loss_after": eval_loss_after,
        "train_loss": train_result.training_loss, "train_tokens": train_tokens,
        "train_tokens_per_second": train_tokens / runtime if runtime else 0.0, "train_runtime_seconds": runtime,
        "global_step": trainer.state.global_step, "world_size": trainer.args.world_size,
    }


def report(tracker, metrics, log_history, output_dir, loss_curves=None, onnx_line=None):
    """Close the MLflow run with the summary, draw the loss curves (when asked), print the summary."""
    tracker.finish(metrics)
    if loss_curves:
        try:
            plot_loss_curves(log_history, metrics["eval_loss_before"], metrics["eval_loss_after"], loss_curves)
        except Exception as error:  # noqa: BLE001 - a picture is not worth a failed job
            warnings.warn(f"Could not draw {loss_curves} ({type(error).__name__}: {error})")
            loss_curves = None
    print_summary(metrics, output_dir)
    if onnx_line:
        print(f"  onnx export  {onnx_line}")
    if loss_curves:
        print(f"  loss curves  {loss_curves}")


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
    print(f"  eval loss    {metrics['eval_loss_before']:.4f} -> {metrics['eval_loss_after']:.4f} (the trainer's: packed "
          "or padded batches, as trained)")
    print(f"  perplexity   {metrics['perplexity_before']:.2f} -> {metrics['perplexity_after']:.2f} (per held-out chat; "
          "the ONNX export is measured the same way)")
    print(f"  train loss   {metrics['train_loss']:.4f} ({metrics['global_step']} steps)")
    print(f"  tokens/s     {metrics['train_tokens_per_second']:,.0f} ({metrics['train_tokens']:,} tokens, {metrics['world_size']} process(es))")
    print(f"  memory       peak {metrics['peak_memory_bytes'] / GIB:.2f} GiB measured, {metrics['memory_estimate_bytes'] / GIB:.2f} "
          f"GiB estimated ({metrics['memory_estimate_bytes'] / metrics['peak_memory_bytes'] - 1:+.0%})")
    export = metrics.get("export_seconds") or 0.0
    print(f"  wall time    {metrics['wall_time_seconds']:.1f} s (training {metrics['train_runtime_seconds']:.1f} s"
          + (f", ONNX export {export:.1f} s = {export / metrics['wall_time_seconds']:.0%} of the job)" if export else ")"))
    print(f"  model        {output_dir} (MLflow model)")
