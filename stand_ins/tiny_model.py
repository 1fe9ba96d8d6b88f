"""The local base model: a tiny Phi-3 (random weights, ~1M parameters) that stands in for Phi-3.5-mini.

    python -m stand_ins.tiny_model     # writes models/tiny-phi3/ (a few seconds, mostly importing torch); --force rebuilds it
    python -m stand_ins.tiny_model --variant phi-4-mini --output-dir models/tiny-phi4   # a Phi-4-mini stand-in

The local job calls `ensure_tiny_phi3()` itself, so you rarely run this by hand. A folder at
TINY_MODEL_DIR that this module did not build (a model of your own) is never replaced. The model is a real
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
DEFAULT_VARIANT = "phi-3.5-mini"
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

# Phi-4-mini-instruct's chat template (no newlines; its tool-calling branch left out), as the tokenizer ships it.
PHI4_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)

# Tiny stand-ins of the base models the README names, each with its architecture's traits at the tiny size
# (tests/test_base_models.py runs each through fine-tune -> MLflow model -> score.py):
#   phi-3.5-mini           the demo's model (Phi-3.5-mini's template and untied head; no long-context scaling)
#   phi-3.5-mini-longrope  plus Phi-3.5-mini's LongRoPE scaling (128k context from a 4k original; here 4x)
#   phi-3-mini-4k          Phi-3-mini-4k-instruct: a 4k context and a sliding window of 2047 tokens
#   phi-4-mini             Phi-4-mini-instruct: partial rotary (0.75 of each head), tied input/output embeddings,
#                          grouped-query attention, its own template (its 200,064-token vocabulary is represented
#                          by the same small BPE: the vocabulary's size changes no code path)
VARIANTS = {
    "phi-3.5-mini": {"config": {}, "template": CHAT_TEMPLATE},
    "phi-3.5-mini-longrope": {"config": {"max_position_embeddings": 4 * 2048, "original_max_position_embeddings": 2048,
                                         "rope_scaling": "longrope"}, "template": CHAT_TEMPLATE},
    "phi-3-mini-4k": {"config": {"max_position_embeddings": 4096, "original_max_position_embeddings": 4096,
                                 "sliding_window": 2047}, "template": CHAT_TEMPLATE},
    # 2 heads of 64 (Phi-4-mini: 24 of 128) sharing 1 key/value head: ONNX Runtime's attention kernel needs half
    # the rotary width (64 x 0.75 / 2 = 24; Phi-4-mini: 48) to be a multiple of 8.
    "phi-4-mini": {"config": {"partial_rotary_factor": 0.75, "tie_word_embeddings": True, "num_attention_heads": 2,
                              "num_key_value_heads": 1}, "template": PHI4_CHAT_TEMPLATE},
}

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


def build_tokenizer(sample_path, variant=DEFAULT_VARIANT):
    """Train a byte-level BPE on the sample and wrap it as a transformers fast tokenizer (the variant's template)."""
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
        chat_template=VARIANTS[variant]["template"],
        model_max_length=MAX_POSITIONS,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def build_model(tokenizer, variant=DEFAULT_VARIANT):
    """A randomly initialised Phi3ForCausalLM sized by MODEL_SIZE with the variant's traits, stopping at <|end|>."""
    import torch
    from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM

    end_id, eos_id = tokenizer.convert_tokens_to_ids(["<|end|>", "<|endoftext|>"])
    traits = dict(VARIANTS[variant]["config"])
    if traits.pop("rope_scaling", None) == "longrope":  # Phi-3.5-mini's: one factor per rotary frequency
        frequencies = MODEL_SIZE["hidden_size"] // MODEL_SIZE["num_attention_heads"] // 2
        traits["rope_scaling"] = {"rope_type": "longrope", "short_factor": [1.0] * frequencies,
                                  "long_factor": [1.0 + i / frequencies for i in range(frequencies)]}
    settings = {"max_position_embeddings": MAX_POSITIONS, "original_max_position_embeddings": MAX_POSITIONS,
                "tie_word_embeddings": False, **MODEL_SIZE, **traits}  # Phi-3 has a separate output layer; Phi-4 not
    model_config = Phi3Config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_id,
        pad_token_id=tokenizer.pad_token_id,
        **settings,
    )
    torch.manual_seed(0)
    model = Phi3ForCausalLM(model_config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[end_id, eos_id],  # a chat answer ends at <|end|>, as with Phi-3.5's own config
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def source_digest(sample_path, variant=DEFAULT_VARIANT):
    """What a build depends on: the recipe version, the variant and the sample's bytes."""
    digest = hashlib.sha256(Path(sample_path).read_bytes()).hexdigest()
    stamp = {"build_version": BUILD_VERSION, "sample_sha256": digest}
    return stamp if variant == DEFAULT_VARIANT else {**stamp, "variant": variant}


def holds_other_model(folder):
    """True when `folder` has files but no build stamp: a model of your own, never to be replaced."""
    folder = Path(folder)
    return folder.is_dir() and any(folder.iterdir()) and not (folder / STAMP_FILE).is_file()


def is_current(output_dir, sample_path, variant=DEFAULT_VARIANT):
    """True when `output_dir` holds a finished build from the same recipe, variant and sample."""
    stamp = Path(output_dir) / STAMP_FILE
    return stamp.is_file() and json.loads(stamp.read_text()) == source_digest(sample_path, variant)


def build_tiny_phi3(output_dir, sample_path, variant=DEFAULT_VARIANT):
    """Build tokenizer and model and save both into `output_dir` (atomically: a folder rename)."""
    output_dir = Path(output_dir)
    tokenizer = build_tokenizer(sample_path, variant)
    model = build_model(tokenizer, variant)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / STAMP_FILE).write_text(json.dumps(source_digest(sample_path, variant)))
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return model.num_parameters()


def ensure_tiny_phi3(output_dir=None, sample_path=None, force=False, variant=DEFAULT_VARIANT):
    """Return the tiny model's folder, building it (the variant's stand-in) first when missing or out of date."""
    output_dir = Path(output_dir or config.TINY_MODEL_DIR)
    sample_path = Path(sample_path or config.SAMPLE_DATASET_PATH)
    if holds_other_model(output_dir):
        raise FileExistsError(f"{config.shown(output_dir)} holds files this module did not build: "
                              "not replacing them (set TINY_MODEL_DIR to another folder, or LOCAL_BASE_MODEL to train yours)")
    if force or not is_current(output_dir, sample_path, variant):
        started = time.perf_counter()
        parameters = build_tiny_phi3(output_dir, sample_path, variant)
        what = "the tiny Phi-3 base model" if variant == DEFAULT_VARIANT else f"a tiny {variant} stand-in"
        print(f"Built {what} ({parameters / 1e6:.2f}M parameters) in "
              f"{config.shown(output_dir)} ({time.perf_counter() - started:.1f} s)")
    return output_dir


def main(argv=None):
    """Build the local base model."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=config.TINY_MODEL_DIR, help="default: %(default)s")
    parser.add_argument("--force", action="store_true", help="rebuild even if an up-to-date build exists")
    parser.add_argument("--variant", default=DEFAULT_VARIANT, choices=list(VARIANTS),
                        help="which base model's architecture the tiny model stands in for")
    args = parser.parse_args(argv)
    path = ensure_tiny_phi3(args.output_dir, force=args.force, variant=args.variant)
    print(f"Base model ready: {config.shown(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
