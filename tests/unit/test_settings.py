"""worker.settings.load_settings: defaults, sources and their precedence, and every refusal."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from worker.errors import ConfigError
from worker.settings import load_settings

SECRET = "sk-canary-settings-0123456789"


def _write_config(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- defaults -------------------------------------------------------------------------------


def test_defaults_match_openhands() -> None:
    settings = load_settings()

    llm = settings.llm
    assert llm.model is None
    assert llm.api_key is None
    assert llm.base_url is None
    assert llm.num_retries == 8
    assert llm.retry_min_wait == 15
    assert llm.retry_max_wait == 120
    assert llm.retry_multiplier == 2
    assert llm.timeout == 300
    assert llm.drop_params is True


def test_queue_defaults() -> None:
    queue = load_settings().queue

    assert queue.redis_url is None  # no fleet configured: `promptq batch` runs embedded
    assert queue.broker_url == "redis://localhost:6379/0"  # where a worker looks by default
    assert queue.visibility_timeout_s == 3600
    assert queue.result_ttl_s == 24 * 3600
    assert queue.max_redeliveries == 2
    assert queue.concurrency == 64


def test_longest_wait_is_half_the_visibility_timeout_minus_one_call() -> None:
    assert load_settings().longest_wait_s == 3600 / 2 - 300


# --- sources --------------------------------------------------------------------------------


def test_llm_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_MODEL", "openai/gpt-4o-mini")
    monkeypatch.setenv("LLM_API_KEY", SECRET)
    monkeypatch.setenv("LLM_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("LLM_NUM_RETRIES", "3")
    monkeypatch.setenv("LLM_RETRY_MIN_WAIT", "1.5")
    monkeypatch.setenv("LLM_RETRY_MAX_WAIT", "9")
    monkeypatch.setenv("LLM_RETRY_MULTIPLIER", "0.5")
    monkeypatch.setenv("LLM_TIMEOUT", "30")
    monkeypatch.setenv("LLM_DROP_PARAMS", "false")

    llm = load_settings().llm

    assert llm.model == "openai/gpt-4o-mini"
    assert llm.api_key is not None
    assert llm.api_key.get_secret_value() == SECRET
    assert llm.base_url == "http://127.0.0.1:9/v1"
    assert llm.num_retries == 3
    assert llm.retry_min_wait == 1.5
    assert llm.retry_max_wait == 9
    assert llm.retry_multiplier == 0.5
    assert llm.timeout == 30
    assert llm.drop_params is False


def test_promptq_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMPTQ_REDIS_URL", "redis://127.0.0.1:6390/3")
    monkeypatch.setenv("PROMPTQ_VISIBILITY_TIMEOUT_S", "7200")
    monkeypatch.setenv("PROMPTQ_CONCURRENCY", "8")

    queue = load_settings().queue

    assert queue.redis_url == "redis://127.0.0.1:6390/3"
    assert queue.visibility_timeout_s == 7200
    assert queue.concurrency == 8


def test_client_only_promptq_variables_do_not_upset_the_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Client and worker share the PROMPTQ_ namespace; one machine may run both.
    monkeypatch.setenv("PROMPTQ_CONNECT_TIMEOUT_S", "3")
    monkeypatch.setenv("PROMPTQ_SOCKET_TIMEOUT_S", "4")
    monkeypatch.setenv("PROMPTQ_MAX_PROMPT_CHARS", "5000")
    monkeypatch.setenv("PROMPTQ_MAX_OUTAGE_S", "60")

    assert load_settings().queue.broker_url == "redis://localhost:6379/0"


CONFIG_TEXT = """
[llm]
model = "openai/from-file"
api_key = "sk-canary-from-file-0123456789"
num_retries = 4
retry_min_wait = 2
retry_max_wait = 10
retry_multiplier = 1.5
timeout = 60

[promptq]
redis_url = "redis://127.0.0.1:6391/1"
visibility_timeout_s = 900
result_ttl_s = 600
concurrency = 4
"""


def _assert_from_file(settings_path: Path | str | None) -> None:
    settings = load_settings(settings_path)
    assert settings.llm.model == "openai/from-file"
    assert settings.llm.api_key is not None
    assert settings.llm.api_key.get_secret_value() == "sk-canary-from-file-0123456789"
    assert settings.llm.num_retries == 4
    assert settings.llm.retry_min_wait == 2
    assert settings.llm.retry_max_wait == 10
    assert settings.llm.retry_multiplier == 1.5
    assert settings.llm.timeout == 60
    assert settings.queue.redis_url == "redis://127.0.0.1:6391/1"
    assert settings.queue.visibility_timeout_s == 900
    assert settings.queue.result_ttl_s == 600
    assert settings.queue.concurrency == 4


def test_config_file_passed_as_path(tmp_path: Path) -> None:
    path = _write_config(tmp_path / "elsewhere.toml", CONFIG_TEXT)
    _assert_from_file(path)


def test_config_file_passed_as_string(tmp_path: Path) -> None:
    path = _write_config(tmp_path / "elsewhere.toml", CONFIG_TEXT)
    _assert_from_file(str(path))


def test_config_file_named_by_promptq_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = _write_config(tmp_path / "named.toml", CONFIG_TEXT)
    monkeypatch.setenv("PROMPTQ_CONFIG", str(path))
    _assert_from_file(None)


def test_config_toml_in_the_working_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    workdir = tmp_path / "project"
    workdir.mkdir()
    _write_config(workdir / "config.toml", CONFIG_TEXT)
    monkeypatch.chdir(workdir)
    _assert_from_file(None)


def test_no_config_toml_means_defaults(tmp_path: Path) -> None:
    _write_config(tmp_path / "not-config.toml", CONFIG_TEXT)
    assert load_settings().llm.model is None


def test_explicit_path_wins_over_promptq_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    named = _write_config(tmp_path / "named.toml", '[llm]\nmodel = "openai/named"\n')
    explicit = _write_config(tmp_path / "explicit.toml", '[llm]\nmodel = "openai/explicit"\n')
    monkeypatch.setenv("PROMPTQ_CONFIG", str(named))

    assert load_settings(explicit).llm.model == "openai/explicit"


def test_promptq_config_wins_over_config_toml_in_cwd(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _write_config(tmp_path / "config.toml", '[llm]\nmodel = "openai/cwd"\n')
    named = _write_config(tmp_path / "named.toml", '[llm]\nmodel = "openai/named"\n')
    monkeypatch.setenv("PROMPTQ_CONFIG", str(named))

    assert load_settings().llm.model == "openai/named"


def test_environment_wins_over_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = _write_config(tmp_path / "c.toml", CONFIG_TEXT)
    monkeypatch.setenv("LLM_MODEL", "openai/from-env")
    monkeypatch.setenv("LLM_NUM_RETRIES", "1")
    monkeypatch.setenv("PROMPTQ_CONCURRENCY", "16")

    settings = load_settings(path)

    assert settings.llm.model == "openai/from-env"
    assert settings.llm.num_retries == 1
    assert settings.queue.concurrency == 16
    # Keys the environment does not set still come from the file.
    assert settings.llm.timeout == 60
    assert settings.queue.visibility_timeout_s == 900


def test_explicit_arguments_win_over_environment_and_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = _write_config(tmp_path / "c.toml", CONFIG_TEXT)
    monkeypatch.setenv("LLM_MODEL", "openai/from-env")
    monkeypatch.setenv("LLM_TIMEOUT", "45")
    monkeypatch.setenv("PROMPTQ_CONCURRENCY", "16")

    settings = load_settings(
        path, llm={"model": "openai/explicit", "num_retries": 0}, queue={"concurrency": 2}
    )

    assert settings.llm.model == "openai/explicit"
    assert settings.llm.num_retries == 0
    assert settings.queue.concurrency == 2
    assert settings.llm.timeout == 45  # env, not overridden explicitly
    assert settings.llm.retry_max_wait == 10  # file, not overridden at all


def test_fractional_waits_are_accepted() -> None:
    llm = load_settings(
        llm={"retry_min_wait": 0.01, "retry_max_wait": 0.08, "retry_multiplier": 0.01}
    ).llm

    assert llm.retry_min_wait == 0.01
    assert llm.retry_max_wait == 0.08
    assert llm.retry_multiplier == 0.01


def test_min_wait_equal_to_max_wait_is_accepted() -> None:
    llm = load_settings(llm={"retry_min_wait": 5, "retry_max_wait": 5}).llm
    assert llm.retry_min_wait == llm.retry_max_wait == 5


def test_settings_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(ValueError, match="frozen"):
        settings.llm.timeout = 1


# --- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env_name", "value"),
    [
        ("LLM_RETRY_MIN_WAIT", "0"),
        ("LLM_RETRY_MIN_WAIT", "-1"),
        ("LLM_RETRY_MIN_WAIT", "soon"),
        ("LLM_RETRY_MAX_WAIT", "0"),
        ("LLM_RETRY_MAX_WAIT", "-5"),
        ("LLM_RETRY_MULTIPLIER", "0"),
        ("LLM_RETRY_MULTIPLIER", "-2"),
        ("LLM_RETRY_MULTIPLIER", "nan"),
        ("LLM_NUM_RETRIES", "-1"),
        ("LLM_NUM_RETRIES", "many"),
        ("LLM_NUM_RETRIES", "2.5"),
        ("LLM_TIMEOUT", "-1"),  # 0 reads as unset, as OpenHands' template has it
        ("LLM_TIMEOUT", "abc"),
        ("LLM_DROP_PARAMS", "perhaps"),
        ("PROMPTQ_VISIBILITY_TIMEOUT_S", "0"),
        ("PROMPTQ_VISIBILITY_TIMEOUT_S", "an hour"),
        ("PROMPTQ_RESULT_TTL_S", "-1"),
        ("PROMPTQ_CONCURRENCY", "0"),
        ("PROMPTQ_MAX_REDELIVERIES", "-1"),
        ("LLM_RPM", "0"),
        ("LLM_RPM", "fast"),
        ("LLM_TPM", "-100"),
        ("PROMPTQ_LIMITER_ADAPTIVE", "sometimes"),
        ("PROMPTQ_LIMITER_MAX_SLEEP_S", "-1"),
        ("PROMPTQ_LIMITER_REPLY_TOKENS", "-1"),
    ],
)
def test_bad_environment_value_is_a_config_error_naming_the_key(
    monkeypatch: pytest.MonkeyPatch, env_name: str, value: str
) -> None:
    monkeypatch.setenv(env_name, value)

    with pytest.raises(ConfigError) as raised:
        load_settings()

    assert env_name in str(raised.value)


@pytest.mark.parametrize(
    ("key", "value", "env_name"),
    [
        ("retry_min_wait", "-0.5", "LLM_RETRY_MIN_WAIT"),
        ("retry_max_wait", "0", "LLM_RETRY_MAX_WAIT"),
        ("retry_multiplier", "-1", "LLM_RETRY_MULTIPLIER"),
        ("num_retries", "-3", "LLM_NUM_RETRIES"),
        ("timeout", '"slow"', "LLM_TIMEOUT"),
    ],
)
def test_bad_file_value_is_a_config_error_naming_the_key(
    tmp_path: Path, key: str, value: str, env_name: str
) -> None:
    path = _write_config(tmp_path / "c.toml", f"[llm]\n{key} = {value}\n")

    with pytest.raises(ConfigError) as raised:
        load_settings(path)

    message = str(raised.value)
    assert env_name in message
    assert key in message
    assert str(path) in message


# --- rate limits ----------------------------------------------------------------------------


def test_rate_limits_default_to_none_and_llm_values_apply_to_every_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert load_settings().limits_for("openai/any").rpm is None
    monkeypatch.setenv("LLM_RPM", "500")
    monkeypatch.setenv("LLM_TPM", "30000")
    limits = load_settings().limits_for("openai/any")
    assert (limits.rpm, limits.tpm) == (500, 30000)


def test_a_model_table_replaces_the_llm_limits_for_that_model(tmp_path: Path) -> None:
    path = _write_config(
        tmp_path / "c.toml",
        '[llm]\nrpm = 500\n\n[rate_limits."openai/gpt-4o"]\ntpm = 90000\n',
    )
    settings = load_settings(path)
    assert (settings.limits_for("openai/gpt-4o").rpm, settings.limits_for("openai/gpt-4o").tpm) == (
        None,
        90000,
    )
    assert settings.limits_for("openai/other").rpm == 500


def test_the_burst_is_a_tenth_of_a_second_unless_set_for_all_or_for_a_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert load_settings().limits_for("openai/any").burst_s == 0.1
    path = _write_config(
        tmp_path / "c.toml",
        '[llm]\nburst_s = 0.5\n\n[rate_limits."openai/gpt-4o"]\nburst_s = 0\n'
        '\n[rate_limits."openai/mini"]\nrpm = 100\n',
    )
    settings = load_settings(path)
    assert settings.limits_for("openai/gpt-4o").burst_s == 0
    assert settings.limits_for("openai/mini").burst_s == 0.5  # [llm]'s, beside its own rpm
    assert settings.limits_for("openai/other").burst_s == 0.5
    monkeypatch.setenv("LLM_BURST_S", "-1")
    with pytest.raises(ConfigError) as raised:
        load_settings()
    assert "LLM_BURST_S" in str(raised.value)


@pytest.mark.parametrize(
    ("table", "named"),
    [
        ('[rate_limits."m"]\nrpm = 0\n', 'rpm in [rate_limits."m"]'),
        ('[rate_limits."m"]\nburst_s = -1\n', 'burst_s in [rate_limits."m"]'),
        ('[rate_limits."m"]\nrpm = "lots"\n', 'rpm in [rate_limits."m"]'),
        ('[rate_limits."m"]\nrmp = 5\n', 'rmp in [rate_limits."m"]'),
        ("[rate_limits]\nm = 5\n", '[rate_limits."m"]'),
        ("rate_limits = 5\n", "rate_limits in"),
    ],
)
def test_bad_rate_limit_tables_are_named(tmp_path: Path, table: str, named: str) -> None:
    path = _write_config(tmp_path / "c.toml", table)
    with pytest.raises(ConfigError) as raised:
        load_settings(path)
    assert named in str(raised.value)


# --- tenants' weights -----------------------------------------------------------------------


def test_every_tenant_weighs_one_unless_listed() -> None:
    settings = load_settings()

    assert settings.tenants == {}
    assert settings.tenant_weight("default") == 1.0
    assert settings.tenant_weight("team-a") == 1.0


def test_tenant_weights_from_the_file(tmp_path: Path) -> None:
    path = _write_config(
        tmp_path / "c.toml",
        '[tenants]\nteam-a = 3\nbatch-nightly = 0.5\n"org.eu:1" = 2\ndefault = 4\n',
    )

    settings = load_settings(path)

    assert settings.tenant_weight("team-a") == 3.0
    assert isinstance(settings.tenant_weight("team-a"), float)
    assert settings.tenant_weight("batch-nightly") == 0.5
    assert settings.tenant_weight("org.eu:1") == 2.0
    assert settings.tenant_weight("default") == 4.0
    assert settings.tenant_weight("unlisted") == 1.0


def test_tenant_weights_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMPTQ_TENANTS", " team-a = 2 , team-b=0.25,, org.eu:1=1e1,")

    settings = load_settings()

    assert settings.tenants == {"team-a": 2.0, "team-b": 0.25, "org.eu:1": 10.0}


def test_the_environment_wins_over_the_file_tenant_by_tenant(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = _write_config(tmp_path / "c.toml", "[tenants]\nteam-a = 3\nteam-b = 5\n")
    monkeypatch.setenv("PROMPTQ_TENANTS", "team-a=0.5,team-c=2")

    settings = load_settings(path)

    assert settings.tenants == {"team-a": 0.5, "team-b": 5.0, "team-c": 2.0}


@pytest.mark.parametrize(
    ("text", "named"),
    [
        (
            "team-a = 0",
            "tenants.team-a in [tenants] of {path}: a weight is a finite number > 0 (got 0)",
        ),
        ("team-a = -2", "tenants.team-a in [tenants]"),
        (
            'team-a = "heavy"',
            "tenants.team-a in [tenants] of {path}: a weight is a finite number > 0 (got 'heavy')",
        ),
        ("team-a = inf", "tenants.team-a in [tenants]"),
        ("team-a = nan", "tenants.team-a in [tenants]"),
        ("team-a = true", "tenants.team-a in [tenants]"),
        (
            '"team a" = 2',
            "tenants.team a in [tenants] of {path}: a tenant name matches "
            "^[A-Za-z0-9_.:\\-]{{1,64}}$",
        ),
        (f'"{"x" * 65}" = 2', f"tenants.{'x' * 65} in [tenants]"),
        ("team.a = 2", "tenants.team in [tenants] of {path}: a weight is a number, not a table"),
    ],
)
def test_bad_tenant_in_the_file_is_a_config_error_naming_the_key(
    tmp_path: Path, text: str, named: str
) -> None:
    path = _write_config(tmp_path / "c.toml", f"[tenants]\n{text}\n")

    with pytest.raises(ConfigError) as raised:
        load_settings(path)

    assert named.format(path=path) in str(raised.value)


@pytest.mark.parametrize(
    ("value", "named"),
    [
        (
            "team-a=0",
            "tenants.team-a in PROMPTQ_TENANTS: a weight is a finite number > 0 (got '0')",
        ),
        ("team-a=-1", "tenants.team-a in PROMPTQ_TENANTS: a weight is a finite number > 0"),
        (
            "team-a=lots",
            "tenants.team-a in PROMPTQ_TENANTS: a weight is a finite number > 0 (got 'lots')",
        ),
        ("team-a=inf", "tenants.team-a in PROMPTQ_TENANTS"),
        ("team-a=NaN", "tenants.team-a in PROMPTQ_TENANTS"),
        ("team-a=1e999", "tenants.team-a in PROMPTQ_TENANTS"),
        ("team-a=", "tenants.team-a in PROMPTQ_TENANTS"),
        ("team a=2", "tenants.team a in PROMPTQ_TENANTS: a tenant name matches"),
        ("team-a=1,team-a=2", "tenants.team-a in PROMPTQ_TENANTS: listed twice"),
        (
            "team-a:2",
            "PROMPTQ_TENANTS: each entry is NAME=WEIGHT, separated by commas (got 'team-a:2')",
        ),
    ],
)
def test_bad_tenant_in_the_environment_is_a_config_error_naming_the_key(
    monkeypatch: pytest.MonkeyPatch, value: str, named: str
) -> None:
    monkeypatch.setenv("PROMPTQ_TENANTS", value)

    with pytest.raises(ConfigError) as raised:
        load_settings()

    assert named in str(raised.value)


def test_tenants_that_is_not_a_table_is_refused(tmp_path: Path) -> None:
    path = _write_config(tmp_path / "c.toml", "tenants = 2\n")

    with pytest.raises(ConfigError, match=r"tenants in .* must be a table \(\[tenants\]\)"):
        load_settings(path)


def test_every_bad_tenant_is_named_at_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = _write_config(tmp_path / "c.toml", "[tenants]\nteam-a = 0\nteam-b = 2\n")
    monkeypatch.setenv("PROMPTQ_TENANTS", "team-c=x")

    with pytest.raises(ConfigError) as raised:
        load_settings(path)

    message = str(raised.value)
    assert "tenants.team-a" in message
    assert "tenants.team-c" in message
    assert "tenants.team-b" not in message


def test_the_limiter_reserves_half_a_second_ahead_by_default() -> None:
    """The horizon a higher priority waits behind: short, so an agent's job takes the next
    slot (benchmarks/scheduling.py)."""
    assert load_settings().queue.limiter_max_sleep_s == 0.5


def test_every_bad_key_is_named_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_TIMEOUT", "-1")
    monkeypatch.setenv("LLM_NUM_RETRIES", "-1")
    monkeypatch.setenv("PROMPTQ_CONCURRENCY", "0")

    with pytest.raises(ConfigError) as raised:
        load_settings()

    message = str(raised.value)
    assert "LLM_TIMEOUT" in message
    assert "LLM_NUM_RETRIES" in message
    assert "PROMPTQ_CONCURRENCY" in message


def test_min_wait_above_max_wait_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_RETRY_MIN_WAIT", "30")
    monkeypatch.setenv("LLM_RETRY_MAX_WAIT", "20")

    with pytest.raises(ConfigError) as raised:
        load_settings()

    message = str(raised.value)
    assert "LLM_RETRY_MIN_WAIT" in message
    assert "LLM_RETRY_MAX_WAIT" in message


def test_max_wait_plus_timeout_beyond_half_the_visibility_timeout_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 100 / 2 - 30 = 20 s is the longest allowed wait; 25 s does not fit.
    monkeypatch.setenv("PROMPTQ_VISIBILITY_TIMEOUT_S", "100")
    monkeypatch.setenv("LLM_TIMEOUT", "30")
    monkeypatch.setenv("LLM_RETRY_MIN_WAIT", "1")
    monkeypatch.setenv("LLM_RETRY_MAX_WAIT", "25")

    with pytest.raises(ConfigError) as raised:
        load_settings()

    message = str(raised.value)
    assert "LLM_RETRY_MAX_WAIT" in message
    assert "PROMPTQ_VISIBILITY_TIMEOUT_S" in message


def test_max_wait_plus_timeout_exactly_half_the_visibility_timeout_is_accepted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PROMPTQ_VISIBILITY_TIMEOUT_S", "100")
    monkeypatch.setenv("LLM_TIMEOUT", "30")
    monkeypatch.setenv("LLM_RETRY_MIN_WAIT", "1")
    monkeypatch.setenv("LLM_RETRY_MAX_WAIT", "20")

    assert load_settings().longest_wait_s == 20


@pytest.mark.parametrize(
    "env_name",
    ["LLM_RETRY_MIN_WAIT", "LLM_RETRY_MAX_WAIT", "LLM_TIMEOUT", "PROMPTQ_RESULT_TTL_S"],
)
def test_infinite_durations_are_refused(monkeypatch: pytest.MonkeyPatch, env_name: str) -> None:
    # PROMPTQ_RESULT_TTL_S=inf reads like "keep results forever", but JobStore (and the
    # client's submit) compute int(ttl_s * 1000), which raises OverflowError for infinity:
    # the setting must be refused up front, naming the key.
    monkeypatch.setenv(env_name, "inf")

    with pytest.raises(ConfigError) as raised:
        load_settings()

    assert env_name in str(raised.value)


def test_unknown_key_in_llm_table_is_named(tmp_path: Path) -> None:
    path = _write_config(tmp_path / "c.toml", '[llm]\nmodel = "openai/x"\nretry_max_wiat = 9\n')

    with pytest.raises(ConfigError) as raised:
        load_settings(path)

    message = str(raised.value)
    assert "retry_max_wiat" in message
    assert "unknown" in message


def test_unknown_key_in_promptq_table_is_named(tmp_path: Path) -> None:
    path = _write_config(tmp_path / "c.toml", "[promptq]\nvisibility_timeout = 9\n")

    with pytest.raises(ConfigError) as raised:
        load_settings(path)

    assert "visibility_timeout" in str(raised.value)


@pytest.mark.parametrize("retired", ["eta_task_limit = 1000", "limiter_max_ahead_s = 60"])
def test_a_retired_setting_in_the_file_is_named_with_why_it_went(
    tmp_path: Path, retired: str
) -> None:
    path = _write_config(tmp_path / "c.toml", f"[promptq]\n{retired}\n")

    with pytest.raises(ConfigError) as raised:
        load_settings(path)

    message = str(raised.value)
    assert retired.split(" =", maxsplit=1)[0] in message
    assert "no longer used" in message


def test_promptq_config_naming_a_missing_file_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    missing = tmp_path / "nope" / "config.toml"
    monkeypatch.setenv("PROMPTQ_CONFIG", str(missing))

    with pytest.raises(ConfigError) as raised:
        load_settings()

    message = str(raised.value)
    assert "PROMPTQ_CONFIG" in message
    assert str(missing) in message


def test_explicit_missing_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist") as raised:
        load_settings(tmp_path / "missing.toml")
    assert "PROMPTQ_CONFIG" not in str(raised.value)  # it was not named there


def test_malformed_toml_is_refused(tmp_path: Path) -> None:
    path = _write_config(tmp_path / "c.toml", '[llm\nmodel = "openai/x"\n')

    with pytest.raises(ConfigError) as raised:
        load_settings(path)

    assert str(path) in str(raised.value)


def test_llm_that_is_not_a_table_is_refused(tmp_path: Path) -> None:
    path = _write_config(tmp_path / "c.toml", 'llm = "openai/x"\n')

    with pytest.raises(ConfigError, match=r"\[llm\]"):
        load_settings(path)


NAMED_CONFIG = """
[llm]
model = "openai/gpt-4o"
num_retries = 5
rpm = 100

[llm.cheap]
model = "openai/gpt-4o-mini"
num_retries = 2

[llm.local]
base_url = "http://127.0.0.1:8000/v1"
rpm = 30
"""


def test_named_llm_configurations_override_the_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("LLM_API_KEY", SECRET)
    monkeypatch.setenv("LLM_TIMEOUT", "30")
    settings = load_settings(_write_config(tmp_path / "c.toml", NAMED_CONFIG))

    cheap, local = settings.llm_named("cheap"), settings.llm_named("local")
    assert (cheap.model, cheap.num_retries, cheap.base_url) == ("openai/gpt-4o-mini", 2, None)
    assert (local.model, local.num_retries, local.base_url) == (
        "openai/gpt-4o",
        5,
        "http://127.0.0.1:8000/v1",
    )
    # What a table does not set comes from [llm] as the environment left it.
    assert cheap.timeout == local.timeout == 30
    assert cheap.api_key is not None and cheap.api_key.get_secret_value() == SECRET
    assert settings.llm_named(None) is settings.llm
    assert settings.llm.model == "openai/gpt-4o"  # the tables do not leak into [llm]
    with pytest.raises(KeyError):
        settings.llm_named("missing")
    # Rate limits follow the configuration a call uses.
    assert settings.limits_for("openai/gpt-4o-mini", cheap).rpm == 100
    assert settings.limits_for("openai/gpt-4o", local).rpm == 30


@pytest.mark.parametrize(
    ("table", "named"),
    [
        ("[llm.bad]\nnum_retries = -1\n", "LLM_NUM_RETRIES (num_retries in [llm.bad]"),
        ("[llm.bad]\nbogus = 1\n", "bogus in [llm.bad]"),
        ('[llm."bad name"]\nmodel = "x"\n', "[llm.bad name]"),
        ("[llm.bad]\nretry_max_wait = 5000\n", "[llm.bad]: invalid configuration"),
        ("[llm.bad]\ninput_cost_per_token = 0.1\n", "[llm.bad]: invalid configuration"),
    ],
)
def test_a_bad_named_configuration_is_named(tmp_path: Path, table: str, named: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(_write_config(tmp_path / "c.toml", table))
    assert named in str(raised.value)


# --- the API key stays secret ---------------------------------------------------------------


def test_api_key_is_a_secret_str_hidden_from_str_and_repr(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLM_API_KEY", SECRET)

    settings = load_settings()

    assert isinstance(settings.llm.api_key, SecretStr)
    assert settings.llm.api_key.get_secret_value() == SECRET
    for text in (str(settings), repr(settings), str(settings.llm), repr(settings.llm)):
        assert SECRET not in text
    assert SECRET not in settings.model_dump_json()


def test_invalid_api_key_in_file_is_not_echoed(tmp_path: Path) -> None:
    path = _write_config(tmp_path / "c.toml", "[llm]\napi_key = 918273645546372819\n")

    with pytest.raises(ConfigError) as raised:
        load_settings(path)

    message = str(raised.value)
    assert "LLM_API_KEY" in message
    assert "918273645546372819" not in message


def test_invalid_explicit_api_key_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(llm={"api_key": [SECRET]})

    message = str(raised.value)
    assert "LLM_API_KEY" in message
    assert SECRET not in message
    assert "sk-canary" not in message


def test_valid_api_key_is_not_echoed_when_another_key_is_invalid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLM_API_KEY", SECRET)
    monkeypatch.setenv("LLM_TIMEOUT", "-1")

    with pytest.raises(ConfigError) as raised:
        load_settings()

    assert "LLM_TIMEOUT" in str(raised.value)
    assert SECRET not in str(raised.value)
