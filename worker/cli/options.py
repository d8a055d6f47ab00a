"""What the promptq commands share: exit statuses, worker pools, --config and -s/--set."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

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
