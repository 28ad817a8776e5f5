"""Settings declared once: the variable, its default, its check and its doc line in one place.

A config class is a frozen dataclass whose environment-backed fields are made with `setting(...)`.
Everything else is derived from those declarations, so a variable's name is written once:
reading (`read_env`: blank means "use the default", a value that does not parse is an error that
names the variable), validation (`check_settings`: the first bad value raises `ConfigError` with
one line naming the variable), the reverse mapping for subprocesses (`to_env`) and the rows of
the configuration tables in docs/operations.md (`table_rows`, rendered by `streams.config_docs`).
The stream, the trainer and the LLM client all fail the same readable way.

>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class Demo:
...     n: int = setting(4, "N", "how many", parse=int, check=lambda v: v >= 1, why="must be >= 1")
>>> Demo(**read_env(Demo, {"N": " 7 "})), to_env(Demo())
(Demo(n=7), {'N': '4'})
>>> check_settings(Demo(n=0))
Traceback (most recent call last):
core.settings.ConfigError: N=0 must be >= 1
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

__all__ = ["ConfigError", "Setting", "setting", "declared", "read_env", "check_settings", "to_env",
           "table_rows", "check_all", "lower", "names", "is_port", "PORT_RULE"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting has a value the program cannot run with; the message names the variable."""


def _show(value: Any) -> str:
    return "" if value is None else str(value)


@dataclass(frozen=True)
class Setting:
    """One environment variable behind one config field (see the module docstring)."""

    env: str
    doc: str
    parse: Callable[[str], Any] = str
    check: Callable[[Any], bool] | None = None
    why: str = ""
    show: Callable[[Any], str] = _show
    fallback: str | None = None  # variable read when `env` is unset or blank
    secret: bool = False  # never shown in repr, docs defaults or `to_env`


def setting(default: T, env: str, doc: str, *, parse: Callable[[str], Any] = str,
            check: Callable[[Any], bool] | None = None, why: str = "",
            show: Callable[[Any], str] = _show, fallback: str | None = None, secret: bool = False) -> T:
    """A dataclass field with `default`, read from the variable `env` (see `Setting`)."""
    meta = Setting(env, doc, parse, check, why, show, fallback, secret)
    out: T = field(default=default, repr=not secret, metadata={"setting": meta})
    return out


def declared(cls: type) -> Iterator[tuple[str, Setting, Any]]:
    """(field name, its `Setting`, its default) of every environment-backed field of `cls`."""
    for f in fields(cls):
        meta = f.metadata.get("setting")
        if isinstance(meta, Setting):
            yield f.name, meta, f.default


def _parse(name: str, raw: str, conv: Callable[[str], Any]) -> Any:
    try:
        return conv(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected {getattr(conv, '__name__', 'a value')}") from None


def read_env(cls: type, env: Mapping[str, str]) -> dict[str, Any]:
    """Keyword arguments of `cls` from `env`: every set, non-blank declared variable, parsed.

    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Demo:
    ...     port: int = setting(1, "OWN_PORT", "port", parse=int, fallback="PORT")
    >>> read_env(Demo, {"PORT": "80"}), read_env(Demo, {"PORT": "80", "OWN_PORT": "81"}), read_env(Demo, {})
    ({'port': 80}, {'port': 81}, {})
    >>> read_env(Demo, {"OWN_PORT": "x"})
    Traceback (most recent call last):
    core.settings.ConfigError: OWN_PORT='x': expected int
    """
    out: dict[str, Any] = {}
    for name, meta, _ in declared(cls):
        raw, source = env.get(meta.env, "").strip(), meta.env
        if not raw and meta.fallback:
            raw, source = env.get(meta.fallback, "").strip(), meta.fallback
        if raw:
            out[name] = _parse(source, raw, meta.parse)
    return out


def check_settings(config: object) -> None:
    """Raise `ConfigError` naming the variable of the first declared field whose check fails."""
    check_all((meta.check is None or bool(meta.check(getattr(config, name))), meta.env,
               getattr(config, name), meta.why) for name, meta, _ in declared(type(config)))


def to_env(config: object) -> dict[str, str]:
    """The variables that reproduce `config`'s declared fields in a subprocess (secrets left out)."""
    return {meta.env: meta.show(getattr(config, name))
            for name, meta, _ in declared(type(config)) if not meta.secret}


def table_rows(cls: type) -> Iterator[tuple[str, str, str]]:
    """(variable, default cell, doc) per declared field, as docs/operations.md shows them."""
    for _, meta, default in declared(cls):
        shown = "" if meta.secret else meta.show(default)
        if meta.fallback:
            cell = f"(`{meta.fallback}`)"
        else:
            cell = f"`{shown}`" if shown else "(unset)"
        yield meta.env, cell, meta.doc


def check_all(checks: Iterable[tuple[bool, str, Any, str]]) -> None:
    """Raise `ConfigError` for the first `(ok, variable, value, why)` whose `ok` is false."""
    for ok, name, value, why in checks:
        if not ok:
            raise ConfigError(f"{name}={value!r} {why}")


PORT_RULE = "must be a port (0-65535; 0 disables it)"


def is_port(value: int) -> bool:
    """A TCP port, or 0 for "off" (checks of every `*_PORT` setting, with `PORT_RULE`)."""
    return 0 <= value <= 65535


def lower(raw: str) -> str:
    """A case-insensitive word (parse function of choice settings)."""
    return raw.lower()


def names(value: str | Iterable[str]) -> tuple[str, ...]:
    """A comma-separated list (or a sequence) of names, stripped, blanks and repeats dropped.

    >>> names(" a, b,,a ")
    ('a', 'b')
    """
    parts = value.split(",") if isinstance(value, str) else value
    return tuple(dict.fromkeys(p.strip() for p in parts if p.strip()))
