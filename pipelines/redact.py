"""Credentials out of everything the project shows: `mask_url(url)` hides a URL's password and the
values of secret query arguments.

    mask_url("postgresql://alice:s3cret@db/optuna")       -> "postgresql://alice:***@db/optuna"
    mask_url("https://host/mlflow?access_token=abc&x=1")  -> "https://host/mlflow?access_token=***&x=1"

Every URL that is printed, logged to MLflow (parameters, tags, the run description) or written into
an error message goes through it; the URL itself, password included, is still what connects.
"""
from __future__ import annotations

import re
from urllib.parse import unquote_plus

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

MASK = "***"
# Query arguments whose value is a credential: password=, sslpassword=, pwd=, token=, access_token=,
# api_key=, key=, secret=, client_secret=, auth=, sig= (signed URLs). Masking a harmless one costs nothing.
SECRET_ARGUMENT = re.compile(r"pass|pwd|secret|token|key|auth|credential|sig", re.IGNORECASE)


def mask_url(url: str) -> str:
    """`url` with its password and secret query values shown as ***; returned unchanged when it
    holds neither, or is no URL at all (a journal file path, a plain parameter value)."""
    try:  # SQLAlchemy's parser: database URLs and http(s) tracking URLs share its shape
        parsed = make_url(url)
    except (ArgumentError, ValueError, TypeError):
        return url
    secret = {key for key in parsed.query if SECRET_ARGUMENT.search(key)}
    if parsed.password is None and not secret:
        return url
    if parsed.host and "@" in parsed.host:  # an unescaped @ in the password: HTTP clients split at the last @
        rest, host = parsed.host.rsplit("@", 1)
        parsed = parsed.set(password=f"{parsed.password}@{rest}", host=host)
    # SQLAlchemy hides the password; its query rendering would percent-encode a mask, so those are ours.
    return re.sub(r"([?&])([^=&]+)=[^&]*",
                  lambda arg: f"{arg[1]}{arg[2]}={MASK}" if unquote_plus(arg[2]) in secret else arg[0],
                  parsed.render_as_string(hide_password=True))
