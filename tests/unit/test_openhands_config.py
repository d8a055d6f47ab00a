"""An OpenHands config.toml loads as it is: its [llm] keys as settings, its zeros and empty values
as unset, its agent tables and keys passed by with a notice; a typo still fails, named."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.config_file import OPENHANDS_AGENT_KEYS, OPENHANDS_TABLES, ignored_notice
from worker.errors import ConfigError
from worker.ops.config_report import MASK, PASSED_BY, describe_settings
from worker.settings import load_settings

FIXTURE = Path(__file__).resolve().parents[1] / "support" / "openhands_config.toml"
FIXTURE_KEY = "sk-openhands-fixture-5c1d9e7a3b"
AWS_ID = "AKIAFIXTURE7Q2W9E4R"
AWS_SECRET = "aws-secret-canary-3f8e1d6c0b"


def _write(directory: Path, text: str) -> Path:
    path = directory / "openhands.toml"
    path.write_text(text, encoding="utf-8")
    return path


# --- the template --------------------------------------------------------------------------


def test_openhands_template_loads() -> None:
    settings = load_settings(FIXTURE)

    llm = settings.llm
    assert (llm.model, llm.base_url) == ("openai/gpt-4o-mini", "http://localhost:8000/v1")
    assert llm.api_key is not None and llm.api_key.get_secret_value() == FIXTURE_KEY
    assert (llm.temperature, llm.top_p, llm.reasoning_effort) == (0.0, 1.0, "medium")
    assert (llm.drop_params, llm.disable_vision, llm.caching_prompt) == (False, True, True)
    assert (llm.num_retries, llm.retry_min_wait, llm.retry_max_wait) == (8, 15, 120)
    assert (llm.input_cost_per_token, llm.output_cost_per_token) == (0.0, 0.0)
    # [llm.NAME] groups are named configurations over [llm].
    assert set(settings.named_llms) == {"draft_editor", "gpt4o-mini"}
    assert settings.llm_named("gpt4o-mini").model == "gpt-4o"
    assert settings.llm_named("draft_editor").model == "openai/gpt-4o-mini"


def test_the_template_zeros_and_empty_values_read_as_unset() -> None:
    llm = load_settings(FIXTURE).llm

    assert llm.timeout == 300  # timeout = 0
    assert llm.max_output_tokens is None  # max_output_tokens = 0
    assert llm.max_input_tokens is None  # max_input_tokens = 0
    for name in (
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_region_name",
        "api_version",
        "custom_llm_provider",
        "ollama_base_url",
        "embedding_base_url",
        "embedding_deployment_name",
        "safety_settings",  # safety_settings = []
    ):
        assert getattr(llm, name) is None, name
    assert llm.embedding_model is None  # "local": OpenHands' own embedder, not a LiteLLM model
    # An empty key in a group leaves [llm]'s.
    named_key = load_settings(FIXTURE).llm_named("gpt4o-mini").api_key
    assert named_key is not None and named_key.get_secret_value() == FIXTURE_KEY


def test_the_template_passes_by_the_agent_tables_and_keys_with_one_notice() -> None:
    settings = load_settings(FIXTURE)

    assert set(settings.ignored) == {
        "[core]",
        "[agent]",
        "[sandbox]",
        "[security]",
        "[condenser]",
        "[kubernetes]",
        "[mcp]",
        "[model_routing]",
        "max_message_chars in [llm]",
        "modify_params in [llm]",
        "custom_tokenizer in [llm]",
        "native_tool_calling in [llm]",
        "correct_num in [llm.draft_editor]",
    }
    notice = ignored_notice(settings.ignored)
    assert notice is not None and "\n" not in notice
    assert all(item in notice for item in settings.ignored)
    assert ignored_notice(load_settings().ignored) is None


@pytest.mark.parametrize("key", sorted(OPENHANDS_AGENT_KEYS))
def test_each_agent_key_is_a_notice_not_an_error(tmp_path: Path, key: str) -> None:
    value = '"x"' if key.endswith(("folder", "url", "name", "tokenizer")) else "1"
    text = f'[llm]\nmodel = "openai/m"\n{key} = {value}\n\n[llm.other]\n{key} = {value}\n'

    settings = load_settings(_write(tmp_path, text))

    assert settings.ignored == (f"{key} in [llm]", f"{key} in [llm.other]")
    assert settings.llm.model == "openai/m"


@pytest.mark.parametrize("table", sorted(OPENHANDS_TABLES))
def test_each_openhands_table_is_a_notice_not_an_error(tmp_path: Path, table: str) -> None:
    settings = load_settings(_write(tmp_path, f"[{table}]\nanything = 1\n"))

    assert settings.ignored == (f"[{table}]",)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[llm]\ntemprature = 0.2\n", "temprature in [llm] of"),
        ("[llm.fast]\nmax_output_token = 10\n", "max_output_token in [llm.fast] of"),
        ("[promtq]\nconcurrency = 3\n", "[promtq] in"),
        ("max_iterations = 100\n", "max_iterations in"),
    ],
)
def test_a_key_nobody_defines_still_fails_naming_it(tmp_path: Path, text: str, named: str) -> None:
    path = _write(tmp_path, f"{text}\n[agent]\nenable_cmd = true\n")

    with pytest.raises(ConfigError) as raised:
        load_settings(path)

    message = str(raised.value)
    assert named in message
    assert str(path) in message
    assert "unknown" in message


# --- zeros, empty values and the environment ------------------------------------------------


def test_a_zero_in_one_source_leaves_the_setting_to_the_next(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = _write(
        tmp_path,
        "[llm]\ntimeout = 30\nmax_output_tokens = 64\n\n"
        "[llm.fast]\ntimeout = 0\nmax_input_tokens = 0\n",
    )
    monkeypatch.setenv("LLM_TIMEOUT", "0")
    monkeypatch.setenv("LLM_MAX_OUTPUT_TOKENS", "0")
    monkeypatch.setenv("LLM_MODEL", "")

    settings = load_settings(path)

    assert (settings.llm.timeout, settings.llm.max_output_tokens) == (30, 64)
    assert settings.llm.model is None
    assert settings.llm_named("fast").timeout == 30  # [llm]'s, not the default
    assert load_settings(llm={"timeout": 0}).llm.timeout == 300


@pytest.mark.parametrize(
    ("env_name", "value"),
    [
        ("LLM_TIMEOUT", "-1"),
        ("LLM_MAX_OUTPUT_TOKENS", "-5"),
        ("LLM_MAX_INPUT_TOKENS", "many"),
        ("LLM_TOP_P", "1.5"),
        ("LLM_TEMPERATURE", "-0.1"),
        ("LLM_TOP_K", "0"),
    ],
)
def test_bad_openhands_values_are_still_refused(
    monkeypatch: pytest.MonkeyPatch, env_name: str, value: str
) -> None:
    monkeypatch.setenv(env_name, value)

    with pytest.raises(ConfigError, match=env_name):
        load_settings()


def test_the_openhands_keys_read_their_llm_environment_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = {
        "LLM_TEMPERATURE": "0.4",
        "LLM_TOP_P": "0.9",
        "LLM_TOP_K": "40",
        "LLM_SEED": "7",
        "LLM_REASONING_EFFORT": "low",
        "LLM_MAX_OUTPUT_TOKENS": "256",
        "LLM_MAX_INPUT_TOKENS": "1000",
        "LLM_CUSTOM_LLM_PROVIDER": "openai",
        "LLM_OLLAMA_BASE_URL": "http://127.0.0.1:11434",
        "LLM_EMBEDDING_BASE_URL": "http://127.0.0.1:8001/v1",
        "LLM_AWS_REGION_NAME": "eu-west-1",
        "LLM_AWS_ACCESS_KEY_ID": AWS_ID,
        "LLM_AWS_SECRET_ACCESS_KEY": AWS_SECRET,
        "LLM_SAFETY_SETTINGS": '[{"category": "hate", "threshold": "low"}]',
        "LLM_COMPLETION_KWARGS": '{"user": "promptq"}',
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    llm = load_settings().llm

    assert (llm.temperature, llm.top_p, llm.top_k, llm.seed) == (0.4, 0.9, 40, 7)
    assert (llm.reasoning_effort, llm.max_output_tokens, llm.max_input_tokens) == ("low", 256, 1000)
    assert (llm.custom_llm_provider, llm.aws_region_name) == ("openai", "eu-west-1")
    assert llm.ollama_base_url == "http://127.0.0.1:11434"
    assert llm.embedding_base_url == "http://127.0.0.1:8001/v1"
    assert llm.safety_settings == [{"category": "hate", "threshold": "low"}]
    assert llm.completion_kwargs == {"user": "promptq"}
    assert llm.aws_secret_access_key is not None
    assert llm.aws_secret_access_key.get_secret_value() == AWS_SECRET


def test_completion_kwargs_may_not_set_what_the_worker_owns(tmp_path: Path) -> None:
    text = '[llm.completion_kwargs]\napi_key = "sk-sneaky-0123456789"\nnum_retries = 5\n'

    with pytest.raises(ConfigError) as raised:
        load_settings(_write(tmp_path, text))

    message = str(raised.value)
    assert "LLM_COMPLETION_KWARGS" in message
    assert "api_key, num_retries" in message
    assert "sk-sneaky" not in message


def test_completion_kwargs_is_a_setting_not_a_named_configuration(tmp_path: Path) -> None:
    text = '[llm]\nmodel = "openai/m"\n\n[llm.completion_kwargs]\nuser = "promptq"\n'

    settings = load_settings(_write(tmp_path, text))

    assert settings.llm.completion_kwargs == {"user": "promptq"}
    assert settings.named_llms == {}


# --- secrets --------------------------------------------------------------------------------


def _with_aws_keys(directory: Path) -> Path:
    text = FIXTURE.read_text(encoding="utf-8")
    text = text.replace('aws_access_key_id = ""', f'aws_access_key_id = "{AWS_ID}"')
    text = text.replace('aws_secret_access_key = ""', f'aws_secret_access_key = "{AWS_SECRET}"')
    text = text.replace('aws_region_name = ""', 'aws_region_name = "us-east-1"')
    return _write(directory, text)


def test_aws_keys_are_secrets_kept_out_of_repr_and_dumps(tmp_path: Path) -> None:
    settings = load_settings(_with_aws_keys(tmp_path))

    assert settings.llm.aws_region_name == "us-east-1"
    assert set(settings.llm.secrets()) == {FIXTURE_KEY, AWS_ID, AWS_SECRET}
    for text in (str(settings), repr(settings), repr(settings.llm), settings.model_dump_json()):
        for secret in (FIXTURE_KEY, AWS_ID, AWS_SECRET):
            assert secret not in text


def test_aws_keys_are_masked_in_the_config_report(tmp_path: Path) -> None:
    rows = {row.name: row for row in describe_settings(str(_with_aws_keys(tmp_path)))}

    assert rows["LLM_AWS_ACCESS_KEY_ID"].value == MASK
    assert rows["LLM_AWS_SECRET_ACCESS_KEY"].value == MASK
    assert rows["LLM_AWS_REGION_NAME"].value == "us-east-1"
    assert rows["LLM_TIMEOUT"].source == "default"  # timeout = 0 in the file: unset
    assert rows["[agent]"].value == PASSED_BY
    assert rows["max_message_chars in [llm]"].value == PASSED_BY
    listed = "\n".join(f"{row.name} {row.value}" for row in rows.values())
    for secret in (FIXTURE_KEY, AWS_ID, AWS_SECRET):
        assert secret not in listed


def test_a_bad_aws_secret_is_not_echoed(tmp_path: Path) -> None:
    path = _write(tmp_path, "[llm]\naws_secret_access_key = 918273645546372819\n")

    with pytest.raises(ConfigError) as raised:
        load_settings(path)

    assert "LLM_AWS_SECRET_ACCESS_KEY" in str(raised.value)
    assert "918273645546372819" not in str(raised.value)
