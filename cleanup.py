"""Stop what the tutorial left running — the tutorial's "delete the endpoint to avoid charges", as a command.

    python cleanup.py                              # local: stops the local endpoint(s)
    TARGET=azure python cleanup.py                 # Azure: deletes the online endpoint (asks first)
    TARGET=azure python cleanup.py --yes --compute # ... without asking, and the compute cluster too
    TARGET=serverless python cleanup.py            # Azure AI Foundry: deletes the serverless endpoint (asks first)

It says what it stopped or deleted and what still costs money. Running it again is harmless. Your data,
models, jobs and the local MLflow registry are never deleted.
"""

import argparse
import sys

import config
from helpers.azure_ml import azure_errors, get_ml_client
from helpers.errors import StepError, exit_code
import serverless


def confirm(question, assume_yes):
    """Ask a yes/no question on the terminal (no terminal and no --yes: no)."""
    if assume_yes:
        return True
    if not sys.stdin or not sys.stdin.isatty():
        print(f"{question} -> not confirmed (no terminal); rerun with --yes")
        return False
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def delete_azure_endpoint(ml_client, endpoint_name, assume_yes):
    """Delete the online endpoint and its deployments; returns a line saying what happened."""
    from azure.core.exceptions import ResourceNotFoundError

    try:
        endpoint = ml_client.online_endpoints.get(endpoint_name)
    except ResourceNotFoundError:
        return f"endpoint {endpoint_name}: not found (already deleted)"
    deployments = ", ".join(endpoint.traffic or {}) or "no deployments"
    if not confirm(f"Delete endpoint {endpoint_name} ({deployments}) and its URL and keys?", assume_yes):
        return f"endpoint {endpoint_name}: kept (still billed per deployment instance hour)"
    print(f"Deleting endpoint {endpoint_name} (a few minutes) ...")
    ml_client.online_endpoints.begin_delete(name=endpoint_name).result()
    return f"endpoint {endpoint_name}: deleted, with {deployments}"


def delete_azure_compute(ml_client, compute_name, assume_yes):
    """Delete the training cluster; returns a line saying what happened."""
    from azure.core.exceptions import ResourceNotFoundError

    try:
        ml_client.compute.get(compute_name)
    except ResourceNotFoundError:
        return f"compute cluster {compute_name}: not found (already deleted)"
    if not confirm(f"Delete compute cluster {compute_name}?", assume_yes):
        return f"compute cluster {compute_name}: kept"
    ml_client.compute.begin_delete(compute_name).result()
    return f"compute cluster {compute_name}: deleted"


def cleanup_azure(assume_yes, delete_compute):
    """Delete the endpoint (and optionally the cluster) and say what is still billed."""
    config.require(*config.AZURE_WORKSPACE_SETTINGS, "AZURE_ENDPOINT_NAME")
    ml_client = get_ml_client()
    with azure_errors():
        done = [delete_azure_endpoint(ml_client, config.AZURE_ENDPOINT_NAME, assume_yes)]
        if delete_compute:
            done.append(delete_azure_compute(ml_client, config.AZURE_COMPUTE_NAME, assume_yes))
    for line in done:
        print(f"  - {line}")
    print("Still in your subscription (and billed while they exist):")
    if not delete_compute:
        print(f"  - compute cluster {config.AZURE_COMPUTE_NAME}: nothing while scaled to 0 nodes; --compute deletes it")
    print(f"  - workspace {config.AZURE_ML_WORKSPACE_NAME} with its storage account, container registry and key vault "
          "(small monthly storage and registry fees)")
    print(f"  Remove everything: az group delete --name {config.AZURE_RESOURCE_GROUP_NAME}")
    return 0


def cleanup_local():
    """Stop the local endpoint's slots (stand_ins/deployment.py); say what was stopped and what was noticed."""
    from stand_ins.deployment import stop_local_endpoints

    stopped, problems = stop_local_endpoints()
    for line in stopped:
        print(f"Stopped {line}.")
    for problem in problems:  # a damaged pid or state file: said, removed, and the rest still cleaned up
        print(f"warning: {problem}; if an endpoint still runs, stop it by hand "
              "(its command line shows stand_ins.endpoint_server)", file=sys.stderr)
    if not stopped:
        print("No local endpoint is running.")
    print("Nothing local costs money. Data, models, jobs and mlflow.db are kept (make clean removes them).")
    return 0


def main(argv=None):
    """Clean up for config.TARGET; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--yes", action="store_true", help="Azure and serverless: delete without asking")
    parser.add_argument("--compute", action="store_true", help="Azure: delete the compute cluster too")
    args = parser.parse_args(argv)
    try:
        if config.TARGET == "azure":
            return cleanup_azure(args.yes, args.compute)
        if config.TARGET == "serverless":
            return serverless.cleanup(lambda question: confirm(question, args.yes))
        return cleanup_local()
    except StepError as error:  # config.MissingSettingsError included
        return exit_code(error)


if __name__ == "__main__":
    sys.exit(main())
