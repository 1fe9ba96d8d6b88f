"""config.py: where values come from, the missing-settings message, and an import that only reads."""

import re
import textwrap

import pytest

import config
from conftest import PROJECT_DIR, run_script

PRINT_SETTINGS = "import config; print(config.{})"


def settings_read_from_environment():
    """Every NAME that config.py reads with _str/_int/_float/_bool/_path, as config.py declares them."""
    return list(config.SETTING_NAMES)


def test_require_names_every_placeholder_and_missing_setting(monkeypatch):
    monkeypatch.setattr(config, "AZURE_SUBSCRIPTION_ID", "<your-subscription-id>")
    monkeypatch.setattr(config, "AZURE_RESOURCE_GROUP_NAME", "")
    monkeypatch.setattr(config, "AZURE_ML_WORKSPACE_NAME", "my-workspace")
    with pytest.raises(config.MissingSettingsError) as error:
        config.require(*config.AZURE_WORKSPACE_SETTINGS)
    message = str(error.value)
    assert "AZURE_SUBSCRIPTION_ID" in message and "AZURE_RESOURCE_GROUP_NAME" in message
    assert "AZURE_ML_WORKSPACE_NAME" not in message
    assert ".env" in message  # says where to set them


def test_require_passes_when_filled(monkeypatch):
    for name in config.AZURE_DEPLOY_SETTINGS:
        monkeypatch.setattr(config, name, "filled-in")
    config.require(*config.AZURE_DEPLOY_SETTINGS)


def test_local_target_needs_no_azure_setting():
    result = run_script("-c", "import config; print(config.TARGET, config.shown(config.RECIPE))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("local ")


def test_environment_beats_dotenv_beats_default(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("SPLIT_SEED=7\nAZURE_ML_WORKSPACE_NAME=from-dotenv\n")
    script = "import config; print(config.SPLIT_SEED, config.AZURE_ML_WORKSPACE_NAME, config.TEST_SPLIT_RATIO)"
    result = run_script("-c", script, env={"FINETUNE_PHI_ENV_FILE": str(env_file), "SPLIT_SEED": "11"})
    assert result.stdout.split() == ["11", "from-dotenv", "0.2"], result.stderr


def test_managed_identity_resource_id_is_derived(tmp_path):
    env = {"FINETUNE_PHI_ENV_FILE": str(tmp_path / "none"), "AZURE_SUBSCRIPTION_ID": "sub",
           "AZURE_RESOURCE_GROUP_NAME": "rg", "AZURE_MANAGED_IDENTITY_NAME": "uai"}
    result = run_script("-c", PRINT_SETTINGS.format("AZURE_MANAGED_IDENTITY_RESOURCE_ID"), env=env)
    assert result.stdout.strip() == (
        "/subscriptions/sub/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/uai"
    )


def test_azure_target_switches_recipe_and_dataset_source(tmp_path):
    env = {"FINETUNE_PHI_ENV_FILE": str(tmp_path / "none"), "TARGET": "azure"}
    result = run_script("-c", "import config; print(config.shown(config.RECIPE), config.DATASET_SOURCE, config.DATASET_SPLIT)",
                        env=env)
    assert result.stdout.split() == ["recipes/phi-3.5-mini/sft/config_tutorial.yaml", "hub", "train_sft[:1%]"]


def test_unknown_target_is_a_clear_error():
    result = run_script("-c", "import config", env={"TARGET": "aws"})
    assert result.returncode != 0 and "TARGET='aws'" in result.stderr


def test_a_whole_number_setting_that_is_not_one_is_named():
    result = run_script("-c", "import config", env={"SPLIT_SEED": "forty-two"})
    assert result.returncode != 0 and "SPLIT_SEED='forty-two' is not a whole number" in result.stderr


@pytest.mark.parametrize("value, expected", [("", "None"), ("20", "20"), (" 7 ", "7")])
def test_max_steps_is_empty_for_the_recipes_or_a_number_of_steps(tmp_path, value, expected):
    env = {"FINETUNE_PHI_ENV_FILE": str(tmp_path / "none"), "MAX_STEPS": value}
    result = run_script("-c", PRINT_SETTINGS.format("MAX_STEPS"), env=env)
    assert result.stdout.strip() == expected, result.stderr


PHI_4_RECIPE = "recipes/phi-4-mini/sft/config_full.yaml"


@pytest.mark.parametrize("settings, expected", [
    ({"TARGET": "azure"}, "finetune-phi-3-5-mini"),  # the tutorial's recipe keeps the tutorial's name
    ({"TARGET": "azure", "RECIPE": "recipes/phi-3.5-mini/sft/config_qlora.yaml"}, "finetune-phi-3-5-mini"),
    ({"TARGET": "azure", "RECIPE": PHI_4_RECIPE}, "finetune-phi-4-mini-instruct"),
    ({}, "finetune-phi-3-5-mini"),  # the tiny Phi-3 stands in for Phi-3.5-mini
    ({"RECIPE": PHI_4_RECIPE}, "finetune-phi-3-5-mini"),  # locally the tiny Phi-3 is what trains, whatever the recipe
    ({"LOCAL_BASE_MODEL": "models/smollm2-135m-instruct"}, "finetune-smollm2-135m-instruct"),
    ({"LOCAL_BASE_MODEL": "../elsewhere/My_Model.v2/"}, "finetune-my-model-v2"),
    ({"LOCAL_BASE_MODEL": "microsoft/Phi-4-mini-instruct", "RECIPE": PHI_4_RECIPE}, "finetune-phi-4-mini-instruct"),
    ({"LOCAL_BASE_MODEL": "microsoft/Phi-3.5-mini-instruct"}, "finetune-phi-3-5-mini"),
    ({"TARGET": "azure", "RECIPE": PHI_4_RECIPE, "AZURE_MODEL_NAME": "my-phi4"}, "my-phi4"),  # set: used as it is
    ({"LOCAL_BASE_MODEL": "models/smollm2-135m-instruct", "AZURE_MODEL_NAME": "my-smol"}, "my-smol"),
], ids=["azure-tutorial", "azure-qlora", "azure-phi-4", "local-tiny", "local-tiny-phi-4-recipe", "local-folder",
        "local-folder-dots", "local-hub-phi-4", "local-hub-phi-3.5", "azure-explicit", "local-explicit"])
def test_the_registered_model_name_follows_the_base_model(tmp_path, settings, expected):
    env = {"FINETUNE_PHI_ENV_FILE": str(tmp_path / "none"), **settings}
    result = run_script("-c", PRINT_SETTINGS.format("AZURE_MODEL_NAME"), env=env)
    assert result.stdout.strip() == expected, result.stderr


def test_a_recipe_of_your_own_names_the_model_and_one_without_a_model_trains_the_tutorials(tmp_path):
    from conftest import write_recipe

    own = write_recipe(tmp_path / "own.yaml", PHI_4_RECIPE, model_name="/data/models/Llama-3.2-1B-Instruct")
    unnamed = tmp_path / "unnamed.yaml"
    unnamed.write_text("epochs: 1\n")  # fine_tune.py's default model: the tutorial's
    expected = {own: "finetune-llama-3-2-1b-instruct", unnamed: "finetune-phi-3-5-mini",
                tmp_path / "missing.yaml": "finetune-phi-3-5-mini"}  # setup_ml.py names a missing RECIPE
    for recipe, name in expected.items():
        env = {"FINETUNE_PHI_ENV_FILE": str(tmp_path / "none"), "TARGET": "azure", "RECIPE": str(recipe)}
        result = run_script("-c", PRINT_SETTINGS.format("AZURE_MODEL_NAME"), env=env)
        assert result.stdout.strip() == name, result.stderr


def test_import_reads_settings_and_nothing_else(tmp_path):
    # No network (connect fails loudly) and no file written (the folder stays empty).
    script = textwrap.dedent(f"""
        import os, socket, sys
        def refuse(*args, **kwargs):
            raise AssertionError("config.py opened a network connection")
        socket.socket.connect = refuse
        sys.path.insert(0, {str(PROJECT_DIR)!r})
        import config
        print(sorted(os.listdir('.')))
    """)
    result = run_script("-c", script, cwd=tmp_path, env={"FINETUNE_PHI_ENV_FILE": str(tmp_path / ".env")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_env_example_lists_every_setting_with_a_comment():
    example = (PROJECT_DIR / ".env.example").read_text()
    for name in settings_read_from_environment():
        line = next((line for line in example.splitlines() if re.match(rf"^(# )?{name}=", line)), None)
        assert line is not None, f"{name} is missing from .env.example"
        assert "#" in line.split("=", 1)[1], f"{name} has no comment in .env.example"


def test_config_prints_settings_with_secrets_hidden():
    result = run_script("config.py", env={"AZURE_ML_API_KEY": "super-secret-key-value"})
    assert result.returncode == 0
    assert "TARGET = local" in result.stdout
    assert "super-secret-key-value" not in result.stdout and "AZURE_ML_API_KEY = <hidden>" in result.stdout


def test_the_sandbox_drops_every_setting_config_reads(tmp_path):
    from unittest import mock

    from stand_ins.sandbox import isolated_env, setting_names

    assert set(settings_read_from_environment()) <= setting_names()
    exported = {"TEST_SPLIT_RATIO": "0.5", "SPLIT_SEED": "1", "PROCESSES_PER_NODE": "4", "MAX_NEW_TOKENS_LIMIT": "3",
                "AZURE_ML_API_KEY": "mine", "MY_OWN_VARIABLE": "kept"}
    with mock.patch.dict("os.environ", exported):
        env = isolated_env(tmp_path)
    assert not set(exported) - {"MY_OWN_VARIABLE"} & set(env), sorted(set(exported) & set(env))
    assert env["MY_OWN_VARIABLE"] == "kept" and env["FINETUNE_PHI_ENV_FILE"] == str(tmp_path / ".env")


def test_dotenv_is_read_but_never_copied_into_the_environment(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("SPLIT_SEED=7\nAZURE_ML_API_KEY=from-dotenv-key\n")
    script = "import os, config; print(config.SPLIT_SEED, 'AZURE_ML_API_KEY' in os.environ, 'SPLIT_SEED' in os.environ)"
    result = run_script("-c", script, env={"FINETUNE_PHI_ENV_FILE": str(env_file)})
    assert result.stdout.split() == ["7", "False", "False"], result.stderr

