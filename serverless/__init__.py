"""The serverless road (TARGET=serverless): Azure AI Foundry fine-tunes a catalogue Phi and hosts it, billed per token.

    TARGET=serverless python download_dataset.py         # step 1 also writes data/{train,test}_chat.jsonl
    TARGET=serverless python setup_ml.py [--dry-run]     # step 2: serverless/job.py
    TARGET=serverless python deploy_model.py [--dry-run] # step 3: serverless/endpoint.py
    TARGET=serverless python cleanup.py                  # deletes the serverless endpoint (asks first)

Each step reaches this road through one line (`serverless.finetune(...)`, `serverless.deploy(...)`, ...), so a
reader of the steps for Azure ML keeps one road in mind. Missing settings stop a step before any network call;
the preflight (helpers/preflight.py) asks Azure the rest before anything is billed, and Azure's usual refusals of
this road (region, provider registration, role, quota) become one sentence (serverless/azure_checks.py).

| module           | what it holds                                                                     |
|------------------|-----------------------------------------------------------------------------------|
| chat_data.py     | step 1: the chat-completions JSONL that serverless fine-tuning reads              |
| job.py           | step 2: the fine-tuning job, submitted and followed until it ends                 |
| endpoint.py      | step 3: the serverless endpoint, its smoke request and .env; its deletion         |
| azure_checks.py  | the base model's facts from the registry (retired? regions) and Azure's refusals  |
"""

from serverless.chat_data import save_chat_completions_jsonl
from serverless.endpoint import cleanup, deploy
from serverless.job import finetune

__all__ = ["cleanup", "deploy", "finetune", "save_chat_completions_jsonl"]
