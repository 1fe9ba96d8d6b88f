"""Every script: a docstring that opens with its command, --help, and nothing heavy at import."""

import ast

import pytest

from conftest import PROJECT_DIR, run_script

SCRIPTS = ["config.py", "download_dataset.py", "stand_ins/tiny_model.py", "setup_ml.py", "deploy_model.py", "cleanup.py",
           "stand_ins/endpoint_server.py", "integrate_with_promptflow.py", "evaluate_flow.py", "finetuning_dir/fine_tune.py",
           "finetuning_dir/onnx_export.py", "finetuning_dir/memory_estimate.py"]
STEPS = ["download_dataset.py", "setup_ml.py", "deploy_model.py", "integrate_with_promptflow.py", "evaluate_flow.py",
         "cleanup.py"]
TUTORIAL_FUNCTIONS = {  # ../shared/TUTORIAL.md: each step script opens with these, in this order
    "download_dataset.py": ["load_and_split_dataset", "save_dataset_to_jsonl"],
    "setup_ml.py": ["create_or_get_environment", "create_or_get_compute_cluster", "create_fine_tuning_job"],
    "deploy_model.py": ["register_model", "create_or_update_endpoint", "create_or_update_deployment",
                        "set_traffic_to_deployment"],
    "integrate_with_promptflow.py": ["query_azml_endpoint", "setup_asyncio_policy", "my_python_tool"],
}
HEAVY = ("torch", "transformers", "trl", "datasets", "mlflow", "azure.ai.ml", "peft")


def command_of(script):
    """How a user runs it: `python x.py`, or `python -m stand_ins.x` for a module of the stand-ins package."""
    return ("-m", script.removesuffix(".py").replace("/", ".")) if script.startswith("stand_ins/") else (script,)


def existing(scripts):
    """The scripts of this list that the repository has."""
    return [script for script in scripts if (PROJECT_DIR / script).is_file()]


@pytest.mark.parametrize("script", existing(SCRIPTS))
def test_docstring_opens_with_the_command(script):
    docstring = ast.get_docstring(ast.parse((PROJECT_DIR / script).read_text()))
    assert docstring, f"{script} has no module docstring"
    command_lines = [line.strip() for line in docstring.splitlines() if line.strip().startswith(("python ", "TARGET="))]
    assert command_lines, f"{script}'s docstring shows no command"
    assert any(" ".join(command_of(script)) in line or script.split("/")[-1] in line for line in command_lines)


@pytest.mark.parametrize("script", existing([s for s in SCRIPTS if s != "config.py"]))
def test_answers_help(script):
    result = run_script(*command_of(script), "--help", env={"LOCAL_ENDPOINT_KEY": ""})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout


@pytest.mark.parametrize("script", existing(SCRIPTS))
def test_import_is_light(script):
    module = script.removesuffix(".py").replace("/", ".")
    code = (f"import sys; sys.path.insert(0, {str(PROJECT_DIR / 'finetuning_dir')!r}); import {module}; "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    result = run_script("-c", code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", f"importing {script} loads {result.stdout.strip()}"


def test_every_top_level_script_has_a_main_under_a_run_guard():
    for script in existing(SCRIPTS):
        tree = ast.parse((PROJECT_DIR / script).read_text())
        functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        guards = [node for node in tree.body if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)]
        assert "main" in functions and guards, script


def test_project_uses_no_hard_coded_path_separators():
    for path in PROJECT_DIR.glob("*.py"):
        source = path.read_text()
        assert "os.path.join" not in source and '+ "/"' not in source, path.name


def imported_top_names(path):
    """The top-level names a Python file imports (`helpers` for `from helpers.errors import ...`)."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            imported.add(node.module.split(".")[0])
    return imported


@pytest.mark.parametrize("script", STEPS)
def test_a_step_script_imports_no_other_step(script):
    imported = imported_top_names(PROJECT_DIR / script)
    others = {step.removesuffix(".py") for step in STEPS} - {script.removesuffix(".py")}
    assert not imported & others, f"{script} imports the step script(s) {sorted(imported & others)}"


@pytest.mark.parametrize("package", ["helpers", "serverless", "stand_ins", "scoring_dir", "finetuning_dir"])
def test_shared_code_never_imports_a_step(package):
    steps = {step.removesuffix(".py") for step in STEPS}
    for path in (PROJECT_DIR / package).glob("*.py"):
        assert not imported_top_names(path) & steps, f"{package}/{path.name} imports a step script"


def test_the_top_level_is_the_tutorial():
    """The mission's list at the top, plus what every Python project has and our named folders; nothing else."""
    tutorial = {"finetuning_dir", "conda.yml", "config.py", "download_dataset.py", "setup_ml.py", "deploy_model.py",
                "flow.dag.yml", "integrate_with_promptflow.py", "tests", "README.md"}
    project = {"Makefile", "requirements.txt", "requirements-gpu.txt", "requirements-pretrained.txt", "constraints.txt",
               "docs", ".env.example", ".gitignore", ".amlignore", ".ci", "pytest.ini"}
    ours = {"scoring_dir", "stand_ins", "bench", "evaluate_flow.py", "cleanup.py", "helpers", "serverless",
            "recipes", "sample_data"}
    import subprocess

    tracked = subprocess.run(["git", "ls-files"], cwd=PROJECT_DIR, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    top = {path.split("/")[0] for path in tracked}
    assert top <= tutorial | project | ours, f"unexpected at the top level: {sorted(top - tutorial - project - ours)}"
    assert tutorial <= top, f"missing at the top level: {sorted(tutorial - top)}"


@pytest.mark.parametrize("script", sorted(TUTORIAL_FUNCTIONS))
def test_a_step_script_opens_with_the_tutorials_functions(script):
    tree = ast.parse((PROJECT_DIR / script).read_text())
    functions = [node.name for node in tree.body if isinstance(node, ast.FunctionDef)]
    expected = TUTORIAL_FUNCTIONS[script]
    assert functions[:len(expected)] == expected, functions[:len(expected) + 2]


def test_steps_that_talk_to_azure_share_the_tutorials_get_ml_client():
    from helpers import azure_ml
    import cleanup
    import deploy_model
    import setup_ml

    assert setup_ml.get_ml_client is deploy_model.get_ml_client is cleanup.get_ml_client is azure_ml.get_ml_client


def test_tests_never_import_the_benchmarks():
    for path in (PROJECT_DIR / "tests").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(name.split(".")[0] == "bench" for name in names), path.name


def test_the_training_jobs_generation_params_are_the_contracts():
    # fine_tune.py runs in a job that uploads finetuning_dir/ alone, so it keeps a copy of the contract's defaults.
    import fine_tune
    from scoring_dir.contract import PARAMS

    assert fine_tune.GENERATION_PARAMS == PARAMS
