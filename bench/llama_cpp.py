"""llama.cpp, the CPU peer of ONNX Runtime GenAI: built from PyPI's llama-cpp-python sdist, fed the same weights.

    python bench/llama_cpp.py --model models/smollm2-135m-instruct   # GGUF f32/Q8_0/Q4_0 of it, decode tokens/s each
    python bench/llama_cpp.py --build-only                           # only the build (~7 min on 2 cores, once)

Writes models/.llama.cpp/ (kept between runs; models/ is not in git): the sdist of llama-cpp-python 0.3.36, fetched
with `pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36` (PyPI has it as an sdist only) and
unpacked, and build/bin/ with llama-bench, llama-quantize and llama-perplexity, built from its vendor/llama.cpp
with cmake and ninja for this CPU (-DGGML_NATIVE=ON). build/stamp.json records the version, flags and targets:
while they match, nothing is rebuilt.

A transformers folder becomes GGUF with the sdist's own converter (`convert_hf_to_gguf.py --outtype f32`, its
gguf-py first on the path), then Q8_0 and Q4_0 with llama-quantize: llama.cpp's usual 8- and 4-bit formats (32
weights per block with one fp16 scale; llama-quantize keeps the output layer at Q6_K, as GGUF downloads do).
llama-bench times each: `-t <cores> -p 64 -n <new tokens> -d 64 -r <repeats> -o json`, so decoding starts with 64
tokens in the context, as bench/decode_runtimes.py's ONNX Runtime GenAI runs decode after a 64-token prompt.

Quality on given token ids: llama-perplexity's KL-divergence mode reads a file of token ids and a reference's
log-probabilities (write_kl_base below writes it from any runtime's logits) and scores a GGUF on exactly those
tokens; kl_statistics computes the same figures from another runtime's logits. bench/decode_runtimes.py uses
these functions for its llama.cpp rows and its --model comparison.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
VERSION = "0.3.36"  # llama-cpp-python on PyPI; its vendor/llama.cpp is what is built
CACHE_DIR = PROJECT_DIR / "models" / ".llama.cpp"
BUILD_DIR = CACHE_DIR / "build"
CMAKE_FLAGS = ["-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
               "-DGGML_NATIVE=ON",  # this CPU's instructions (AVX-512, AMX here), as a local build would
               "-DLLAMA_OPENSSL=OFF",  # no downloads: models come from files
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"]
TARGETS = ["llama-bench", "llama-quantize", "llama-perplexity"]
FORMATS = ["Q4_0", "Q8_0", "f32"]  # smallest first; f32 is the converter's output, the others llama-quantize's
PROMPT_TOKENS = 64


class LlamaCppError(RuntimeError):
    """llama.cpp could not be built or run as asked; the message says what to do."""


def source_dir():
    """The llama.cpp sources inside the unpacked sdist."""
    return CACHE_DIR / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"


def binary(name):
    """A built tool's path."""
    return BUILD_DIR / "bin" / name


def missing_build_tools():
    """The build tools that are not on PATH (cmake, ninja, a C++ compiler)."""
    compilers = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    missing = [tool for tool in ("cmake", "ninja") if not shutil.which(tool)]
    return missing + ([] if any(shutil.which(c) for c in compilers) else ["a C++ compiler (c++, g++ or clang++)"])


def fetch_source(log=print):
    """Download llama-cpp-python's sdist from PyPI and unpack it under models/.llama.cpp/ (once)."""
    if (source_dir() / "CMakeLists.txt").is_file():
        return source_dir()
    log(f"Downloading llama-cpp-python {VERSION} (sdist, ~77 MB) from PyPI")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llama-cpp-sdist-") as folder:
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q",
                                 "--no-deps", "--no-binary", ":all:", f"llama-cpp-python=={VERSION}", "-d", folder],
                                capture_output=True, text=True)
        archives = list(Path(folder).glob("llama_cpp_python-*.tar.gz"))
        if result.returncode or not archives:
            raise LlamaCppError(f"pip could not download llama-cpp-python=={VERSION}'s sdist from PyPI "
                                f"(is PyPI reachable?): {result.stderr.strip()[-1000:]}")
        with tarfile.open(archives[0]) as archive:
            archive.extractall(CACHE_DIR, filter="data")
    return source_dir()


def ensure_built(log=print):
    """Build llama-bench, llama-quantize and llama-perplexity once; return the folder that holds them."""
    stamp = BUILD_DIR / "stamp.json"
    wanted = {"llama_cpp_python": VERSION, "cmake_flags": CMAKE_FLAGS, "targets": TARGETS}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted and all(binary(t).is_file() for t in TARGETS):
        return binary(TARGETS[0]).parent
    missing = missing_build_tools()
    if missing:
        raise LlamaCppError(f"building llama.cpp needs cmake, ninja and a C++ compiler; missing: {', '.join(missing)}. "
                            "Install them (Debian/Ubuntu: sudo apt-get install cmake ninja-build g++; macOS: "
                            "xcode-select --install && brew install cmake ninja), or leave out the llama.cpp rows "
                            "(--runtimes).")
    source = fetch_source(log)
    log(f"Building llama.cpp ({', '.join(TARGETS)}) in {BUILD_DIR.relative_to(PROJECT_DIR)} "
        f"(~7 minutes on 2 cores, once)")
    started = time.perf_counter()
    for command in (["cmake", "-S", str(source), "-B", str(BUILD_DIR), *CMAKE_FLAGS],
                    ["cmake", "--build", str(BUILD_DIR), "-j", str(os.cpu_count() or 2), "--target", *TARGETS]):
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            raise LlamaCppError(f"`{' '.join(command)}` failed; its output ended:\n"
                                f"{(result.stdout + result.stderr)[-3000:]}")
    stamp.write_text(json.dumps(wanted, indent=2) + "\n")
    log(f"Built llama.cpp in {time.perf_counter() - started:.0f} s")
    return binary(TARGETS[0]).parent


def run_tool(command, what):
    """Run a llama.cpp tool or script; its output, or LlamaCppError with its last lines."""
    # The converter's own gguf-py first: it may be newer than the gguf package installed beside it.
    path = os.pathsep.join(filter(None, [str(source_dir() / "gguf-py"), os.environ.get("PYTHONPATH")]))
    result = subprocess.run([str(part) for part in command], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": path})
    if result.returncode:
        output = (result.stdout + result.stderr)[-3000:]
        hint = (" (pip install sentencepiece: llama.cpp's converter imports it for SentencePiece and Llama-family "
                "tokenizers)") if "No module named 'sentencepiece'" in output else ""
        raise LlamaCppError(f"{what} failed{hint}; its output ended:\n{output}")
    return result.stdout + result.stderr


def convert_to_gguf(model_dir, output):
    """A transformers folder as one f32 GGUF file, by the sdist's own convert_hf_to_gguf.py."""
    run_tool([sys.executable, source_dir() / "convert_hf_to_gguf.py", model_dir, "--outtype", "f32",
              "--outfile", output], f"converting {model_dir} to GGUF")
    return Path(output)


def quantize(source, output, kind, threads):
    """llama-quantize's `kind` (Q8_0, Q4_0, ...) of an f32 GGUF file."""
    run_tool([binary("llama-quantize"), source, output, kind, threads], f"llama-quantize {kind}")
    return Path(output)


def gguf_files(model_dir, folder, formats=FORMATS, threads=None, log=print):
    """{format: GGUF file} of a transformers folder: f32 converted, the others quantized from it."""
    threads = threads or os.cpu_count()
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    f32 = convert_to_gguf(model_dir, folder / "model-f32.gguf")
    files = {kind: f32 if kind == "f32" else quantize(f32, folder / f"model-{kind}.gguf", kind, threads)
             for kind in formats}
    log(f"  GGUF {', '.join(formats)} of {Path(model_dir).name} in {time.perf_counter() - started:.0f} s")
    if "f32" not in formats:
        f32.unlink()
    return files


def weight_bytes_per_token(path):
    """Bytes of weights one decoded token reads from a GGUF: all tensors but the input embedding table, unless
    it is also the output layer (tied embeddings: no output.weight)."""
    if str(source_dir() / "gguf-py") not in sys.path:
        sys.path.insert(0, str(source_dir() / "gguf-py"))  # the reader of the converter that wrote the file
    from gguf import GGUFReader

    tensors = {tensor.name: int(tensor.n_bytes) for tensor in GGUFReader(path).tensors}
    tied = "output.weight" not in tensors
    return sum(size for name, size in tensors.items() if tied or name != "token_embd.weight")


def bench_command(path, threads, new_tokens, repeats):
    """llama-bench's command: the prompt test and the decode test, both after 64 tokens in the context."""
    return [binary("llama-bench"), "-m", path, "-t", threads, "-p", PROMPT_TOKENS, "-n", new_tokens,
            "-d", PROMPT_TOKENS, "-r", repeats, "-o", "json"]


def parse_bench_json(text):
    """llama-bench's `-o json` output as {decode, prefill tokens/s (the fastest repetition), and what ran}."""
    tests = json.loads(text[text.index("["):])  # anything logged before the JSON array is skipped
    decode = [test for test in tests if test["n_gen"] > 0 and test["n_prompt"] == 0]
    prefill = [test for test in tests if test["n_prompt"] > 0 and test["n_gen"] == 0]
    if not decode:
        raise LlamaCppError(f"llama-bench reported no decode test (n_gen > 0): {text[:500]}")
    return {"decode_tokens_per_second": max(decode[0]["samples_ts"]),
            "decode_tokens_per_second_mean": decode[0]["avg_ts"],
            "prefill_tokens_per_second": max(prefill[0]["samples_ts"]) if prefill else None,
            "new_tokens": decode[0]["n_gen"], "depth": decode[0].get("n_depth", 0),
            "threads": decode[0]["n_threads"], "model_type": decode[0]["model_type"],
            "build_commit": decode[0]["build_commit"], "cpu_info": decode[0]["cpu_info"]}


def bench(path, threads, new_tokens, repeats):
    """Decode and prefill tokens/s of one GGUF file (llama-bench)."""
    output = subprocess.run([str(part) for part in bench_command(path, threads, new_tokens, repeats)],
                            capture_output=True, text=True)
    if output.returncode:
        raise LlamaCppError(f"llama-bench failed on {path}; its output ended:\n{output.stderr[-2000:]}")
    return parse_bench_json(output.stdout)


# --- quality on given token ids: llama-perplexity's KL-divergence file, written and read here -----------------

def encode_log_probs(logits):
    """Rows of logits as llama-perplexity stores log-probs: per row two float32 (scale, minimum) then one uint16 a
    token, log-probs below the top's minus 16 clipped (tools/perplexity/perplexity.cpp, log_softmax)."""
    import numpy as np

    logits = np.asarray(logits, dtype=np.float32)
    rows, vocab = logits.shape
    top = logits.max(axis=1, keepdims=True)
    low = np.maximum(logits.min(axis=1, keepdims=True), top - 16)
    log_sum_exp = np.log(np.exp(logits - top).sum(axis=1, keepdims=True, dtype=np.float64)).astype(np.float32)
    scale = (top - low) / np.float32(65535)
    inverse = np.divide(1, scale, out=np.zeros_like(scale), where=scale > 0)
    encoded = np.zeros((rows, 2 * ((vocab + 1) // 2) + 4), dtype=np.uint16)
    encoded[:, :4] = np.concatenate([scale, low - top - log_sum_exp], axis=1).astype(np.float32).view(np.uint16)
    encoded[:, 4:4 + vocab] = np.where(logits > low, np.rint(inverse * (logits - low)), 0).astype(np.uint16)
    return encoded


def decode_log_probs(encoded, vocab):
    """The log-probs back from encode_log_probs' rows."""
    import numpy as np

    scale_minimum = np.ascontiguousarray(encoded[:, :4]).view(np.float32)
    return scale_minimum[:, :1] * encoded[:, 4:4 + vocab].astype(np.float32) + scale_minimum[:, 1:2]


def scored_positions(context):
    """The positions of a chunk whose next token is scored: its second half, as llama-perplexity does."""
    return range(context // 2, context - 1)


def write_kl_base(path, chunks, logits_of_chunk):
    """The file `llama-perplexity --kl-divergence-base` reads: the chunks' token ids and, per chunk, the reference's
    log-probs at the scored positions (logits_of_chunk(ids) -> logits of every position)."""
    import numpy as np

    chunks = np.asarray(chunks, dtype=np.int32)
    count, context = chunks.shape
    with open(path, "wb") as file:
        first = logits_of_chunk(chunks[0])
        file.write(b"_logits_" + np.array([context, first.shape[1], count], dtype=np.int32).tobytes())
        file.write(chunks.tobytes())
        for index, chunk in enumerate(chunks):
            logits = first if index == 0 else logits_of_chunk(chunk)
            file.write(encode_log_probs(logits[scored_positions(context)]).tobytes())
    return Path(path)


def read_kl_base(path):
    """(chunks of token ids, vocabulary size, a function chunk index -> encoded log-prob rows) of a base file."""
    import numpy as np

    header = np.fromfile(path, dtype=np.int32, count=5, offset=0)
    context, vocab, count = (int(n) for n in header[2:5])
    chunks = np.fromfile(path, dtype=np.int32, count=count * context, offset=20).reshape(count, context)
    rows, width = len(scored_positions(context)), 2 * ((vocab + 1) // 2) + 4
    table = np.memmap(path, dtype=np.uint16, mode="r", offset=20 + chunks.nbytes, shape=(count, rows, width))
    return chunks, vocab, lambda index: np.asarray(table[index])


def kl_statistics(base_path, logits_of_chunk):
    """Perplexity, mean KL divergence from the base and the share of the same top token, for a runtime that gives
    logits (logits_of_chunk(ids) -> logits of every position), computed as llama-perplexity computes them."""
    import numpy as np

    chunks, vocab, base_rows = read_kl_base(base_path)
    nll, kld, same_top, count = 0.0, 0.0, 0, 0
    for index, chunk in enumerate(chunks):
        positions = scored_positions(len(chunk))
        logits = np.asarray(logits_of_chunk(chunk), dtype=np.float32)[positions][:, :vocab].astype(np.float64)
        log_probs = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
        base = decode_log_probs(base_rows(index), vocab).astype(np.float64)
        targets = chunk[positions.start + 1:positions.stop + 1]
        nll -= log_probs[np.arange(len(targets)), targets].sum()
        kld += np.where(base > -16, np.exp(base) * (base - log_probs), 0).sum()
        same_top += int((logits.argmax(axis=1) == base.argmax(axis=1)).sum())
        count += len(targets)
    return {"perplexity": float(np.exp(nll / count)), "kl_divergence": kld / count, "same_top": same_top / count,
            "tokens": count}


def parse_kl_output(text):
    """llama-perplexity --kl-divergence's summary: perplexity, mean KL divergence, share of the same top token."""
    figures = {}
    patterns = {"perplexity": r"Mean PPL\(Q\)\s*:\s*([-\d.]+)", "kl_divergence": r"Mean\s+KLD:\s*([-\d.]+)",
                "same_top": r"Same top p:\s*([-\d.]+)"}
    for key, pattern in patterns.items():
        match = re.search(pattern, text)
        if not match:
            raise LlamaCppError(f"llama-perplexity printed no '{key}' figure; its output ended:\n{text[-2000:]}")
        figures[key] = float(match.group(1))
    figures["same_top"] /= 100
    return figures


def kl_divergence(path, base_path, threads):
    """Perplexity, KL divergence and same top token of one GGUF file on the base file's tokens (llama-perplexity)."""
    import numpy as np

    context = int(np.fromfile(base_path, dtype=np.int32, count=3)[2])
    output = run_tool([binary("llama-perplexity"), "-m", path, "--kl-divergence-base", base_path, "--kl-divergence",
                       "-c", context, "-b", context, "-t", threads], f"llama-perplexity on {Path(path).name}")
    return parse_kl_output(output)


def parse_args(argv=None):
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", type=Path, help="a transformers model folder to convert and time")
    parser.add_argument("--build-only", action="store_true", help="build llama.cpp and stop")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="llama-bench repetitions (the fastest counts)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads (this machine's cores unless set)")
    args = parser.parse_args(argv)
    if not args.model and not args.build_only:
        parser.error("give --model FOLDER (or --build-only)")
    return args


def main(argv=None):
    """Build llama.cpp once; then convert, quantize and time the model in each format."""
    args = parse_args(argv)
    try:
        ensure_built()
        if args.build_only:
            return 0
        with tempfile.TemporaryDirectory(prefix="llama-cpp-gguf-") as folder:
            for kind, path in gguf_files(args.model, Path(folder), threads=args.threads).items():
                figures = bench(path, args.threads, args.new_tokens, args.repeats)
                print(f"  llama.cpp {kind:<5} {figures['decode_tokens_per_second']:8.2f} tokens/s decode, "
                      f"{weight_bytes_per_token(path) / 1e9:.3f} GB read per token")
    except LlamaCppError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
