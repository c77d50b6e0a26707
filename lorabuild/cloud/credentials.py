"""Cloud API keys: where lorabuild finds them, and how it keeps them out of everything it writes.

Owns the lookup of each provider's account key — the environment variable first
(`RUNPOD_API_KEY`, `VAST_API_KEY`), then the file the provider's own tools use (RunPod
`~/.runpod/config.toml`, `[default] api_key`; Vast.ai `$XDG_CONFIG_HOME/vastai/vast_api_key`, then
`~/.vast_api_key`) — and `redact`, which removes every key lorabuild knows of from a text before
it reaches a message, a log or a file. Keys are never cached on disk, never put in exception
texts, and the objects that carry them hide them from `repr()`.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from lorabuild.cloud import MissingCredentials

ENV_VARS: dict[str, str] = {"runpod": "RUNPOD_API_KEY", "vastai": "VAST_API_KEY"}
PROVIDER_NAMES: dict[str, str] = {"runpod": "RunPod", "vastai": "Vast.ai"}
REDACTED = "[redacted]"

# Every key this process has read, so `redact` also catches one whose variable was unset since.
_SEEN: set[str] = set()
_SEEN_LOCK = threading.Lock()
# A key shorter than this is not a real key; redacting it would mangle ordinary words.
_MIN_KEY_LENGTH = 8


def config_files(provider: str) -> list[Path]:
    """The provider's usual key files, in the order lorabuild reads them."""
    home = Path.home()
    if provider == "runpod":
        return [home / ".runpod" / "config.toml"]
    if provider == "vastai":
        xdg = os.environ.get("XDG_CONFIG_HOME") or str(home / ".config")
        return [Path(xdg) / "vastai" / "vast_api_key", home / ".vast_api_key"]
    return []


def where_to_put_it(provider: str) -> str:
    """Plain words for the places a key can go (for messages; never the key itself)."""
    var = ENV_VARS.get(provider, "the provider's API key variable")
    files = config_files(provider)
    if provider == "runpod":
        return f'set {var}, or put it in {_tilde(files[0])} under [default] as api_key = "…"'
    if provider == "vastai":
        return f"set {var}, or save it in {_tilde(files[0])} (or {_tilde(files[1])})"
    return f"set {var}"


def _tilde(path: Path) -> str:
    home = str(Path.home())
    text = str(path)
    return "~" + text[len(home) :] if text.startswith(home + os.sep) else text


def _read_runpod_config(path: Path) -> str | None:
    import tomllib  # here: every command reads the ledger, few read this file

    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    section = data.get("default")
    value = section.get("api_key") if isinstance(section, dict) else None
    return value.strip() if isinstance(value, str) and value.strip() else None


def _read_key_file(path: Path) -> str | None:
    try:
        value = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return value or None


def _remember(key: str) -> str:
    if len(key) >= _MIN_KEY_LENGTH:
        with _SEEN_LOCK:
            _SEEN.add(key)
    return key


def find_api_key(provider: str) -> str | None:
    """The account key for `provider`, or None when neither the environment nor a file has one."""
    var = ENV_VARS.get(provider)
    if var is None:
        return None
    from_env = os.environ.get(var, "").strip()
    if from_env:
        return _remember(from_env)
    for path in config_files(provider):
        key = _read_runpod_config(path) if provider == "runpod" else _read_key_file(path)
        if key:
            return _remember(key)
    return None


def api_key(provider: str) -> str:
    """The account key for `provider`, or MissingCredentials saying where to put one."""
    key = find_api_key(provider)
    if key is None:
        name = PROVIDER_NAMES.get(provider, provider)
        raise MissingCredentials(
            f"lorabuild has no {name} API key, so it cannot rent or check {name} machines. "
            f"Fix: create a key in your {name} account settings and {where_to_put_it(provider)}."
        )
    return key


def has_api_key(provider: str) -> bool:
    return find_api_key(provider) is not None


def known_keys() -> set[str]:
    """Every key `redact` removes: those read so far, and those the environment and files hold now."""
    keys: set[str] = set()
    for provider in ENV_VARS:
        # find_api_key stops at the first source; a key in a file behind an env var still counts
        env_value = os.environ.get(ENV_VARS[provider], "").strip()
        if env_value:
            keys.add(env_value)
        for path in config_files(provider):
            value = _read_runpod_config(path) if provider == "runpod" else _read_key_file(path)
            if value:
                keys.add(value)
    with _SEEN_LOCK:
        keys |= _SEEN
    return {k for k in keys if len(k) >= _MIN_KEY_LENGTH}


def redact(text: str, extra: tuple[str, ...] = ()) -> str:
    """`text` with every known API key (and each of `extra`) replaced by "[redacted]"."""
    if not text:
        return text
    # longest first, so a key that contains another is removed whole
    for key in sorted(known_keys() | {k for k in extra if len(k) >= _MIN_KEY_LENGTH}, key=len, reverse=True):
        text = text.replace(key, REDACTED)
    return text
