"""Every script: a docstring that opens with its command, --help, and nothing heavy at import."""

import ast

import pytest

from conftest import PROJECT_DIR, run_script

SCRIPTS = ["config.py", "download_dataset.py", "tiny_phi3.py", "setup_ml.py", "deploy_model.py", "cleanup.py",
           "local_endpoint.py", "integrate_with_promptflow.py", "evaluate_flow.py", "finetuning_dir/fine_tune.py"]
HEAVY = ("torch", "transformers", "trl", "datasets", "mlflow", "azure.ai.ml", "peft")


def existing(scripts):
    """The scripts of this list that the repository has."""
    return [script for script in scripts if (PROJECT_DIR / script).is_file()]


@pytest.mark.parametrize("script", existing(SCRIPTS))
def test_docstring_opens_with_the_command(script):
    docstring = ast.get_docstring(ast.parse((PROJECT_DIR / script).read_text()))
    assert docstring, f"{script} has no module docstring"
    command_lines = [line.strip() for line in docstring.splitlines() if line.strip().startswith(("python ", "TARGET="))]
    assert command_lines, f"{script}'s docstring shows no command"
    assert any(script.split("/")[-1] in line for line in command_lines)


@pytest.mark.parametrize("script", existing([s for s in SCRIPTS if s != "config.py"]))
def test_answers_help(script):
    result = run_script(script, "--help", env={"LOCAL_ENDPOINT_KEY": ""})
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
