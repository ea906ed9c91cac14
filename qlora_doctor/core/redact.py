"""Secrets never leave this machine through what qlora-doctor writes or prints.

Every writer of reports, manifests, lockfiles and logs, and the output of `check` and `explain`,
passes its text through `redact` (or its data through `redact_data`). Two kinds of secret go:

  * the values of secret-holding environment variables (`HF_TOKEN`, `WANDB_API_KEY`, any variable
    whose name ends in `_TOKEN`, `_API_KEY`, `_SECRET`, `_PASSWORD`...) and the Hugging Face token
    file (`$HF_TOKEN_PATH`, else `$HF_HOME/token`, else `~/.cache/huggingface/token`), wherever they
    appear, exactly;
  * anything shaped like a well-known token, even when this machine does not hold it (a log pasted
    from elsewhere): `hf_` + 30 or more letters and digits, OpenAI/Anthropic `sk-...` keys, GitHub
    `ghp_`/`github_pat_` tokens, AWS access key ids, `Authorization: Bearer ...` headers, and the
    value of `TOKEN=...`/`api_key: ...` style assignments.

Redaction replaces the secret with `[redacted]` (keeping which variable it was, where known), so the
text still reads. Values shorter than 8 characters are not treated as secrets: replacing every `1`
in a report because `HF_TOKEN=1` would destroy the report and protect nothing.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

REDACTED = "[redacted]"
MIN_SECRET_LENGTH = 8

# Named explicitly because their names do not end in a secret-looking suffix, or to be sure.
SECRET_ENV_VARS = (
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN", "HF_API_TOKEN", "HUGGINGFACEHUB_API_TOKEN",
    "WANDB_API_KEY", "OPENAI_API_KEY", "ANTHROPIC_API_KEY", "COMET_API_KEY", "NEPTUNE_API_TOKEN",
    "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "GITHUB_TOKEN", "GH_TOKEN", "CLEARML_API_SECRET_KEY", "AZURE_OPENAI_API_KEY", "GOOGLE_API_KEY",
)
_SECRET_NAME = re.compile(r"(?:^|_)(?:TOKEN|API_?KEY|SECRET(?:_ACCESS)?(?:_KEY)?|PASSWORD|PASSWD|AUTH)$", re.I)

# Token shapes redacted wherever they appear. Lengths are those of real tokens, so that ordinary
# identifiers (`hf_hub_download`, git SHAs, sha256 hashes in lockfiles) survive.
TOKEN_PATTERNS = (
    re.compile(r"\bhf_[A-Za-z0-9]{30,}"),                      # Hugging Face user/org tokens
    re.compile(r"\bsk-(?:proj-|ant-|svcacct-)?[A-Za-z0-9_-]{20,}"),  # OpenAI, Anthropic keys
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}"),               # GitHub tokens
    re.compile(r"\bgithub_pat_[A-Za-z0-9_]{30,}"),
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),                       # AWS access key ids
    re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),             # Slack tokens
)
# `Authorization: Bearer <x>`, and `HF_TOKEN=<x>` / `"api_key": "<x>"` assignments: the value goes.
# Only names that mean a credential: `pad_token: <|endoftext|>` in a tokenizer config must survive.
_BEARER = re.compile(r"(\bBearer\s+|\bAuthorization:\s*token\s+)([A-Za-z0-9._~+/=-]{16,})", re.I)
_SECRET_KEY_NAME = (r"\b(?:(?:[A-Za-z0-9]+_)*(?:API_?KEY|SECRET(?:_ACCESS)?_KEY|CLIENT_SECRET|PASSWORD|PASSWD)"
                    r"|(?:(?:[A-Za-z0-9]+_)*(?:HF|HUGGING_?FACE(?:_HUB)?|HUB|API|AUTH|ACCESS|WANDB|OPENAI|GITHUB|GH"
                    r"|NEPTUNE|MLFLOW_TRACKING|AWS_SESSION|REFRESH)_)?TOKEN)")
_ASSIGNMENT = re.compile(r"""(%s["']?\s*[:=]\s*["']?)([^\s"',;}{]{%d,})""" % (_SECRET_KEY_NAME, MIN_SECRET_LENGTH),
                         re.I)


# `https://user:<password>@host/...` (a pip index URL with credentials in it): the password goes.
_URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]+:)([^@\s/]+)(@)")


def hf_token_paths(environ: os._Environ[str] | dict[str, str] | None = None) -> list[Path]:
    """Where huggingface_hub keeps a saved token, most specific first (as huggingface_hub resolves it)."""
    env = os.environ if environ is None else environ
    paths: list[Path] = []
    if env.get("HF_TOKEN_PATH"):
        paths.append(Path(env["HF_TOKEN_PATH"]).expanduser())
    if env.get("HF_HOME"):
        paths.append(Path(env["HF_HOME"]).expanduser() / "token")
    cache = Path(env["XDG_CACHE_HOME"]).expanduser() if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    paths.append(cache / "huggingface" / "token")
    paths.append(Path.home() / ".huggingface" / "token")  # huggingface_hub < 0.10
    return paths


def known_secrets(environ: os._Environ[str] | dict[str, str] | None = None) -> dict[str, str]:
    """secret value -> where it came from (the variable's or the file's name), longest values first."""
    env = os.environ if environ is None else environ
    found: dict[str, str] = {}
    for name, value in env.items():
        if name in SECRET_ENV_VARS or _SECRET_NAME.search(name):
            value = value.strip()
            if len(value) >= MIN_SECRET_LENGTH:
                found.setdefault(value, name)
    for path in hf_token_paths(env):
        try:
            value = path.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            continue
        if len(value) >= MIN_SECRET_LENGTH:
            found.setdefault(value, "huggingface token file")
    return dict(sorted(found.items(), key=lambda item: -len(item[0])))


def redact(text: str, secrets: dict[str, str] | None = None) -> str:
    """`text` with every known secret and every token-shaped string replaced by `[redacted]`."""
    if not text:
        return text
    secrets = known_secrets() if secrets is None else secrets
    for value, origin in secrets.items():
        if value in text:
            text = text.replace(value, f"[redacted {origin}]")
    for pattern in TOKEN_PATTERNS:
        text = pattern.sub(REDACTED, text)
    text = _URL_PASSWORD.sub(lambda m: m.group(1) + (m.group(2) if _is_redacted(m.group(2)) else REDACTED) + m.group(3),
                             text)
    text = _BEARER.sub(lambda m: m.group(1) + (m.group(2) if _is_redacted(m.group(2)) else REDACTED), text)
    return _ASSIGNMENT.sub(lambda m: m.group(1) + (m.group(2) if _is_redacted(m.group(2)) else REDACTED), text)


def _is_redacted(value: str) -> bool:
    return value.startswith("[redacted")


def redact_data(data: Any, secrets: dict[str, str] | None = None) -> Any:
    """A copy of JSON-like data (dicts, lists, tuples, strings, frozen dataclasses) with every string
    redacted. Keys are redacted too: a secret can end up as a dict key (a path, a header)."""
    secrets = known_secrets() if secrets is None else secrets
    if isinstance(data, str):
        return redact(data, secrets)
    if isinstance(data, dict):
        return {redact_data(k, secrets): redact_data(v, secrets) for k, v in data.items()}
    if isinstance(data, list):
        return [redact_data(v, secrets) for v in data]
    if isinstance(data, tuple):
        return tuple(redact_data(v, secrets) for v in data)
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        changes = {f.name: redact_data(getattr(data, f.name), secrets)
                   for f in dataclasses.fields(data) if f.init}
        return dataclasses.replace(data, **changes)
    return data
