"""Evaluate the flow on the test chats: a Prompt flow batch run, scored with azure-ai-evaluation, logged to MLflow.

    python evaluate_flow.py                    # every row of data/test_data.jsonl, endpoint from .env
    python evaluate_flow.py --limit 20         # the first 20 rows: a quick look
    python evaluate_flow.py --compare-base     # also the untrained base model (TARGET=local), side by side
    python evaluate_flow.py --nltk-metrics     # also BLEU, GLEU, METEOR (their NLTK data is downloaded once)
    OTHER_KEY=... python evaluate_flow.py --endpoint-url https://other.eastus2.inference.ml.azure.com/score \\
        --api-key-env OTHER_KEY --label other  # also any second endpoint (e.g. on Azure), side by side
    make studio                                # MLflow's UI: experiment phi-3-evaluation, one run per endpoint

Each test chat's first user turn is asked through flow.dag.yml with `pf.run` (Prompt flow's batch run; latency is
its duration of each line, the endpoint round trip: lines run one after another, --workers 1). azure-ai-evaluation's
`evaluate()` scores each answer against the chat's first assistant turn (helpers/metrics.py: exact match, F1, ROUGE-L; a
line without an answer scores 0). Each endpoint's evaluation is an MLflow run in MLFLOW_TRACKING_URI.

Writes outputs/eval/questions.jsonl; per endpoint outputs/eval/<label>/ rows.jsonl (per question: answer, reference,
scores, latency_s, error), evaluation_results.json and evaluate.log (evaluate()'s output and run summaries),
summary.md; outputs/eval/summary.md (side by side, printed), comparison.png and mlruns/ (the runs' artifacts).
"""

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import config
from helpers import metrics
from helpers.errors import StepError, exit_code

FLOW_DIR = config.PROJECT_DIR  # flow.dag.yml
DEFAULT_OUTPUT_DIR = config.PROJECT_DIR / "outputs" / "eval"
EXPERIMENT_NAME = "phi-3-evaluation"  # the MLflow experiment of these runs (training logs to AZURE_EXPERIMENT_NAME)


def write_jsonl(path, rows):
    """Write rows as JSON lines; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


# --- Test data ------------------------------------------------------------------------------------
def first_exchange(messages):
    """The first user turn and the assistant turn that answers it, or None."""
    for i, message in enumerate(messages[:-1]):
        if message.get("role") == "user" and messages[i + 1].get("role") == "assistant":
            return message["content"], messages[i + 1]["content"]
    return None


def write_questions(data_path, output_path, limit=None):
    """Map each test chat to {input_data, reference} (its first exchange) in a JSONL file; returns the rows."""
    data_path = Path(data_path)
    if not data_path.is_file():
        raise StepError(f"no test data at {config.shown(data_path)}: run `python download_dataset.py` first")
    rows = []
    for line in data_path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            exchange = first_exchange(json.loads(line).get("messages", []))
            if exchange:
                rows.append({"input_data": exchange[0], "reference": exchange[1]})
        if limit and len(rows) >= limit:
            break
    if not rows:
        raise StepError(f"{config.shown(data_path)} has no chat with a user turn and its answer")
    write_jsonl(output_path, rows)
    return rows


# --- One batch run of the flow --------------------------------------------------------------------
def answers_of(run, questions):
    """One row per question: its reference, the flow's answer ("" when the line failed), latency and error."""
    records = {}  # Prompt flow's record of each line: run_info (status, output, error, duration)
    for path in sorted((Path(run.properties["output_path"]) / "flow_artifacts").glob("*.jsonl")):
        for record in map(json.loads, filter(str.strip, path.read_text(encoding="utf-8").splitlines())):
            records[record["line_number"]] = record["run_info"]
    rows = []
    for number, question in enumerate(questions):
        info = records.get(number) or {}
        answer, error = (info.get("output") or {}).get("answer"), None
        if info.get("status") != "Completed" or not isinstance(answer, str):
            error = ((info.get("error") or {}).get("message") or f"line {number} has no answer").strip()
            answer = ""  # scored like a wrong answer: 0
        rows.append({"line": number, "question": question["input_data"], "reference": question["reference"],
                     "answer": answer, "latency_s": (info.get("system_metrics") or {}).get("duration"), "error": error})
    return rows


def batch_run(pf, label, questions_path, questions, endpoint_url, api_key=None, workers=1):
    """Batch-run the flow over the questions against one endpoint (api_key None: .env's); returns (rows, run name)."""
    values = {"PF_WORKER_COUNT": str(workers)}  # lines run at once; Prompt flow's default is 4
    if api_key is not None:
        values.update({"AZURE_ML_ENDPOINT": endpoint_url, "AZURE_ML_API_KEY": api_key})
    print(f"\n=== {label}: {len(questions)} question(s) -> {endpoint_url}")
    # Not pf.run(environment_variables=...): Prompt flow would store the key in its run records (~/.promptflow).
    with mock.patch.dict(os.environ, values):
        run = pf.run(flow=FLOW_DIR, data=str(questions_path),
                     column_mapping={"input_data": "${data.input_data}"},  # chat_history keeps its default: []
                     display_name=f"evaluate_flow {label}", tags={"label": label, "endpoint": endpoint_url}, stream=False)
    if run.status != "Completed":
        raise StepError(f"the batch run {run.name} {run.status}; its log: {run.properties['output_path']}/logs.txt")
    return answers_of(run, questions), run.name


# --- Scores (azure-ai-evaluation) and records (files, MLflow) -------------------------------------
def score_answers(rows, folder, nltk_metrics=False):
    """Score each answer against its reference with azure-ai-evaluation's evaluate(); adds the scores to rows."""
    from azure.ai.evaluation import evaluate

    # evaluate() prints each evaluator's run summary (to evaluate.log); 1.18.10 warns none has an aggregate (none needs one)
    logging.getLogger("run").addFilter(lambda record: "Aggregated metrics for evaluator" not in record.getMessage())
    data, log_path = write_jsonl(folder / "rows.jsonl", rows), folder / "evaluate.log"  # rewritten with the scores
    with open(log_path, "w", encoding="utf-8") as log, contextlib.redirect_stdout(log):
        result = evaluate(data=data, evaluators=metrics.evaluators(nltk_metrics), evaluator_config=metrics.COLUMN_MAPPING,
                          output_path=folder / "evaluation_results.json")
    scored = {row["inputs.line"]: metrics.scores_of(row) for row in result["rows"]}
    for row in rows:
        row.update(scored[row["line"]])
        if None in scored[row["line"]].values():
            raise StepError(f"evaluate() could not score line {row['line']}: see {config.shown(log_path)}")
    write_jsonl(data, rows)
    return rows


def log_runs(evaluations, chart, output_dir):
    """One MLflow run per endpoint: params (never the key), metrics, the per-question table, its files, the chart."""
    import mlflow

    mlflow.set_tracking_uri(config.MLFLOW_TRACKING_URI)
    experiment = mlflow.get_experiment_by_name(EXPERIMENT_NAME)
    # MLflow's default artifact folder is ./mlruns of wherever the command runs: keep them beside the results.
    experiment_id = experiment.experiment_id if experiment else mlflow.create_experiment(
        EXPERIMENT_NAME, artifact_location=(output_dir / "mlruns").as_uri())
    run_ids = {}
    for label, (rows, summary, params, folder) in evaluations.items():
        with mlflow.start_run(experiment_id=experiment_id, run_name=label) as run:
            mlflow.log_params({"label": label, **params, "rows": summary["rows"]})
            mlflow.log_metrics({name: value for name, value in summary.items() if name != "rows" and value is not None})
            mlflow.log_table({column: [row[column] for row in rows] for column in rows[0]}, artifact_file="rows.json")
            mlflow.log_artifacts(str(folder), artifact_path=label)
            mlflow.log_artifact(str(chart))
        run_ids[label] = run.info.run_id
    return run_ids


# --- The base model behind a temporary local endpoint ---------------------------------------------
@contextlib.contextmanager
def base_model_endpoint():
    """Serve the untrained base model (LOCAL_BASE_MODEL) on a free port with a fresh key; yields (url, key)."""
    from stand_ins.endpoint_process import serve_model
    from stand_ins.job_runner import base_model_folder
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="base-model-") as folder:
        log_path = Path(folder) / "endpoint.log"
        try:
            with serve_model(base_model_folder(), log_path) as endpoint:
                print(f"Base model served at {endpoint.url} ({time.perf_counter() - started:.1f} s to load)")
                yield endpoint.url, endpoint.key
        except StepError as error:
            tail = log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
            raise StepError(f"the base model's endpoint did not start: {error}\n{tail}") from None


# --- Main -----------------------------------------------------------------------------------------
def parse_args(argv=None):
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=config.TEST_DATA_PATH, help="test chats (default: TEST_DATA_PATH)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N chats")
    parser.add_argument("--compare-base", action="store_true", help="also the base model, on a temporary local endpoint")
    parser.add_argument("--endpoint-url", default=None, help="also evaluate this endpoint (its scoring URL)")
    parser.add_argument("--api-key-env", default=None, help="the variable holding --endpoint-url's key (never the key)")
    parser.add_argument("--label", default="other", help="column name for --endpoint-url (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=1, help="questions in flight (latency then includes queueing)")
    parser.add_argument("--nltk-metrics", action="store_true", help="also BLEU, GLEU, METEOR (need NLTK data)")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR, help="default: outputs/eval")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if bool(args.endpoint_url) != bool(args.api_key_env):
        parser.error("--endpoint-url and --api-key-env go together")
    if args.api_key_env and not os.environ.get(args.api_key_env, "").strip():
        parser.error(f"the environment variable {args.api_key_env} (--api-key-env) is not set")
    if args.label in ("fine-tuned", "base") or not re.fullmatch(r"[\w.-]+", args.label):
        parser.error("--label must be a plain name (letters, digits, - _ .) other than fine-tuned and base")
    if args.compare_base and config.TARGET != "local":
        parser.error("--compare-base serves the local tiny base model; to compare with a base model on Azure, "
                     "deploy it and pass --endpoint-url and --api-key-env")
    if args.nltk_metrics and (missing := metrics.missing_nltk_data()):
        parser.error("--nltk-metrics needs NLTK data that is neither installed nor downloadable now (offline?): run "
                     f"`python -m nltk.downloader {' '.join(missing)}` with internet access, or leave out --nltk-metrics")
    return args


def main(argv=None):
    """Evaluate the fine-tuned endpoint (and the base model or another endpoint), print the table, draw the bars."""
    args = parse_args(argv)
    try:
        return evaluate(args)
    except StepError as error:  # config.MissingSettingsError included
        return exit_code(error)


def evaluate(args):
    """Ask every target the test questions through the flow, score the answers, write the table and the picture."""
    # A missing setting fails here, before Prompt flow starts.
    endpoint_url, _ = config.fresh("AZURE_ML_ENDPOINT", "AZURE_ML_API_KEY", hint="`python deploy_model.py` writes them")
    from promptflow.client import PFClient

    output_dir = args.output_dir.resolve()
    questions_path = output_dir / "questions.jsonl"
    questions = write_questions(args.data, questions_path, args.limit)
    print(f"{len(questions)} question(s) from {config.shown(args.data)} -> {config.shown(questions_path)}")
    pf = PFClient()
    targets = [("fine-tuned", endpoint_url, None)]
    if args.endpoint_url:
        targets.append((args.label, args.endpoint_url, os.environ[args.api_key_env].strip()))
    evaluations = {}  # label -> (rows, summary, MLflow params, folder)
    with contextlib.ExitStack() as stack:
        if args.compare_base:
            targets.insert(1, ("base", *stack.enter_context(base_model_endpoint())))
        for label, url, key in targets:
            rows, run_name = batch_run(pf, label, questions_path, questions, url, key, args.workers)
            folder = output_dir / label
            summary = metrics.summarize(score_answers(rows, folder, args.nltk_metrics))
            (folder / "summary.md").write_text(f"# {label}\n\nEndpoint: {url}  \nPrompt flow run: {run_name}\n\n"
                                               + metrics.summary_table({label: summary}), encoding="utf-8")
            params = {"endpoint_url": url, "data": config.shown(args.data), "promptflow_run": run_name}
            evaluations[label] = (rows, summary, params, folder)
            print(f"{label}: {config.shown(folder / 'rows.jsonl')}, {config.shown(folder / 'summary.md')}")
            if failed := [row for row in rows if row["error"]]:
                print(f"  {len(failed)} error(s); the first (line {failed[0]['line']}): {failed[0]['error'][:300]}")
    summaries = {label: summary for label, (_, summary, _, _) in evaluations.items()}
    table = metrics.summary_table(summaries)
    (output_dir / "summary.md").write_text(f"# Evaluation of {config.shown(args.data)}\n\n{table}", encoding="utf-8")
    chart = metrics.comparison_chart(summaries, output_dir / "comparison.png")
    run_ids = log_runs(evaluations, chart, output_dir)
    print(f"\n{table}\nWritten to {config.shown(output_dir / 'summary.md')}; the picture: {config.shown(chart)}")
    print(f"MLflow experiment {EXPERIMENT_NAME}, runs " + ", ".join(f"{label} {run}" for label, run in run_ids.items())
          + "; to see them: make studio")
    return 0


if __name__ == "__main__":
    sys.exit(main())
