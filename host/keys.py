"""The Redis keys of the ground floor: the prefix every LocalMoE key starts with (scheduler/keys.py
builds every other key on it) and the live configuration's two (host/config_store.py).

CONFIG_CURRENT  string: the current Version JSON (number, overrides, who, when, note)
CONFIG_HISTORY  list: every Version JSON, oldest first
"""

PREFIX = "localmoe"

CONFIG_CURRENT = f"{PREFIX}:config:current"
CONFIG_HISTORY = f"{PREFIX}:config:history"
