"""The local model registry: MLflow's own registry in mlflow.db (SQLite), standing in for Azure ML's models.

    register_local_model("finetune-phi-3-5-mini", "outputs/jobs/<job>/model_output", "<job>")  # -> "1", "2", ...

Each registration is a new version whose source is the job's folder itself, so the endpoint serves exactly
what was registered; the version the local endpoint serves carries the alias `serving` (set by deploy_model.py,
removed by cleanup.py). `make studio` shows them (Models).
"""

import logging

import config
from helpers.errors import StepError

# How SQLite words a write that found no room (a full disk, a quota, a file-size limit).
DISK_FULL_SIGNS = ("database or disk is full", "disk I/O error")


def register_local_model(model_name, model_dir, job_name):
    """Register the job's MLflow model as a new version of `model_name`; returns the version (a string)."""
    import mlflow

    mlflow.set_tracking_uri(config.MLFLOW_TRACKING_URI)
    database_log = logging.getLogger("mlflow.store.db.utils")  # logs each database error with a traceback, then
    level = database_log.level                                  # raises it: the step says it once, below
    database_log.setLevel(logging.CRITICAL)
    try:
        version = mlflow.register_model(str(model_dir), model_name, tags={"job_name": job_name})
    except Exception as error:  # noqa: BLE001 - MLflow and its database raise many types; all mean the same here
        text = str(error)
        if any(sign in text for sign in DISK_FULL_SIGNS):
            raise StepError(f"No room to write the local MLflow registry ({config.MLFLOW_TRACKING_URI}): free some "
                            "disk space and deploy again; the registry and the endpoint serving now are as they were.") from None
        raise StepError(f"Could not register the model in the local MLflow registry ({config.MLFLOW_TRACKING_URI}): "
                        f"{type(error).__name__}: {text.splitlines()[0] if text else ''}") from None
    finally:
        database_log.setLevel(level)
    print(f"Registered model {model_name}, version {version.version} (local MLflow registry, "
          f"source {config.shown(model_dir)})")
    return version.version


SERVING_ALIAS = "serving"


def mark_serving(model_name, version):
    """Point the alias `serving` at the version the local endpoint now serves (a warning if MLflow refuses)."""
    _set_alias(model_name, version)


def unmark_serving(model_name):
    """Remove the alias `serving`: nothing serves the model any more."""
    _set_alias(model_name, None)


def _set_alias(model_name, version):
    """Set (or, with version None, delete) the alias; the registry is bookkeeping: a failure only warns."""
    import warnings

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=config.MLFLOW_TRACKING_URI, registry_uri=config.MLFLOW_TRACKING_URI)
    try:
        if version is None:
            client.delete_registered_model_alias(model_name, SERVING_ALIAS)
        else:
            client.set_registered_model_alias(model_name, SERVING_ALIAS, str(version))
    except Exception as error:  # noqa: BLE001 - a missing model or alias, or a database error: not worth a failed step
        if version is not None:
            warnings.warn(f"Could not set the alias {SERVING_ALIAS!r} on {model_name} v{version}: {error}")
