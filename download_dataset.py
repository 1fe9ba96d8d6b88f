"""Step 1 — get the chat dataset and split it 80/20 into training and test files.

    python download_dataset.py

Writes data/train_data.jsonl and data/test_data.jsonl, one conversation per line in the ultrachat_200k
schema (`prompt`, `prompt_id`, `messages`). With the local target (the default) the rows come from the
sample bundled in sample_data/ (330 chats -> 264 / 66); with TARGET=azure (or --source hub) they come
from HuggingFaceH4/ultrachat_200k, split train_sft[:1%] (~2,079 rows -> ~1,663 / ~416).

With TARGET=serverless (or --chat-completions) it also writes data/train_chat.jsonl and data/test_chat.jsonl:
the same split as chat-completions JSONL, `{"messages": [{"role": ..., "content": ...}, ...]}` and nothing else,
the format Azure AI Foundry's serverless fine-tuning reads.

Every record is checked before anything is written; a bad one stops the step with its index and reason
(--skip-invalid drops them instead). An output file you edited is never replaced without --force, and
then the old one is kept as a .bak copy.
"""

import argparse
import json
import sys

import config
from finetuning_dir.chat_data import conversation_problem
from helpers.errors import StepError, exit_code
from helpers.files import FileChangedError, write_generated_file
import serverless

MAX_PROBLEMS_SHOWN = 20


# --- The tutorial's functions -------------------------------------------------------------------
def load_and_split_dataset(dataset_name, config_name, split_ratio, split=None, seed=None, skip_invalid=False):
    """Load the dataset, check every record, and split it into train/test with a fixed seed."""
    split = split or config.DATASET_SPLIT
    seed = config.SPLIT_SEED if seed is None else seed
    dataset = load_source_dataset(dataset_name, config_name, split)
    print(f"Original dataset size: {len(dataset)}")
    dataset = validate_records(dataset, skip_invalid)
    if len(dataset) < 2:
        raise TooFewRecordsError(f"only {len(dataset)} valid record(s); a train/test split needs 2 or more")
    return dataset.train_test_split(test_size=split_ratio, seed=seed)


def save_dataset_to_jsonl(dataset, filepath, force=False):
    """Write one JSON object per line (UTF-8 kept as is), atomically; returns what happened to the file."""
    lines = [json.dumps(record, ensure_ascii=False) + "\n" for record in dataset]
    return write_generated_file(filepath, "".join(lines), force=force)


# --- Loading and checking (the tutorial loads without checking) ----------------------------------
class DatasetUnavailableError(StepError):
    """The dataset could not be loaded (no internet, unknown name, missing file)."""


class InvalidRecordsError(StepError):
    """Some records break the chat schema; `problems` lists (index, reason)."""

    def __init__(self, problems):
        self.problems = problems
        shown = "\n".join(f"  record {index}: {reason}" for index, reason in problems[:MAX_PROBLEMS_SHOWN])
        more = len(problems) - MAX_PROBLEMS_SHOWN
        super().__init__(
            f"{len(problems)} invalid record(s):\n{shown}"
            + (f"\n  ... and {more} more" if more > 0 else "")
            + "\nFix them, or rerun with --skip-invalid to drop them."
        )


class TooFewRecordsError(StepError):
    """Too few valid records are left for a train/test split."""


def load_source_dataset(dataset_name, config_name, split):
    """Load one split from the Hub, or the bundled sample when `dataset_name` is a local .jsonl file."""
    from datasets import load_dataset
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()  # one clear sentence below instead of five retry warnings
    if str(dataset_name).endswith(".jsonl"):
        if not config.PROJECT_DIR.joinpath(dataset_name).is_file():
            raise DatasetUnavailableError(f"The sample dataset {dataset_name} is missing from the project.")
        # The json builder with a split named like ultrachat's, so the same DATASET_SPLIT strings apply.
        return load_dataset("json", data_files={"train_sft": str(dataset_name)}, split=split)
    try:
        return load_dataset(dataset_name, config_name, split=split)
    except (ConnectionError, OSError) as error:
        raise DatasetUnavailableError(
            f"Could not download {dataset_name} from the Hugging Face Hub ({type(error).__name__}): "
            "check your internet connection, or use the bundled sample with DATASET_SOURCE=sample."
        ) from None


def validate_records(dataset, skip_invalid=False):
    """Check every record; raise InvalidRecordsError, or with `skip_invalid` drop the bad ones."""
    problems = [(index, problem) for index, record in enumerate(dataset) if (problem := conversation_problem(record))]
    if problems and not skip_invalid:
        raise InvalidRecordsError(problems)
    if problems:
        bad = {index for index, _ in problems}
        dataset = dataset.select(i for i in range(len(dataset)) if i not in bad)
        print(f"Skipped {len(problems)} invalid record(s) (--skip-invalid); first: record {problems[0][0]}: {problems[0][1]}")
    return dataset


def parse_args(argv=None):
    """Command-line options; the defaults come from config.py."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", choices=["hub", "sample"], default=config.DATASET_SOURCE,
                        help=f"hub: {config.DATASET_NAME}; sample: the bundled file (default: %(default)s)")
    parser.add_argument("--split", default=None,
                        help=f"which rows, e.g. train_sft[:10] (default: {config.DATASET_SPLIT} from the Hub, "
                        f"{config.SAMPLE_DATASET_SPLIT} from the sample)".replace("%", "%%"))
    parser.add_argument("--test-ratio", type=float, default=config.TEST_SPLIT_RATIO, help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=config.SPLIT_SEED, help="split seed (default: %(default)s)")
    parser.add_argument("--skip-invalid", action="store_true", help="drop invalid records instead of stopping")
    parser.add_argument("--force", action="store_true", help="replace output files that were edited (keeps a .bak)")
    parser.add_argument("--chat-completions", action=argparse.BooleanOptionalAction, default=config.TARGET == "serverless",
                        help="also write the chat-completions JSONL of serverless fine-tuning (default: with "
                        "TARGET=serverless)")
    return parser.parse_args(argv)


def main(argv=None):
    """Load, check, split and save; returns the process exit code."""
    args = parse_args(argv)
    name = config.DATASET_NAME if args.source == "hub" else config.SAMPLE_DATASET_PATH
    split = args.split or (config.DATASET_SPLIT if args.source == "hub" else config.SAMPLE_DATASET_SPLIT)
    try:
        dataset = load_and_split_dataset(name, config.DATASET_CONFIG, args.test_ratio, split, args.seed, args.skip_invalid)
        print(f"Training set size: {len(dataset['train'])}")
        print(f"Test set size: {len(dataset['test'])}")
        for part, path in (("train", config.TRAIN_DATA_PATH), ("test", config.TEST_DATA_PATH)):
            status = save_dataset_to_jsonl(dataset[part], path, force=args.force)
            print(f"{config.shown(path)}: {status}")
        for part, path in (("train", config.CHAT_TRAIN_DATA_PATH), ("test", config.CHAT_TEST_DATA_PATH)):
            if args.chat_completions:  # the serverless road's format (serverless/chat_data.py)
                print(f"{config.shown(path)}: {serverless.save_chat_completions_jsonl(dataset[part], path, args.force)}")
    except (StepError, FileChangedError) as error:
        return exit_code(error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
