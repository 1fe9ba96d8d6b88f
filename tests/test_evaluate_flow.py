"""evaluate_flow.py: azure-ai-evaluation's scores; a real batch run of the flow, fine-tuned vs base, in MLflow and a PNG."""

import json
import os
import re
import socket
import struct

import pytest

import evaluate_flow
from helpers import metrics
from conftest import WORK_DIR, free_port, read_env_file, run_script

LIMIT = 3
REFERENCE = "Bill Gates and Paul Allen founded Microsoft."


# --- Scores ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def evaluators():
    """score(name, answer): the default evaluators (the library's F1, ROUGE-L; our exact match) as evaluate() calls them."""
    chosen = metrics.evaluators()

    def score(name, answer, reference=REFERENCE):
        key = metrics.SCORES[name][0]
        return chosen[name](response=answer, ground_truth=reference)[key]
    return score


def test_normalize_drops_case_punctuation_and_articles():
    assert metrics.normalize("The  Euro, in 2002!") == "euro in 2002"


def test_the_librarys_f1_normalizes_as_squad_does(evaluators):
    # SQuAD's normalize_answer deletes punctuation (it does not turn it into spaces), then drops articles; the
    # library's F1ScoreEvaluator does the same, and so does our exact match.
    assert metrics.normalize("A well-known, state-of-the-art model.") == "wellknown stateoftheart model"
    assert evaluators("f1_score", "well-known", "wellknown") == 1.0
    assert metrics.exact_match("Bill Gates and Paul Allen founded Microsoft", REFERENCE) == 1.0
    assert metrics.exact_match("Bill Gates alone", REFERENCE) == 0.0


def test_f1_and_rouge_l_on_known_pairs(evaluators):
    for name in ("f1_score", "rouge_l"):
        assert evaluators(name, "bill gates and paul allen founded microsoft") == 1.0, name
        assert evaluators(name, "Paris") == 0.0, name
        # 2 of 3 answer words are right (precision 2/3), 2 of 7 reference words found (recall 2/7): 0.4
        assert evaluators(name, "Bill Gates alone") == pytest.approx(0.4), name
    # Word order: F1 counts the 4 shared words (precision 1, recall 4/7: 8/11); ROUGE-L only their longest
    # common sequence, 2 words ("bill gates" or "founded microsoft": precision 2/4, recall 2/7: 4/11).
    assert evaluators("f1_score", "founded Microsoft, Bill Gates") == pytest.approx(8 / 11)
    assert evaluators("rouge_l", "founded Microsoft, Bill Gates") == pytest.approx(4 / 11)


def test_evaluate_scores_every_row_and_a_failed_line_scores_zero(tmp_path):
    rows = [{"line": 0, "question": "q", "reference": REFERENCE, "answer": REFERENCE, "latency_s": 0.5, "error": None},
            {"line": 1, "question": "q", "reference": REFERENCE, "answer": "", "latency_s": 9.0, "error": "HTTP 500"}]
    evaluate_flow.score_answers(rows, tmp_path)
    assert [(row["exact_match"], row["f1_score"], row["rouge_l"]) for row in rows] == [(1.0, 1.0, 1.0), (0.0, 0.0, 0.0)]
    assert [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()] == rows
    result = json.loads((tmp_path / "evaluation_results.json").read_text())  # the library's own output
    assert result["metrics"]["f1_score.f1_score"] == 0.5
    summary = metrics.summarize(rows)
    assert summary["errors"] == 1 and summary["f1_score"] == 0.5 and summary["latency_p95_s"] == 0.5


def test_percentile_interpolates():
    assert metrics.percentile([], 50) is None
    assert metrics.percentile([3.0], 95) == 3.0
    assert metrics.percentile([1, 2, 3, 4], 50) == 2.5
    assert metrics.percentile(list(range(101)), 95) == 95
    assert metrics.percentile([10, 20, 30], 90) == pytest.approx(28.0)  # interpolated, as numpy.percentile


def test_the_benchmarks_use_the_same_percentile():
    from conftest import PROJECT_DIR

    source = (PROJECT_DIR / "bench" / "endpoint_load.py").read_text()
    assert "from helpers.metrics import percentile" in source and "def percentile" not in source


# --- BLEU, GLEU and METEOR: NLTK data, which an offline machine cannot download ----------------------
@pytest.fixture()
def offline_nltk(monkeypatch, tmp_path):
    """No NLTK data installed, and its download server unreachable (as on a machine without internet)."""
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    monkeypatch.setattr(nltk.downloader._downloader, "_url", f"http://127.0.0.1:{free_port()}/index.xml")


def test_offline_the_librarys_bleu_raises_lookup_error(offline_nltk):
    from azure.ai.evaluation import BleuScoreEvaluator

    assert metrics.missing_nltk_data() == list(metrics.NLTK_DATA)
    with pytest.raises(LookupError):
        BleuScoreEvaluator()(response=REFERENCE, ground_truth=REFERENCE)


def test_offline_nltk_metrics_fail_with_one_sentence(offline_nltk, capsys):
    with pytest.raises(SystemExit) as stopped:
        evaluate_flow.parse_args(["--nltk-metrics"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "[nltk_data]" not in err
    error = err.strip().splitlines()[-1]  # after argparse's usage lines
    assert ": error: --nltk-metrics needs NLTK data" in error and "punkt_tab" in error


# --- Test data and options ------------------------------------------------------------------------
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


def mean(output_dir, label, score):
    """The mean of one score over an endpoint's rows.jsonl."""
    return sum(row[score] for row in read_rows(output_dir / label / "rows.jsonl")) / LIMIT


@pytest.mark.slow
def test_evaluation_writes_rows_and_tables(comparison):
    result, output_dir = comparison
    assert len(read_rows(output_dir / "questions.jsonl")) == LIMIT
    for label in ("fine-tuned", "base"):
        rows = read_rows(output_dir / label / "rows.jsonl")
        assert len(rows) == LIMIT
        assert all(row["error"] is None and row["answer"] and row["latency_s"] > 0 for row in rows)
        assert all(0 <= row[score] <= 1 for row in rows for score in ("exact_match", "f1_score", "rouge_l"))
        assert "| ROUGE-L |" in (output_dir / label / "summary.md").read_text()
        assert (output_dir / label / "evaluation_results.json").is_file()
    table = (output_dir / "summary.md").read_text()
    assert "| metric | fine-tuned | base |" in table and "| F1 |" in table and "| latency p95 (s) |" in table
    assert "| metric | fine-tuned | base |" in result.stdout  # printed, too


@pytest.mark.slow
def test_fine_tuning_beats_the_base_model(comparison):
    _, output_dir = comparison
    for score, margin in (("f1_score", 0.2), ("rouge_l", 0.1)):
        fine_tuned, base = mean(output_dir, "fine-tuned", score), mean(output_dir, "base", score)
        assert fine_tuned > base + margin, (score, fine_tuned, base)


@pytest.mark.slow
def test_the_comparison_picture_is_a_png_drawn_by_matplotlib(comparison):
    result, output_dir = comparison
    picture = output_dir / "comparison.png"
    data = picture.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk comes first
    assert (width, height) == (1200, 480)  # 10 x 4 inches at 120 dpi
    assert b"Matplotlib" in data and len(data) > 20_000, "not matplotlib's picture, or an empty one"
    assert f"the picture: {picture}" in result.stdout


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")  # MLflow 3.17's SQL store's
def test_each_endpoint_is_an_mlflow_run_with_its_metrics_and_table(comparison):
    import mlflow

    _, output_dir = comparison
    client = mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(evaluate_flow.EXPERIMENT_NAME)
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["base", "fine-tuned"]
    key = read_env_file()["AZURE_ML_API_KEY"]
    for label, run in runs.items():
        assert run.data.params["label"] == label and run.data.params["rows"] == str(LIMIT)
        assert run.data.params["endpoint_url"].startswith("http://127.0.0.1:")
        assert key not in json.dumps(run.data.params)
        assert run.data.metrics["errors"] == 0 and run.data.metrics["latency_p95_s"] > 0
        for score in ("exact_match", "f1_score", "rouge_l"):
            assert run.data.metrics[score] == pytest.approx(mean(output_dir, label, score))
        assert run.info.artifact_uri.startswith((output_dir / "mlruns").as_uri())  # not ./mlruns of the project
        artifacts = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
        assert {"comparison.png", "rows.json", label} <= artifacts
    table = client.load_table(experiment.experiment_id, "rows.json", run_ids=[run.info.run_id for run in runs.values()],
                              extra_columns=["run_id"])
    assert len(table) == 2 * LIMIT and {"question", "reference", "answer", "f1_score", "rouge_l"} <= set(table.columns)


@pytest.mark.slow
def test_the_temporary_base_endpoint_is_stopped(comparison):
    _, output_dir = comparison
    port = int(re.search(r"http://127\.0\.0\.1:(\d+)/score", (output_dir / "base" / "summary.md").read_text())[1])
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0, f"something still listens on {port}"


@pytest.mark.slow
def test_no_key_in_output_results_or_run_records(comparison):
    result, output_dir = comparison
    key = read_env_file()["AZURE_ML_API_KEY"]
    assert key not in result.stdout + result.stderr
    files = [path for folder in (output_dir, WORK_DIR / ".pf") for path in folder.rglob("*") if path.is_file()]
    leaked = [str(path) for path in [*files, WORK_DIR / "mlflow.db"] if key.encode() in path.read_bytes()]
    assert not leaked, f"the endpoint key is in {leaked}"


@pytest.mark.slow
def test_batch_run_snapshots_leave_out_secrets_and_generated_folders(comparison):
    # Prompt flow copies the flow folder (the project) into every batch run; .amlignore says what to leave out.
    snapshots = list((WORK_DIR / ".pf" / ".runs").glob("*/snapshot"))
    assert snapshots
    for snapshot in snapshots:
        copied = {path.name for path in snapshot.iterdir()}
        assert "integrate_with_promptflow.py" in copied and "flow.dag.yml" in copied
        unwanted = copied & {".env", ".venv", ".git", "data", "models", "outputs", "mlflow.db", ".promptflow", ".pf"}
        assert not unwanted, f"{snapshot} holds {sorted(unwanted)}: list them in .amlignore"
