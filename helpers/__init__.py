"""The steps' shared helpers: what two or more steps need, each module named for what it holds.

A reader who follows the tutorial meets these through one import line in a step; the stage set that lets the
steps run on this machine is the other package, stand_ins/, and the serverless road is serverless/.

| module         | what it holds                                                                      | used by            |
|----------------|------------------------------------------------------------------------------------|--------------------|
| errors.py      | StepError and exit_code(): the one way a step fails                                | every step         |
| files.py       | atomic writes, generated files that keep your edits, .env updates (mode 600)       | steps 1-3          |
| job_record.py  | outputs/last_job.json: the job step 2 ran, found by step 3                         | steps 2-3          |
| azure_ml.py    | the MLClient, Azure's refusals as sentences, name rules, offline validation, waits | steps 2-3, cleanup |
| preflight.py   | what Azure must allow before anything is billed, asked and printed (--check)       | steps 2-3 (Azure)  |
| serving_speed.py | the served runtime's measured speed -> concurrency and probe delays              | step 3 (Azure ML)  |
| endpoint.py    | the smoke request every new endpoint answers, and publishing its URL and key       | step 3 (all roads) |
| metrics.py     | answer scores (azure-ai-evaluation), summaries, percentiles, the comparison chart   | evaluate_flow, bench |

The endpoint contract's values (paths, params, limits, slots) live beside score.py: scoring_dir/contract.py.
"""
