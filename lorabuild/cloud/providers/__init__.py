"""What the provider modules share: one bounded, redacting HTTP call, and how offers are matched.

Owns the HTTP plumbing under `runpod.py` and `vastai.py` — httpx (imported only when a call is
made) with connect and read timeouts, the account key in an `Authorization` header and nowhere
else, and every failure turned into a `ProviderError` whose text says what happened and what to
do, with any key removed (`credentials.redact`). Idempotent reads (listing, showing, searching)
are retried here a few times on timeouts, 429 and 5xx; creating is never retried here (a second
try after a lost answer could rent a second machine; the ledger finds the first by its label),
and deleting is retried, with confirmation, by `lorabuild.cloud.ledger.teardown`.

Settings read at each call: `LORABUILD_CLOUD_TIMEOUT` (seconds a provider may take to answer,
default 30) and `LORABUILD_CLOUD_BACKOFF` (first wait between read retries, default 0.5 s).
`TRANSPORT` replaces the network with an `httpx` transport in tests.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import time
from typing import Any

from lorabuild.cloud import GpuNeed, Offer, ProviderError
from lorabuild.cloud.credentials import PROVIDER_NAMES, redact, where_to_put_it

DEFAULT_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10.0
READ_ATTEMPTS = 3
DEFAULT_BACKOFF_S = 0.5
MAX_RETRY_AFTER_S = 10.0
VRAM_TOLERANCE_GB = 0.5  # providers report 24 GB cards as 23.99 GiB; a 24 GB need must still fit

TRANSPORT: Any = None  # an httpx.BaseTransport that replaces the network (tests)


def env_float(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, ""))
    except ValueError:
        return default
    return value if value >= 0 else default


def timeout_s() -> float:
    return env_float("LORABUILD_CLOUD_TIMEOUT", DEFAULT_TIMEOUT_S) or DEFAULT_TIMEOUT_S


def backoff_s() -> float:
    return env_float("LORABUILD_CLOUD_BACKOFF", DEFAULT_BACKOFF_S)


def base_url(env_var: str, default: str) -> str:
    return (os.environ.get(env_var) or default).rstrip("/")


def _detail(response: Any) -> str:
    """The provider's own explanation from an error body (RunPod RFC 9457, Vast msg/error)."""
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError):
        text = response.text.strip()
        return text[:300]
    if not isinstance(body, dict):
        return str(body)[:300]
    parts = [str(body[k]) for k in ("detail", "msg", "error", "title") if body.get(k)]
    errors = body.get("errors")
    if isinstance(errors, list) and errors:
        parts.append("; ".join(str(e) for e in errors[:5]))
    return " — ".join(dict.fromkeys(parts))[:300]


class Http:
    """One provider API, with its key. The key is kept out of `repr()` and every message."""

    def __init__(self, provider: str, base: str, key: str):
        self.provider = provider
        self.name = PROVIDER_NAMES.get(provider, provider)
        self.base = base
        self._key = key

    def __repr__(self) -> str:
        return f"Http({self.provider!r}, {self.base!r})"

    def request(
        self,
        method: str,
        path: str,
        what: str,
        *,
        params: dict[str, str] | None = None,
        body: Any = None,
        ok: tuple[int, ...] = (200,),
        allow: tuple[int, ...] = (),
        idempotent: bool = False,
    ) -> Any:
        """The response when its status is in `ok` or `allow`; otherwise a ProviderError.
        Idempotent requests are retried on timeouts, lost connections, 429 and 5xx."""
        import httpx

        attempts = READ_ATTEMPTS if idempotent else 1
        limit = timeout_s()
        timeout = httpx.Timeout(limit, connect=min(CONNECT_TIMEOUT_S, limit))
        headers = {"Authorization": f"Bearer {self._key}", "Accept": "application/json"}
        wait = backoff_s()
        error: ProviderError | None = None
        with httpx.Client(base_url=self.base, timeout=timeout, transport=TRANSPORT, headers=headers) as client:
            for attempt in range(attempts):
                if attempt:
                    time.sleep(wait * 2 ** (attempt - 1))
                try:
                    response = client.request(method, path, params=params, json=body)
                except httpx.TimeoutException:
                    error = ProviderError(
                        f"{self.name} did not answer within {limit:g} s while {what}; its service may be slow "
                        "right now — trying again usually works.",
                        retryable=True,
                    )
                    continue
                except httpx.HTTPError as exc:
                    reason = redact(str(exc) or type(exc).__name__, (self._key,))
                    error = ProviderError(
                        f"lorabuild could not talk to {self.name} at {self.base} while {what} ({reason}). "
                        "Check the internet connection; trying again usually works.",
                        retryable=True,
                    )
                    continue
                if response.status_code in ok or response.status_code in allow:
                    return response
                error = self.error_for(response, what)
                if not error.retryable:
                    raise error
                retry_after = response.headers.get("Retry-After", "")
                if retry_after.isdigit() and attempt < attempts - 1:
                    time.sleep(min(float(retry_after), MAX_RETRY_AFTER_S))
        assert error is not None
        raise error

    def error_for(self, response: Any, what: str) -> ProviderError:
        status = int(response.status_code)
        detail = redact(_detail(response), (self._key,))
        said = f" ({detail})" if detail else ""
        if status in (401, 403):
            return ProviderError(
                f"{self.name} refused lorabuild's API key while {what} (HTTP {status}{said}). The key is "
                f"missing, mistyped, expired or lacks permission. Fix: {where_to_put_it(self.provider)}, "
                "with a key that may manage instances.",
                status=status,
            )
        if status == 429:
            return ProviderError(
                f"{self.name} is limiting how often lorabuild may call it (HTTP 429) while {what}; "
                "waiting a little and trying again works.",
                retryable=True,
                status=status,
            )
        if status >= 500:
            return ProviderError(
                f"{self.name} had a problem on its side while {what} (HTTP {status}{said}); this is usually "
                "brief — trying again works.",
                retryable=True,
                status=status,
            )
        return ProviderError(f"{self.name} refused {what} (HTTP {status}{said}).", status=status)


def json_body(response: Any, http: Http, what: str) -> Any:
    """The JSON of a successful response, or a ProviderError when it is not JSON."""
    try:
        return response.json()
    except (ValueError, UnicodeDecodeError):
        raise ProviderError(
            f"{http.name} answered {what} with something that is not JSON (HTTP {response.status_code}); "
            "its service may be having trouble — trying again usually works.",
            retryable=True,
            status=int(response.status_code),
        ) from None


# --- offers ---------------------------------------------------------------------------------------


def _norm(name: str) -> str:
    text = name.lower().replace("nvidia", "").replace("geforce", "")
    return re.sub(r"[^a-z0-9]+", "", text)


def gpu_matches(wanted: str | None, offered: str) -> bool:
    """Whether the provider's GPU name is the GPU the spec asks for ("RTX 4090" matches
    "NVIDIA GeForce RTX 4090"); any GPU matches when none is asked for."""
    if not wanted:
        return True
    from lorabuild.hardware import find_gpu

    want_model, have_model = find_gpu(wanted), find_gpu(offered)
    if want_model is not None and have_model is not None:
        return want_model == have_model
    # a name lorabuild's catalogue does not know: compare the names themselves
    want, have = _norm(wanted), _norm(offered)
    return bool(want) and (want == have or want in have)


def fits_vram(vram_gb: float, need: GpuNeed) -> bool:
    return vram_gb + VRAM_TOLERANCE_GB >= need.min_vram_gb


def within_price(price_per_hour: float, need: GpuNeed) -> bool:
    return need.max_price_per_hour is None or price_per_hour <= need.max_price_per_hour + 1e-9


def cheapest_first(offers: list[Offer]) -> list[Offer]:
    """Cheapest first; among equal prices the more reliable, then the one with more memory."""
    return sorted(offers, key=lambda o: (o.price_per_hour, -(o.reliability or 0.0), -o.vram_gb, o.offer_id))


def dumps(value: Any) -> str:
    """Compact JSON for query parameters that carry JSON (Vast.ai's filters)."""
    return json.dumps(value, separators=(",", ":"))


# --- self-delete ----------------------------------------------------------------------------------


def delete_script(
    *, provider: str, id_var: str, key_var: str, env_file: str, default_url: str, path_prefix: str, done_codes: str
) -> str:
    """The self-delete snippet both providers share. Runs in a subshell, so it can be pasted into
    any script; the key travels on stdin to curl (or in python3's environment), never in argv
    where `ps` would show it."""
    q = shlex.quote
    fetch = (
        "import os,urllib.request as u\n"
        "r=u.Request(os.environ['LB_URL'],method='DELETE',headers={'Authorization':'Bearer '+os.environ['LB_KEY']})\n"
        "try:\n print(u.urlopen(r,timeout=30).status)\n"
        "except u.HTTPError as e:\n print(e.code)\n"
        "except Exception:\n print(0)\n"
    )
    return f"""(
# lorabuild: delete this {provider} instance with its own instance-scoped key (never the account key)
if [ -z "${{{id_var}:-}}" ] || [ -z "${{{key_var}:-}}" ]; then
  if [ -r {q(env_file)} ]; then . {q(env_file)}; fi
fi
if [ -n "${{LORABUILD_INSTANCE_ENV:-}}" ] && [ -r "$LORABUILD_INSTANCE_ENV" ]; then . "$LORABUILD_INSTANCE_ENV"; fi
if [ -z "${{{id_var}:-}}" ] || [ -z "${{{key_var}:-}}" ]; then
  echo "lorabuild: {id_var} or {key_var} is not set; cannot delete this instance" >&2
  exit 2
fi
lb_default={q(default_url)}
lb_api="${{LORABUILD_API_URL:-$lb_default}}"
lb_url="${{lb_api%/}}"{q(path_prefix)}"${id_var}"
lb_try=0
while [ "$lb_try" -lt 10 ]; do
  lb_try=$((lb_try + 1))
  if command -v curl >/dev/null 2>&1; then
    lb_code=$(printf 'Authorization: Bearer %s\\n' "${key_var}" | curl -sS -o /dev/null -w '%{{http_code}}' \\
      --connect-timeout 10 --max-time 30 -X DELETE -H @- "$lb_url" 2>/dev/null)
  else
    lb_code=$(LB_URL="$lb_url" LB_KEY="${key_var}" python3 -c {q(fetch)} 2>/dev/null)
  fi
  case "$lb_code" in
    {done_codes}) echo "lorabuild: this instance was deleted (HTTP $lb_code)"; exit 0 ;;
  esac
  echo "lorabuild: deleting this instance failed (HTTP $lb_code), trying again" >&2
  sleep "${{LORABUILD_SELF_DELETE_WAIT:-15}}"
done
exit 1
)"""
