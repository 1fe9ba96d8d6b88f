"""How fast the deployment will answer, from what the training job measured, and the endpoint settings that follow.

deploy_model.py asks `endpoint_settings(record)` for the deployment's max_concurrent_requests_per_instance and probe
delays. `record` is the job's export record (model_output/onnx_export.json, finetuning_dir/onnx_export.py): the
tokens/s of the ONNX export it chose, measured on held-out questions. Without one (no export, a GPU instance, or
SERVING_RUNTIME=transformers) the stated default below is used, and the output says so.
"""

import math
from dataclasses import dataclass

import config
from scoring_dir.contract import PARAMS

# transformers decoding Phi-3.5-mini on a Standard_E4s_v3 (docs/benchmarks.md, section 5): about 1 token/s.
DEFAULT_TOKENS_PER_SECOND = 1.0
# The ONNX export loads in well under a second; transformers reads 7.6 GB of weights first (the tutorial's 500 s).
PROBE_INITIAL_DELAY_S = {"onnxruntime-genai": 10, "transformers": 500}
PROBE_PERIOD_S = {"onnxruntime-genai": 10, "transformers": 100}
PROBE_FAILURE_THRESHOLD = 30  # x the period: how long a slow container start is tolerated before a restart


@dataclass
class EndpointSettings:
    """What deploy_model.py sets, and where the speed came from (printed)."""

    runtime: str
    tokens_per_second: float
    source: str
    max_concurrent_requests: int
    seconds_per_request: float
    probe_initial_delay_s: int
    probe_period_s: int


def served_runtime(record, has_gpu):
    """The runtime score.py will pick on the deployment (its SERVING_RUNTIME rule): the export on a CPU, if any."""
    if config.SERVING_RUNTIME in ("transformers", "onnxruntime-genai"):
        return config.SERVING_RUNTIME
    return "onnxruntime-genai" if record and record.get("chosen") and not has_gpu else "transformers"


def measured_speed(record, runtime):
    """(tokens/s, where it comes from): the export's measured speed, else DEFAULT_TOKENS_PER_SECOND."""
    chosen = (record or {}).get("chosen")
    figures = (record or {}).get("candidates", {}).get(chosen or "", {})
    if runtime == "onnxruntime-genai" and figures.get("tokens_per_second"):
        return float(figures["tokens_per_second"]), f"measured by the job ({chosen} ONNX export, onnx_export.json)"
    return DEFAULT_TOKENS_PER_SECOND, "the stated default (no export measurement for this runtime)"


def endpoint_settings(record, has_gpu=False):
    """max_concurrent_requests_per_instance and probe timing for the deployment, from the served runtime's speed."""
    runtime = served_runtime(record, has_gpu)
    tokens_per_second, source = measured_speed(record, runtime)
    # One request of MAX_INPUTS_PER_REQUEST inputs x the default max_new_tokens takes t = inputs x tokens / (tokens/s)
    # in one worker; AZURE_WORKER_COUNT workers answer in parallel. Azure admits about 2 x max_concurrent requests per
    # instance before it answers 429, so the last one admitted finishes after ceil(2c / workers) x t: that must fit
    # in REQUEST_TIMEOUT_MS. So c = floor(timeout x workers / (2 t)), at least 1 (then a request slower than the
    # timeout alone is refused as 408/504, and the output warns). E.g. 5 tokens/s, 4 x 128 tokens: t = 102 s,
    # c = floor(180 x 1 / 205) -> 1; 50 tokens/s: t = 10 s, c = 8.
    seconds = config.MAX_INPUTS_PER_REQUEST * PARAMS["max_new_tokens"] / tokens_per_second
    timeout_s = config.REQUEST_TIMEOUT_MS / 1000
    concurrent = max(1, math.floor(timeout_s * config.AZURE_WORKER_COUNT / (2 * seconds)))
    return EndpointSettings(runtime, tokens_per_second, source, concurrent, round(seconds, 1),
                            PROBE_INITIAL_DELAY_S[runtime], PROBE_PERIOD_S[runtime])
