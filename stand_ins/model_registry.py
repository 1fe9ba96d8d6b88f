"""The local model registry: MLflow's own registry in mlflow.db (SQLite), standing in for Azure ML's models.

    register_local_model("finetune-phi-3-5-mini", "outputs/jobs/<job>/model_output", "<job>")  # -> "1", "2", ...

Each registration is a new version whose source is the job's folder itself, so the endpoint serves exactly
what was registered. `mlflow ui --backend-store-uri sqlite:///mlflow.db` shows them.
"""

import config
from step_errors import StepError


def register_local_model(model_name, model_dir, job_name):
    """Register the job's MLflow model as a new version of `model_name`; returns the version (a string)."""
    import mlflow

    mlflow.set_tracking_uri(config.MLFLOW_TRACKING_URI)
    try:
        version = mlflow.register_model(str(model_dir), model_name, tags={"job_name": job_name})
    except Exception as error:  # noqa: BLE001 - MLflow and its database raise many types; all mean the same here
        raise StepError(f"Could not register the model in the local MLflow registry ({config.MLFLOW_TRACKING_URI}): "
                        f"{type(error).__name__}: {error}") from error
    print(f"Registered model {model_name}, version {version.version} (local MLflow registry, "
          f"source {config.shown(model_dir)})")
    return version.version
