"""requirements.txt and the two conda files pin the same versions; every import is pinned."""

import ast
import re
import sys
from importlib.metadata import packages_distributions

import yaml

from conftest import PROJECT_DIR

PIN = re.compile(r"^([A-Za-z0-9_.-]+)==([^\s#;]+)")


def pins(lines):
    """{normalized name: version} of `name==version` lines."""
    found = {}
    for line in lines:
        match = PIN.match(line.strip())
        if match:
            found[match.group(1).lower().replace("_", "-")] = match.group(2)
    return found


def conda_pip_pins(path):
    """The pip pins of a conda environment file."""
    spec = yaml.safe_load(path.read_text())
    pip_section = next(item["pip"] for item in spec["dependencies"] if isinstance(item, dict) and "pip" in item)
    return pins(pip_section)


def third_party_imports(path):
    """Top-level module names a script imports (anywhere in it) that are not stdlib or the project's."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    local = {p.stem for p in path.parent.glob("*.py")}
    return {name for name in names if name not in sys.stdlib_module_names and name not in local}


def unpinned(modules, pinned):
    """Modules none of whose providing distributions is pinned (mlflow comes from mlflow, -skinny, -tracing)."""
    mapping = packages_distributions()
    return {m for m in modules if not {d.lower().replace("_", "-") for d in mapping[m]} & set(pinned)}


REQUIREMENTS = pins((PROJECT_DIR / "requirements.txt").read_text().splitlines())


def test_requirements_are_all_pinned_exactly():
    lines = [line.strip() for line in (PROJECT_DIR / "requirements.txt").read_text().splitlines()]
    entries = [line for line in lines if line and not line.startswith("#")]
    assert entries and all(PIN.match(line) for line in entries), entries
    assert REQUIREMENTS["torch"] == "2.13.0"


def test_training_environment_pins_every_import_of_fine_tune():
    conda = conda_pip_pins(PROJECT_DIR / "conda.yml")
    imports = third_party_imports(PROJECT_DIR / "finetuning_dir" / "fine_tune.py")
    assert imports >= {"torch", "transformers", "trl", "datasets", "mlflow", "peft"}
    assert not unpinned(imports, conda), f"not pinned in conda.yml: {unpinned(imports, conda)}"


def test_inference_environment_pins_every_import_of_score():
    conda = conda_pip_pins(PROJECT_DIR / "scoring_dir" / "conda.yml")
    imports = third_party_imports(PROJECT_DIR / "scoring_dir" / "score.py")
    assert imports >= {"torch", "transformers"}
    assert not unpinned(imports, conda), f"not pinned in scoring_dir/conda.yml: {unpinned(imports, conda)}"
    assert "mlflow" not in conda  # score.py loads with transformers alone


def test_conda_files_agree_with_requirements():
    for path in (PROJECT_DIR / "conda.yml", PROJECT_DIR / "scoring_dir" / "conda.yml"):
        for name, version in conda_pip_pins(path).items():
            if name in REQUIREMENTS:  # a local label (+cu126, +cpu) names the build of the same release
                assert REQUIREMENTS[name] == version.split("+")[0], f"{path.name}: {name}=={version}, requirements.txt has {REQUIREMENTS[name]}"


def test_installed_versions_match_the_pins():
    from importlib.metadata import version

    for name, pinned in REQUIREMENTS.items():
        assert version(name).split("+")[0] == pinned, name


def conda_pip_lines(path):
    """The pip section of a conda environment file, as written."""
    spec = yaml.safe_load(path.read_text())
    return next(item["pip"] for item in spec["dependencies"] if isinstance(item, dict) and "pip" in item)


def test_the_training_torch_is_the_cuda_build_the_a100_driver_runs():
    # PyPI's torch 2.13.0 is built for CUDA 13.0; Azure's A100 nodes' driver runs CUDA 12.8 at most.
    lines = conda_pip_lines(PROJECT_DIR / "conda.yml")
    assert "--extra-index-url https://download.pytorch.org/whl/cu126" in lines
    assert pins(lines)["torch"] == "2.13.0+cu126"


def test_the_cpu_inference_environment_takes_the_cpu_torch():
    lines = conda_pip_lines(PROJECT_DIR / "scoring_dir" / "conda.yml")
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in lines and pins(lines)["torch"] == "2.13.0+cpu"
