"""Tenants' weights in the fleet's fair share: the [tenants] table and PROMPTQ_TENANTS."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from api_client._schemas import TENANT_PATTERN

# Tenants' weights in the environment: NAME=WEIGHT pairs separated by commas ("team-a=2,b=0.5").
TENANTS_ENV = "PROMPTQ_TENANTS"
# The weight of a tenant that [tenants] and PROMPTQ_TENANTS do not list.
DEFAULT_TENANT_WEIGHT = 1.0


def tenant_weights(
    table: Mapping[str, Any], env_text: str | None, path: Path | None, problems: list[str]
) -> dict[str, float]:
    """Each tenant's weight: the [tenants] table, then PROMPTQ_TENANTS' entries over it (the
    environment wins, tenant by tenant). A bad name or weight is a problem naming its key."""
    weights: dict[str, float] = {}
    where = f"[tenants] of {path or 'config.toml'}"
    for name, value in table.items():
        if isinstance(value, Mapping):  # `team.a = 2` is a table "team" to TOML
            problems.append(
                f"tenants.{name} in {where}: a weight is a number, not a table (quote a name "
                f'with dots: "{name}.x" = 2)'
            )
        elif (weight := _checked_tenant(name, value, value, where, problems)) is not None:
            weights[name] = weight
    seen: set[str] = set()
    for name, raw in parse_tenants_env(env_text or "", problems):
        if name in seen:
            problems.append(f"tenants.{name} in {TENANTS_ENV}: listed twice")
            continue
        seen.add(name)
        try:
            number: float | None = float(raw)
        except ValueError:
            number = None
        if (weight := _checked_tenant(name, number, raw, TENANTS_ENV, problems)) is not None:
            weights[name] = weight
    return weights


def parse_tenants_env(text: str, problems: list[str]) -> list[tuple[str, str]]:
    """The (name, weight text) pairs of PROMPTQ_TENANTS: ``NAME=WEIGHT`` separated by commas,
    spaces around either ignored. A pair without ``=`` is a problem."""
    pairs = []
    for entry in text.split(","):
        if not entry.strip():
            continue
        name, sep, weight = entry.partition("=")
        if not sep:
            problems.append(
                f"{TENANTS_ENV}: each entry is NAME=WEIGHT, separated by commas (got {entry!r})"
            )
            continue
        pairs.append((name.strip(), weight.strip()))
    return pairs


def _checked_tenant(
    name: str, value: Any, given: Any, where: str, problems: list[str]
) -> float | None:
    """``value`` as tenant ``name``'s weight, or None after naming the problem (``given``:
    the value as the user wrote it)."""
    if not re.fullmatch(TENANT_PATTERN, name):
        problems.append(
            f"tenants.{name} in {where}: a tenant name matches {TENANT_PATTERN} (letters, "
            "digits and _.:-, 1 to 64 characters)"
        )
        return None
    number = value if isinstance(value, int | float) and not isinstance(value, bool) else None
    if number is None or not math.isfinite(number) or number <= 0:
        problems.append(
            f"tenants.{name} in {where}: a weight is a finite number > 0 (got {given!r})"
        )
        return None
    return float(number)
