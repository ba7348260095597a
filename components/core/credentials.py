"""Credentials are never written: refused in params values, hidden in every URL lensflow
shows. Two forms are recognised in any text: a URL's password (`scheme://user:PASSWORD@host`)
and a secret in a URL's query (`?password=…`, `&token=…`)."""

from __future__ import annotations

import re

TUNE_STORAGE_ENV = "LENSFLOW_TUNE_STORAGE"  # a whole Optuna storage URL, credentials included
HIDDEN = "***"

_PASSWORD = re.compile(
    r"(?P<keep>[A-Za-z][A-Za-z0-9+.\-]*://[^\s/?#@:]*:)"  # scheme://user:
    r"(?P<secret>[^\s/?#]+)"  # up to the last @ before the path (a raw @ in it is hidden too)
    r"(?=@)"
)
_QUERY_SECRET = re.compile(
    r"(?P<keep>[?&;](?:password|passwd|pwd|secret|client_secret|token|access_token|api_key|"
    r"apikey|access_key|secret_access_key|aws_secret_access_key|sig|signature|sas)=)"
    r"(?P<secret>[^&;#\s]+)",
    re.IGNORECASE,
)


def has_credentials(text: str) -> bool:
    return redact(text) != text


def redact(text: str) -> str:
    """`text` with the password of every URL in it, and every secret in a URL query, as ***."""
    text = _PASSWORD.sub(lambda m: m["keep"] + HIDDEN, text)
    return _QUERY_SECRET.sub(lambda m: m["keep"] + HIDDEN, text)
