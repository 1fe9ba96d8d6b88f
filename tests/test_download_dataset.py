"""Step 1: the bundled sample, the split, record checks, atomic and loss-free writes, the Hub failure."""

import hashlib
import json
import os

import pytest

import config
import download_dataset
from helpers import files
from conftest import run_script


def write_jsonl(path, records):
    """Write records as JSONL (UTF-8 kept)."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def chat(question, answer="An answer."):
    """A valid ultrachat-schema record."""
    return {"prompt": question, "prompt_id": hashlib.sha256(question.encode()).hexdigest(),
            "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


@pytest.fixture
def outputs(tmp_path, monkeypatch):
    """Point the step's two output files into tmp_path."""
    monkeypatch.setattr(config, "TRAIN_DATA_PATH", tmp_path / "data" / "train_data.jsonl")
    monkeypatch.setattr(config, "TEST_DATA_PATH", tmp_path / "data" / "test_data.jsonl")
    return tmp_path / "data"


def read_lines(path):
    """The records of a JSONL file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --- the bundled sample -------------------------------------------------------------------------
def test_bundled_sample_is_in_the_ultrachat_schema():
    records = read_lines(config.SAMPLE_DATASET_PATH)
    assert len(records) >= 300
    assert len({r["prompt_id"] for r in records}) == len(records)
    for record in records:
        assert list(record) == ["prompt", "prompt_id", "messages"]
        assert record["prompt"] == record["messages"][0]["content"]
        assert record["prompt_id"] == hashlib.sha256(record["prompt"].encode("utf-8")).hexdigest()
        assert download_dataset.conversation_problem(record) is None
    assert sum(len(r["messages"]) > 2 for r in records) >= 30  # multi-turn chats
    assert any(r["prompt"] == "Who founded Microsoft?" for r in records)  # the flow's default question
    text = json.dumps(records, ensure_ascii=False)
    assert "Azure Machine Learning" in text and "Phi-3" in text and "Prompt flow" in text


def test_main_writes_80_20_split_and_prints_sizes(outputs, capsys):
    assert download_dataset.main([]) == 0
    printed = capsys.readouterr().out
    assert "Original dataset size: 330" in printed
    assert "Training set size: 264" in printed and "Test set size: 66" in printed
    train, test = read_lines(outputs / "train_data.jsonl"), read_lines(outputs / "test_data.jsonl")
    assert (len(train), len(test)) == (264, 66)
    assert not {r["prompt_id"] for r in train} & {r["prompt_id"] for r in test}
    # The flow's default question is one the local model learns.
    assert any(r["prompt"] == "Who founded Microsoft?" for r in train)


def test_split_is_reproducible_and_seeded():
    name = config.SAMPLE_DATASET_PATH
    first = download_dataset.load_and_split_dataset(name, None, 0.2, "train_sft", seed=42)
    again = download_dataset.load_and_split_dataset(name, None, 0.2, "train_sft", seed=42)
    other = download_dataset.load_and_split_dataset(name, None, 0.2, "train_sft", seed=1)
    assert first["test"]["prompt_id"] == again["test"]["prompt_id"]
    assert first["test"]["prompt_id"] != other["test"]["prompt_id"]


def test_cpu_guidance_split_takes_ten_rows(outputs, capsys):
    assert download_dataset.main(["--split", "train_sft[:10]"]) == 0
    assert "Original dataset size: 10" in capsys.readouterr().out
    assert len(read_lines(outputs / "train_data.jsonl")) == 8


def test_utf8_is_kept_as_is(outputs):
    download_dataset.main([])
    text = (outputs / "train_data.jsonl").read_text(encoding="utf-8") + (outputs / "test_data.jsonl").read_text(encoding="utf-8")
    assert "\\u" not in text
    assert any(ord(ch) > 127 for ch in text)


# --- record checks --------------------------------------------------------------------------------
BAD_RECORDS = [
    ({"prompt": "x", "prompt_id": "y"}, "missing 'messages'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]}, "unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "a"}]}, "empty content"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q2"},
                   {"role": "assistant", "content": "a"}]}, "turns must alternate"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                   {"role": "user", "content": "q2"}]}, "last message must be the assistant"),
]


@pytest.mark.parametrize("record, reason", BAD_RECORDS)
def test_each_kind_of_bad_record_is_named(record, reason):
    assert reason in download_dataset.conversation_problem(record)


def dataset_with_bad_records(tmp_path):
    """A JSONL file of 10 good chats with the five bad kinds at indexes 2, 4, 6, 8, 10."""
    records = [chat(f"Question {i}?") for i in range(10)]
    for offset, (bad, _) in enumerate(BAD_RECORDS):
        records.insert(2 + 2 * offset, {"prompt": f"bad {offset}", "prompt_id": "0", "messages": [], **bad})
    return write_jsonl(tmp_path / "bad.jsonl", records)


def test_invalid_records_stop_the_step_with_indexes(tmp_path, outputs, monkeypatch, capsys):
    monkeypatch.setattr(config, "SAMPLE_DATASET_PATH", dataset_with_bad_records(tmp_path))
    assert download_dataset.main([]) == 1
    error = capsys.readouterr().err
    assert "5 invalid record(s)" in error
    for index in (2, 4, 6, 8, 10):
        assert f"record {index}:" in error
    assert "--skip-invalid" in error
    assert not outputs.exists()  # nothing written


def test_skip_invalid_drops_and_reports(tmp_path, outputs, monkeypatch, capsys):
    monkeypatch.setattr(config, "SAMPLE_DATASET_PATH", dataset_with_bad_records(tmp_path))
    assert download_dataset.main(["--skip-invalid"]) == 0
    printed = capsys.readouterr().out
    assert "Skipped 5 invalid record(s)" in printed
    assert len(read_lines(outputs / "train_data.jsonl")) + len(read_lines(outputs / "test_data.jsonl")) == 10


# --- writes: atomic, never losing an edit ----------------------------------------------------------
def test_rerun_is_idempotent(outputs, capsys):
    download_dataset.main([])
    download_dataset.main([])
    assert capsys.readouterr().out.count(": unchanged") == 2


def test_edited_file_is_not_replaced_without_force(outputs, capsys):
    download_dataset.main([])
    train = outputs / "train_data.jsonl"
    train.write_text(train.read_text(encoding="utf-8") + json.dumps(chat("My own question?")) + "\n", encoding="utf-8")
    edited = train.read_text(encoding="utf-8")

    assert download_dataset.main(["--seed", "1"]) == 1
    assert "--force" in capsys.readouterr().err
    assert train.read_text(encoding="utf-8") == edited

    assert download_dataset.main(["--seed", "1", "--force"]) == 0
    backups = list(outputs.glob("train_data.jsonl.*.bak"))
    assert len(backups) == 1 and backups[0].read_text(encoding="utf-8") == edited


def test_untouched_output_is_replaced_when_the_split_changes(outputs, capsys):
    download_dataset.main([])
    before = (outputs / "test_data.jsonl").read_text(encoding="utf-8")
    assert download_dataset.main(["--seed", "3"]) == 0
    assert (outputs / "test_data.jsonl").read_text(encoding="utf-8") != before
    assert not list(outputs.glob("*.bak"))


def test_interrupted_write_leaves_the_old_file_whole(tmp_path, monkeypatch):
    target = tmp_path / "train_data.jsonl"
    target.write_text("old complete content\n")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        files.atomic_write_text(target, "new content that never lands\n" * 1000)
    assert target.read_text() == "old complete content\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_data.jsonl"]  # no temp file left behind


# --- the Hub, unreachable here --------------------------------------------------------------------
def test_hub_unreachable_is_one_clear_sentence(work_dir):
    result = run_script("download_dataset.py", env={"TARGET": "azure", "TRAIN_DATA_PATH": str(work_dir / "hub" / "t.jsonl"),
                                                    "TEST_DATA_PATH": str(work_dir / "hub" / "e.jsonl")})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1
    assert "HuggingFaceH4/ultrachat_200k" in error_lines[0] and "DATASET_SOURCE=sample" in error_lines[0]


def test_too_few_valid_records_is_its_own_error_without_a_fake_record_index(tmp_path, outputs, monkeypatch, capsys):
    monkeypatch.setattr(config, "SAMPLE_DATASET_PATH", write_jsonl(tmp_path / "one.jsonl", [chat("Only one?")]))
    with pytest.raises(download_dataset.TooFewRecordsError):
        download_dataset.load_and_split_dataset(config.SAMPLE_DATASET_PATH, None, 0.2, "train_sft")
    assert download_dataset.main([]) == 1
    error = capsys.readouterr().err
    assert "only 1 valid record(s)" in error and "record 0:" not in error and "--skip-invalid" not in error
    assert not outputs.exists()
