"""The stage set: everything that stands in for Azure on this machine, so each step also runs locally.

A reader who only wants the tutorial never opens this package. Each step calls into it in one short,
clearly marked place when TARGET=local:

| module             | stands in for                                    | used by                          |
|--------------------|--------------------------------------------------|----------------------------------|
| tiny_model.py      | microsoft/Phi-3.5-mini-instruct (a tiny Phi-3)   | the local job                    |
| job_runner.py      | the AmlCompute cluster and the command job       | setup_ml.py                      |
| model_registry.py  | the workspace's model registry (MLflow, SQLite)  | deploy_model.py                  |
| endpoint_server.py | the managed online endpoint's server             | endpoint_process.py              |
| endpoint_process.py| the deployment's container: start, ready, stop   | deployment, evaluate_flow, bench, tests |
| deployment.py      | the endpoint's blue/green deployments, traffic   | deploy_model.py, cleanup.py      |
| sandbox.py         | (for tests and benchmarks) a throwaway project   | tests/conftest.py, bench/        |
"""
