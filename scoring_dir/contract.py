"""The endpoint's contract: the values every side of it agrees on, defined once.

score.py imports this file as its neighbour (Azure ML uploads scoring_dir/ as the deployment's code, and the
inference server puts that folder on sys.path, as stand_ins/endpoint_server.py does); the steps, the local
endpoint, the flow, the benchmarks and the tests import it as `scoring_dir.contract`. Limits a deployment may
change arrive in score.py as environment variables whose defaults are here.
"""

SCORE_PATH = "/score"  # the managed online endpoint's: {"input_data": ..., "params": {...}} -> ["answer", ...]
# Azure's serverless endpoints (OpenAI's contract) answer here, under their scoring URI; so does the local endpoint.
CHAT_COMPLETIONS_PATH = "/v1/chat/completions"

# The params a request may send, with their defaults; score.py's check_params() says what each may be.
PARAMS = {
    "max_new_tokens": 128,
    "temperature": 0.7,  # used only with do_sample: higher is more varied, lower more predictable
    "top_p": 1.0,  # used only with do_sample: 1.0 samples from every token, 0.9 from the likeliest 90%
    "do_sample": False,  # false: greedy decoding, the same answer every time
    "return_full_text": False,  # true: the answer starts with the question (the tutorial's client asks for it)
}
ROLES = ("system", "user", "assistant")
MAX_JSON_DEPTH = 16  # {"input_data": [[{"role": ..., "content": ...}]]} is 4 levels; deeper is not a request

# What score.py reads from its environment: the deployment sets them from config.py (deploy_model.py), and so does
# the local endpoint's server (stand_ins/endpoint_server.py). config.py takes the limits' defaults from here.
SCORE_ENVIRONMENT = ("MAX_NEW_TOKENS_LIMIT", "MAX_INPUTS_PER_REQUEST", "SERVING_RUNTIME")
DEFAULT_MAX_NEW_TOKENS_LIMIT = 512  # a CPU instance writes a few tokens a second with Phi-3.5-mini
# Phi-3.5-mini on a Standard_E4s_v3 (docs/benchmarks.md, section 5): an int4 ONNX export decodes ~5 tokens/s,
# one input after another, so 4 inputs x 128 new tokens take ~100 s, within Azure's 180 s request timeout;
# transformers decodes ~1 token/s (a batch of 4 costs ~1.3x one): set MAX_INPUTS_PER_REQUEST=1 for it.
DEFAULT_MAX_INPUTS_PER_REQUEST = 4

# Blue/green: deployment names end in -blue / -green; a new deployment goes to the slot not serving.
SLOTS = ("blue", "green")

# Step 3 asks every new deployment this before it gets the traffic.
SMOKE_QUESTION = "Who founded Microsoft?"
SMOKE_MAX_NEW_TOKENS = 64


def speaks_chat_completions(url):
    """True when `url` is a chat-completions URL (serverless, or the local /v1/chat/completions), else /score."""
    from urllib.parse import urlsplit

    return urlsplit(url).path.rstrip("/").endswith("/chat/completions")
