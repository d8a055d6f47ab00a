"""Where a setting comes from (explicit, environment, file) and which values read as unset."""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any, ClassVar

from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

# The tables of the config file being loaded, handed to the settings sources below.
file_tables: ContextVar[Mapping[str, Mapping[str, Any]]] = ContextVar(
    "file_tables", default=MappingProxyType({})
)


class _FileTable(PydanticBaseSettingsSource):
    """One table of config.toml as a settings source (below the environment in precedence)."""

    def __init__(self, settings_cls: type[BaseSettings], table: str) -> None:
        super().__init__(settings_cls)
        self._values = dict(file_tables.get().get(table, {}))

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return self._values


class _WithoutUnset(PydanticBaseSettingsSource):
    """A source with the values that read as unset left out, so the next source (or the
    default) gives the setting, as if this one had not set it."""

    def __init__(self, settings_cls: type[LayeredSettings], source: PydanticBaseSettingsSource):
        super().__init__(settings_cls)
        self._source = source
        self._unset = settings_cls.unset_values

    def _set_current_state(self, state: dict[str, Any]) -> None:
        super()._set_current_state(state)
        self._source._set_current_state(state)

    def _set_settings_sources_data(self, states: dict[str, dict[str, Any]]) -> None:
        super()._set_settings_sources_data(states)
        self._source._set_settings_sources_data(states)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._source.get_field_value(field, field_name)

    def __call__(self) -> dict[str, Any]:
        return without_unset(self._source(), self._unset)


def without_unset(values: Mapping[str, Any], unset: Mapping[str, frozenset[Any]]) -> dict[str, Any]:
    """``values`` without those that read as unset: a value in ``unset[name]``, given as is or
    as text (an environment variable's "0"); the key "*" lists what reads as unset for any
    setting ("" there: an empty list or table too)."""
    anywhere = unset.get("*", frozenset())
    return {
        name: value
        for name, value in values.items()
        if not _among(value, unset.get(name, frozenset()) | anywhere)
    }


def _among(value: Any, unset: frozenset[Any]) -> bool:
    if isinstance(value, list | dict):  # an empty list or table is as empty as ""
        return not value and "" in unset
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return False
    if value in unset:
        return True
    if isinstance(value, str):
        for candidate in unset:
            if isinstance(candidate, int | float) and not isinstance(candidate, bool):
                try:
                    if float(value) == candidate:
                        return True
                except ValueError:
                    continue
    return False


class LayeredSettings(BaseSettings):
    """Precedence: explicit arguments, then environment, then the file's table, then defaults;
    in each, a value of ``unset_values`` counts as not given there."""

    config_table: ClassVar[str] = ""
    # Per setting, the values that mean "not set" (the key "*": for every setting).
    unset_values: ClassVar[Mapping[str, frozenset[Any]]] = MappingProxyType({})

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources = (init_settings, env_settings, _FileTable(settings_cls, cls.config_table))
        if not cls.unset_values:
            return sources
        return tuple(_WithoutUnset(cls, source) for source in sources)
