"""What the promptq commands share: exit statuses, worker pools, --config, -s/--set and the
scheduling options (--priority, --tenant, --deadline-s)."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Sequence

from api_client._schemas import PRIORITY_ORDER, TENANT_PATTERN
from worker.errors import ConfigError

POOLS = ("threads", "prefork", "solo")
EXIT_FAILED = 1  # some prompts failed
EXIT_INTERRUPTED = 130


def config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", help="config file (default: $PROMPTQ_CONFIG, else ./config.toml if present)"
    )


def parse_overrides(pairs: Sequence[str]) -> dict[str, str]:
    """Returns the LLM settings that -s/--set KEY=VALUE pairs give (LLM_ optional)."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"-s/--set takes KEY=VALUE, got {pair!r}")
        overrides[key.strip().lower().removeprefix("llm_")] = value
    return overrides


def priority_option(parser: argparse.ArgumentParser, *, default: str | None, help: str) -> None:
    """--priority LEVEL: one of the levels, highest first; argparse names the others."""
    parser.add_argument(
        "--priority",
        choices=[level.value for level in PRIORITY_ORDER],
        default=default,
        metavar="LEVEL",
        help=help,
    )


def tenant_name(value: str) -> str:
    """The argparse type of --tenant: a tenant name, as a request takes it."""
    if not re.fullmatch(TENANT_PATTERN, value):
        raise argparse.ArgumentTypeError(
            f"not a tenant name (letters, digits and _.:-, 1 to 64 characters: "
            f"{TENANT_PATTERN}): {value!r}"
        )
    return value


def positive_seconds(value: str) -> float:
    """The argparse type of a duration in seconds: a finite number > 0."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {value!r}")
    return seconds
