"""evaluate_flow.py: the metrics, and a real batch run of the flow against the fine-tuned and the base model."""

import json
import re
import socket

import pytest

import evaluate_flow
import metrics
from conftest import WORK_DIR, read_env_file, run_script

LIMIT = 3


# --- Metrics --------------------------------------------------------------------------------------
def test_normalize_drops_case_punctuation_and_articles():
    assert metrics.normalize("The  Euro, in 2002!") == "euro in 2002"


def test_normalize_deletes_punctuation_as_squad_does():
    # SQuAD's normalize_answer deletes punctuation (it does not turn it into spaces), then drops articles.
    assert metrics.normalize("A well-known, state-of-the-art model.") == "wellknown stateoftheart model"
    assert metrics.token_f1("well-known", "wellknown") == 1.0


def test_token_f1_and_exact_match():
    reference = "Bill Gates and Paul Allen founded Microsoft."
    assert metrics.token_f1("bill gates and paul allen founded microsoft", reference) == 1.0
    assert metrics.exact_match("Bill Gates and Paul Allen founded Microsoft", reference) == 1.0
    assert metrics.token_f1("Paris", reference) == 0.0
    # 2 of 3 answer tokens are right (precision 2/3), 2 of 7 reference tokens found (recall 2/7): F1 = 0.4
    assert metrics.token_f1("Bill Gates alone", reference) == pytest.approx(0.4)
    assert metrics.exact_match("Bill Gates alone", reference) == 0.0


def test_percentile_interpolates():
    assert metrics.percentile([], 50) is None
    assert metrics.percentile([3.0], 95) == 3.0
    assert metrics.percentile([1, 2, 3, 4], 50) == 2.5
    assert metrics.percentile(list(range(101)), 95) == 95
    assert metrics.percentile([10, 20, 30], 90) == pytest.approx(28.0)  # interpolated, as numpy.percentile


def test_the_benchmarks_use_the_same_percentile():
    from conftest import PROJECT_DIR

    source = (PROJECT_DIR / "bench" / "endpoint_load.py").read_text()
    assert "from metrics import percentile" in source and "def percentile" not in source


def test_summary_scores_a_failed_line_zero_and_leaves_out_its_latency():
    rows = [{"f1": 1.0, "exact_match": 1.0, "latency_s": 0.5, "error": None},
            {"f1": 0.0, "exact_match": 0.0, "latency_s": 9.0, "error": "HTTP 500"}]
    summary = metrics.summarize(rows)
    assert summary["errors"] == 1 and summary["token_f1"] == 0.5 and summary["latency_p95_s"] == 0.5


def test_questions_are_each_chats_first_exchange(tmp_path):
    data = tmp_path / "test.jsonl"
    chat = {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                         {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}
    data.write_text(json.dumps(chat) + "\n" + json.dumps({"messages": [{"role": "user", "content": "alone"}]}) + "\n")
    rows = evaluate_flow.write_questions(data, tmp_path / "out" / "questions.jsonl")
    assert rows == [{"input_data": "q1", "reference": "a1"}]
    assert json.loads((tmp_path / "out" / "questions.jsonl").read_text()) == rows[0]


def test_a_second_endpoint_needs_its_key_variable(capsys):
    with pytest.raises(SystemExit):
        evaluate_flow.parse_args(["--endpoint-url", "https://x.eastus2.inference.ml.azure.com/score"])
    assert "--api-key-env" in capsys.readouterr().err


# --- A real batch run: fine-tuned vs base ---------------------------------------------------------------
@pytest.fixture(scope="module")
def comparison(demo_run):
    """`python evaluate_flow.py --compare-base --limit 3`, once for this module."""
    output_dir = WORK_DIR / "eval"
    result = run_script("evaluate_flow.py", "--compare-base", "--limit", LIMIT, "--output-dir", output_dir, timeout=300)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result, output_dir


def read_rows(path):
    """A JSONL file's rows."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_evaluation_writes_rows_and_tables(comparison):
    result, output_dir = comparison
    assert len(read_rows(output_dir / "questions.jsonl")) == LIMIT
    for label in ("fine-tuned", "base"):
        rows = read_rows(output_dir / label / "rows.jsonl")
        assert len(rows) == LIMIT
        assert all(row["error"] is None and row["answer"] and row["latency_s"] > 0 for row in rows)
        assert "| token F1 |" in (output_dir / label / "summary.md").read_text()
    table = (output_dir / "summary.md").read_text()
    assert "| metric | fine-tuned | base |" in table and "| latency p95 (s) |" in table
    assert "| metric | fine-tuned | base |" in result.stdout  # printed, too


def test_fine_tuning_beats_the_base_model(comparison):
    _, output_dir = comparison
    f1 = {label: sum(row["f1"] for row in read_rows(output_dir / label / "rows.jsonl")) / LIMIT
          for label in ("fine-tuned", "base")}
    assert f1["fine-tuned"] > f1["base"] + 0.2, f1


def test_the_temporary_base_endpoint_is_stopped(comparison):
    _, output_dir = comparison
    port = int(re.search(r"http://127\.0\.0\.1:(\d+)/score", (output_dir / "base" / "summary.md").read_text())[1])
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0, f"something still listens on {port}"


def test_no_key_in_output_results_or_run_records(comparison):
    result, output_dir = comparison
    key = read_env_file()["AZURE_ML_API_KEY"]
    assert key not in result.stdout + result.stderr
    files = [path for folder in (output_dir, WORK_DIR / ".pf") for path in folder.rglob("*") if path.is_file()]
    leaked = [str(path) for path in files if key.encode() in path.read_bytes()]
    assert not leaked, f"the endpoint key is in {leaked}"


def test_batch_run_snapshots_leave_out_secrets_and_generated_folders(comparison):
    # Prompt flow copies the flow folder (the project) into every batch run; .amlignore says what to leave out.
    snapshots = list((WORK_DIR / ".pf" / ".runs").glob("*/snapshot"))
    assert snapshots
    for snapshot in snapshots:
        copied = {path.name for path in snapshot.iterdir()}
        assert "integrate_with_promptflow.py" in copied and "flow.dag.yml" in copied
        unwanted = copied & {".env", ".venv", ".git", "data", "models", "outputs", "mlflow.db", ".promptflow", ".pf"}
        assert not unwanted, f"{snapshot} holds {sorted(unwanted)}: list them in .amlignore"
