"""Live configuration: versioned overrides of the hot sections, kept in Redis, picked up by every
process within seconds.

The base settings come from YAML and the environment at start (host/settings.py). On top of
them, admins set overrides of the HOT sections only — routing (`scheduler`), `limits`,
`webhooks`, the engine preference (`engine.backend`, `engine.max_step_failures`,
`engine.failover_cooldown_s`, `engine.step_delay_s`) and what Flower is told of the jobs
(`flower.task_events`, `flower.redact_prompts`, `flower.prompt_chars`) — through the API or
`localmoe config`.
Each change is a new version; a rollback is a new version equal to an old one. Processes poll
the current version number (one GET) every `POLL_S` and rebuild their settings when it moves.
The versions live under host/keys.py's CONFIG_CURRENT and CONFIG_HISTORY.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import redis
from pydantic import BaseModel, Field, ValidationError

from host.keys import CONFIG_CURRENT, CONFIG_HISTORY
from host.settings import Settings

log = logging.getLogger(__name__)

POLL_S = 2.0  # a change reaches every process within this (plus its own apply)

HOT_SECTIONS = ("scheduler", "limits", "webhooks")
HOT_ENGINE = ("backend", "max_step_failures", "failover_cooldown_s", "step_delay_s")
HOT_FLOWER = ("task_events", "redact_prompts", "prompt_chars")  # what the workers' relays publish
HOT_KEYS = {"engine": HOT_ENGINE, "flower": HOT_FLOWER}  # sections of which only these keys are hot
RESTART_ONLY = {"engine.backend"}  # recorded now; a worker's engine is chosen when it starts


class Version(BaseModel):
    number: int = 0  # 0: no override yet, the base settings as started
    overrides: dict[str, Any] = Field(default_factory=dict, description='{"limits.max_tokens": 512, ...}')
    by: str = "start"
    at: float = 0.0
    note: str | None = None


class ConfigError(ValueError):
    """A change that would not validate, or touches a setting that is not hot."""


def hot(path: str) -> bool:
    section, _, rest = path.partition(".")
    if section in HOT_SECTIONS:
        return bool(rest)
    return rest in HOT_KEYS.get(section, ())


def apply(base: Settings, overrides: dict[str, Any]) -> Settings:
    """The base settings with `overrides` (dotted paths into the hot sections) laid over them;
    each touched section is validated as a whole. Other settings (secrets included) are the
    base's, untouched."""
    sections: dict[str, dict[str, Any]] = {}
    for path, value in overrides.items():
        name, _, rest = path.partition(".")
        if name not in (*HOT_SECTIONS, *HOT_KEYS) or not rest:
            raise ConfigError(f"{path}: no such hot setting")
        node = sections.setdefault(name, getattr(base, name).model_dump(mode="json"))
        *parents, leaf = rest.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"{path}: no such setting")
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"{path}: no such setting")
        node[leaf] = value
    validated: dict[str, Any] = {}
    for name, data in sections.items():
        try:
            validated[name] = type(getattr(base, name)).model_validate(data)
        except ValidationError as e:
            problems = "; ".join(
                f"{name}.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()
            )
            raise ConfigError(problems) from e
    return base.model_copy(update=validated)


def current(client: redis.Redis) -> Version:
    raw = client.get(CONFIG_CURRENT)
    return Version.model_validate_json(cast(str, raw)) if raw else Version()


def history(client: redis.Redis) -> list[Version]:
    return [Version.model_validate_json(r) for r in cast(list[str], client.lrange(CONFIG_HISTORY, 0, -1))]


def _commit(
    client: redis.Redis, base: Settings, make: Callable[[Version], dict[str, Any]], by: str, note: str | None
) -> Version:
    """Writes the next version atomically (WATCH on the current one): `make` maps the current
    version to the new overrides, which must validate over `base`."""
    with client.pipeline() as pipe:
        while True:
            try:
                pipe.watch(CONFIG_CURRENT)
                raw = pipe.get(CONFIG_CURRENT)
                now = Version.model_validate_json(cast(str, raw)) if raw else Version()
                overrides = make(now)
                apply(base, overrides)  # refuse what would not validate
                new = Version(number=now.number + 1, overrides=overrides, by=by, at=time.time(), note=note)
                pipe.multi()
                pipe.set(CONFIG_CURRENT, new.model_dump_json())
                pipe.rpush(CONFIG_HISTORY, new.model_dump_json())
                pipe.execute()
                return new
            except redis.WatchError:
                continue


def set_values(
    client: redis.Redis, base: Settings, changes: dict[str, Any], by: str, note: str | None = None
) -> Version:
    """A new version with `changes` (dotted path → value; None removes an override)."""
    if not changes:
        raise ConfigError("nothing to change")
    cold = [p for p in changes if not hot(p)]
    if cold:
        raise ConfigError(
            f"not changeable while running: {', '.join(sorted(cold))} (hot: {', '.join(HOT_SECTIONS)}, "
            + ", ".join(f"{s}.{{{','.join(k)}}}" for s, k in HOT_KEYS.items())
            + "); set it in the YAML file and restart"
        )

    def make(now: Version) -> dict[str, Any]:
        merged = dict(now.overrides)
        for path, value in changes.items():
            if value is None:
                merged.pop(path, None)
            else:
                merged[path] = value
        return merged

    return _commit(client, base, make, by, note)


def rollback(client: redis.Redis, base: Settings, number: int, by: str) -> Version:
    """A new version whose overrides are those of version `number` (0: none)."""
    if number == 0:
        return _commit(client, base, lambda _: {}, by, "rollback to the base settings")
    old = next((v for v in history(client) if v.number == number), None)
    if old is None:
        raise ConfigError(f"no version {number}")
    return _commit(client, base, lambda _: dict(old.overrides), by, f"rollback to version {number}")


class ConfigWatcher(threading.Thread):
    """Polls the current version; on a change, builds the new settings and calls `on_change`.
    A version that no longer validates here (a stale process, a changed base) is logged and
    skipped: the process keeps its last good settings."""

    def __init__(
        self,
        client: redis.Redis,
        base: Settings,
        on_change: Callable[[Settings, Version], None],
        poll_s: float = POLL_S,
    ) -> None:
        super().__init__(name="config-watcher", daemon=True)
        self.client = client
        self.base = base
        self.on_change = on_change
        self.poll_s = poll_s
        self.version = 0

    def check(self) -> None:
        version = current(self.client)
        if version.number == self.version:
            return
        self.version = version.number
        try:
            settings = apply(self.base, version.overrides)
        except ConfigError as e:
            log.error(
                "config version %d does not apply here (%s); keeping the last good one", version.number, e
            )
            return
        log.info("config version %d by %s: %s", version.number, version.by, json.dumps(version.overrides))
        self.on_change(settings, version)

    def run(self) -> None:
        while True:
            try:
                self.check()
            except redis.RedisError as e:
                log.warning("config watcher: %s", e)
            time.sleep(self.poll_s)
