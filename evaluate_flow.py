"""Evaluate the flow on the test chats with a Prompt flow batch run: token F1, exact match, latency, errors.

    python evaluate_flow.py                    # every row of data/test_data.jsonl, endpoint from .env
    python evaluate_flow.py --limit 20         # the first 20 rows: a quick look
    python evaluate_flow.py --compare-base     # also the untrained base model (TARGET=local), side by side
    OTHER_KEY=... python evaluate_flow.py --endpoint-url https://other.eastus2.inference.ml.azure.com/score \\
        --api-key-env OTHER_KEY --label other  # also any second endpoint (e.g. on Azure), side by side

Each test chat's first user turn is asked through flow.dag.yml with `pf.run` (Prompt flow's batch run, one
line per question) and the answer is scored against the chat's first assistant turn: exact match and token
F1 after lower-casing and dropping punctuation and articles (SQuAD's normalization). Latency is Prompt flow's
own duration of each line, i.e. the endpoint round trip including retries; lines run one after another
(--workers 1), so it is the endpoint's latency, not time spent queueing behind our own requests.

Writes outputs/eval/questions.jsonl (what was asked), outputs/eval/<label>/rows.jsonl (one line per question:
answer, reference, f1, exact_match, latency_s, error), outputs/eval/<label>/summary.md, and
outputs/eval/summary.md (all endpoints side by side), and prints that table.

--compare-base serves the untrained base model (LOCAL_BASE_MODEL_DIR, a plain transformers folder) with the
local endpoint's server on a free port and a key of its own (stand_ins.endpoint_process.serve_model), points
the flow at it for that run only (through environment variables of this process) and stops it afterwards.
"""

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import config
from metrics import exact_match, summarize, summary_table, token_f1

FLOW_DIR = config.PROJECT_DIR  # flow.dag.yml
DEFAULT_OUTPUT_DIR = config.PROJECT_DIR / "outputs" / "eval"

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
        raise SystemExit(f"error: no test data at {config.shown(data_path)}: run `python download_dataset.py` first")
    rows = []
    for line in data_path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            exchange = first_exchange(json.loads(line).get("messages", []))
            if exchange:
                rows.append({"input_data": exchange[0], "reference": exchange[1]})
        if limit and len(rows) >= limit:
            break
    if not rows:
        raise SystemExit(f"error: {config.shown(data_path)} has no chat with a user turn and its answer")
    output_path.parent.mkdir(parents=True, exist_ok=True)
    output_path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return rows


# --- One batch run --------------------------------------------------------------------------------
def line_records(run):
    """Prompt flow's record of each line of a run: {line number: run_info} (status, output, error, duration)."""
    folder = Path(run.properties["output_path"]) / "flow_artifacts"
    records = {}
    for path in sorted(folder.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                records[record["line_number"]] = record["run_info"]
    return records


def score_run(run, questions):
    """One result row per question: the answer, its scores, latency and error."""
    records = line_records(run)
    rows = []
    for number, question in enumerate(questions):
        info = records.get(number) or {}
        answer = (info.get("output") or {}).get("answer")
        error = None
        if info.get("status") != "Completed" or not isinstance(answer, str):
            error = ((info.get("error") or {}).get("message") or f"line {number} has no answer").strip()
            answer = None
        rows.append({
            "line": number,
            "question": question["input_data"],
            "reference": question["reference"],
            "answer": answer,
            "f1": round(token_f1(answer, question["reference"]), 4) if answer is not None else 0.0,
            "exact_match": exact_match(answer, question["reference"]) if answer is not None else 0.0,
            "latency_s": (info.get("system_metrics") or {}).get("duration"),
            "error": error,
        })
    return rows


def evaluate(pf, label, questions_path, questions, endpoint_url, api_key=None, workers=1):
    """Batch-run the flow over the questions against one endpoint; returns (rows, run name).

    With api_key None the flow reads the endpoint from .env, as in the chat; otherwise URL and key are set
    as environment variables for this run only.
    """
    values = {"PF_WORKER_COUNT": str(workers)}  # lines run at once; Prompt flow's default is 4
    if api_key is not None:
        values.update({"AZURE_ML_ENDPOINT": endpoint_url, "AZURE_ML_API_KEY": api_key})
    print(f"\n=== {label}: {len(questions)} question(s) -> {endpoint_url}")
    # Not pf.run(environment_variables=...): Prompt flow would store the key in its run records (~/.promptflow).
    with mock.patch.dict(os.environ, values):
        run = pf.run(
            flow=FLOW_DIR,
            data=str(questions_path),
            column_mapping={"input_data": "${data.input_data}"},  # chat_history keeps its default: []
            display_name=f"evaluate_flow {label}",
            tags={"label": label, "endpoint": endpoint_url},
            stream=False,
        )
    if run.status != "Completed":
        raise SystemExit(f"error: the batch run {run.name} {run.status}; its log: {run.properties['output_path']}/logs.txt")
    return score_run(run, questions), run.name


def write_results(output_dir, label, rows, summary, endpoint_url, run_name):
    """rows.jsonl and summary.md for one endpoint."""
    folder = output_dir / label
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "rows.jsonl").write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows),
                                       encoding="utf-8")
    (folder / "summary.md").write_text(
        f"# {label}\n\nEndpoint: {endpoint_url}  \nPrompt flow run: {run_name}\n\n"
        + summary_table({label: summary}), encoding="utf-8")
    return folder


# --- The base model behind a temporary local endpoint ---------------------------------------------
@contextlib.contextmanager
def base_model_endpoint():
    """Serve the untrained base model on a free port with a fresh key until the block ends; yields (url, key)."""
    from stand_ins.endpoint_process import serve_model
    from stand_ins.job_runner import base_model
    from step_errors import StepError

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="base-model-") as folder:
        log_path = Path(folder) / "endpoint.log"
        try:
            with serve_model(base_model(), log_path) as endpoint:
                print(f"Base model served at {endpoint.url} ({time.perf_counter() - started:.1f} s to load)")
                yield endpoint.url, endpoint.key
        except StepError as error:
            tail = log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
            raise SystemExit(f"error: the base model's endpoint did not start: {error}\n{tail}") from None


# --- Main -----------------------------------------------------------------------------------------
def parse_args(argv=None):
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=config.TEST_DATA_PATH, help="test chats (default: TEST_DATA_PATH)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N chats")
    parser.add_argument("--compare-base", action="store_true",
                        help="also evaluate the untrained base model, served by a temporary local endpoint")
    parser.add_argument("--endpoint-url", default=None, help="also evaluate this endpoint (its scoring URL)")
    parser.add_argument("--api-key-env", default=None,
                        help="the environment variable holding --endpoint-url's key (never the key itself)")
    parser.add_argument("--label", default="other", help="column name for --endpoint-url (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=1,
                        help="questions in flight at once; more is faster, but latency then includes queueing")
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
    return args


def main(argv=None):
    """Evaluate the fine-tuned endpoint (and the base model or another endpoint) and print the table."""
    args = parse_args(argv)
    try:  # a missing setting fails here, before Prompt flow starts
        endpoint_url, _ = config.fresh("AZURE_ML_ENDPOINT", "AZURE_ML_API_KEY", hint="`python deploy_model.py` writes them")
    except config.MissingSettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    from promptflow.client import PFClient

    output_dir = args.output_dir.resolve()
    questions_path = output_dir / "questions.jsonl"
    questions = write_questions(args.data, questions_path, args.limit)
    print(f"{len(questions)} question(s) from {config.shown(args.data)} -> {config.shown(questions_path)}")
    pf = PFClient()
    targets = [("fine-tuned", endpoint_url, None)]
    if args.endpoint_url:
        targets.append((args.label, args.endpoint_url, os.environ[args.api_key_env].strip()))
    summaries = {}
    with contextlib.ExitStack() as stack:
        if args.compare_base:
            targets.insert(1, ("base", *stack.enter_context(base_model_endpoint())))
        for label, url, key in targets:
            rows, run_name = evaluate(pf, label, questions_path, questions, url, key, args.workers)
            summaries[label] = summarize(rows)
            folder = write_results(output_dir, label, rows, summaries[label], url, run_name)
            print(f"{label}: {config.shown(folder / 'rows.jsonl')}, {config.shown(folder / 'summary.md')}")
            for row in rows:
                if row["error"]:
                    print(f"  first error (line {row['line']}): {row['error'][:300]}")
                    break
    table = summary_table(summaries)
    (output_dir / "summary.md").write_text(f"# Evaluation of {config.shown(args.data)}\n\n{table}", encoding="utf-8")
    print(f"\n{table}\nWritten to {config.shown(output_dir / 'summary.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
