"""The local base model: a tiny Phi-3 (random weights, ~1M parameters) that stands in for Phi-3.5-mini.

    python -m stand_ins.tiny_model     # writes models/tiny-phi3/ (a few seconds, mostly importing torch); --force rebuilds it

The local job calls `ensure_tiny_phi3()` itself, so you rarely run this by hand. A folder at
LOCAL_BASE_MODEL_DIR that this module did not build (a model of your own) is never replaced. The model is a real
`transformers.Phi3ForCausalLM` with Phi-3's special tokens and chat template, and is loaded back with
`AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`, exactly as
`microsoft/Phi-3.5-mini-instruct` is in the Azure job. The tokenizer is a byte-level BPE trained on the
bundled sample chats, so any UTF-8 text tokenizes. The build is deterministic: same files, same weights.
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

BUILD_VERSION = 1  # bump when the recipe below changes, so existing builds are redone
STAMP_FILE = "tiny_phi3_build.json"

# Phi-3's special tokens, in Phi-3's own spelling. <|end|> closes every turn; <|endoftext|> ends the text.
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# Phi-3.5-mini-instruct's chat template, plus {% generation %} markers around the assistant's words so
# TRL can compute an assistant-only loss (assistant_only_loss=True) with it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and message['content'] %}"
    "{{ '<|system|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# Phi-3.5-mini is hidden 3072 x 32 layers x 32 heads, vocab 32064. This keeps the shape, not the size:
# big enough to memorize the 264 training chats in seconds on a CPU, small enough to build instantly.
MODEL_SIZE = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
VOCAB_SIZE = 2048  # BPE merges learned from the sample; the byte alphabet covers everything else
MAX_POSITIONS = 2048  # the tutorial's max sequence length


def corpus_lines(sample_path):
    """The texts the tokenizer learns from: every message of the bundled sample."""
    for line in Path(sample_path).read_text(encoding="utf-8").splitlines():
        for message in json.loads(line)["messages"]:
            yield message["content"]


def build_tokenizer(sample_path):
    """Train a byte-level BPE on the sample and wrap it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: no text is ever unknown
        show_progress=False,
    )
    bpe.train_from_iterator(corpus_lines(sample_path), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        pad_token="<|endoftext|>",  # as Phi-3.5-mini-instruct ships it; see fine_tune.py on pad vs unk
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITIONS,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def build_model(tokenizer):
    """A randomly initialised Phi3ForCausalLM sized by MODEL_SIZE, stopping generation at <|end|>."""
    import torch
    from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM

    end_id, eos_id = tokenizer.convert_tokens_to_ids(["<|end|>", "<|endoftext|>"])
    model_config = Phi3Config(
        vocab_size=len(tokenizer),
        max_position_embeddings=MAX_POSITIONS,
        original_max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,  # Phi-3 has a separate output layer
        **MODEL_SIZE,
    )
    torch.manual_seed(0)
    model = Phi3ForCausalLM(model_config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[end_id, eos_id],  # a chat answer ends at <|end|>, as with Phi-3.5's own config
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def source_digest(sample_path):
    """What a build depends on: the recipe version and the sample's bytes."""
    digest = hashlib.sha256(Path(sample_path).read_bytes()).hexdigest()
    return {"build_version": BUILD_VERSION, "sample_sha256": digest}


def holds_other_model(folder):
    """True when `folder` has files but no build stamp: a model of your own, never to be replaced."""
    folder = Path(folder)
    return folder.is_dir() and any(folder.iterdir()) and not (folder / STAMP_FILE).is_file()


def is_current(output_dir, sample_path):
    """True when `output_dir` holds a finished build from the same recipe and sample."""
    stamp = Path(output_dir) / STAMP_FILE
    return stamp.is_file() and json.loads(stamp.read_text()) == source_digest(sample_path)


def build_tiny_phi3(output_dir, sample_path):
    """Build tokenizer and model and save both into `output_dir` (atomically: a folder rename)."""
    output_dir = Path(output_dir)
    tokenizer = build_tokenizer(sample_path)
    model = build_model(tokenizer)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / STAMP_FILE).write_text(json.dumps(source_digest(sample_path)))
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return model.num_parameters()


def ensure_tiny_phi3(output_dir=None, sample_path=None, force=False):
    """Return the local base model's folder, building it first when missing or out of date."""
    output_dir = Path(output_dir or config.LOCAL_BASE_MODEL_DIR)
    sample_path = Path(sample_path or config.SAMPLE_DATASET_PATH)
    if holds_other_model(output_dir):
        raise FileExistsError(f"{config.shown(output_dir)} holds files this module did not build: "
                              "not replacing them (set LOCAL_BASE_MODEL_DIR to another folder)")
    if force or not is_current(output_dir, sample_path):
        started = time.perf_counter()
        parameters = build_tiny_phi3(output_dir, sample_path)
        print(f"Built the tiny Phi-3 base model ({parameters / 1e6:.2f}M parameters) in "
              f"{config.shown(output_dir)} ({time.perf_counter() - started:.1f} s)")
    return output_dir


def main(argv=None):
    """Build the local base model."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=config.LOCAL_BASE_MODEL_DIR, help="default: %(default)s")
    parser.add_argument("--force", action="store_true", help="rebuild even if an up-to-date build exists")
    args = parser.parse_args(argv)
    path = ensure_tiny_phi3(args.output_dir, force=args.force)
    print(f"Base model ready: {config.shown(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
