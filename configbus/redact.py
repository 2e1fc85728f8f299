"""Credentials out of text: what configbus logs, prints or puts in an error never
carries a password that rode in a URL.

`without_credentials` masks the password of ``scheme://user:password@host`` and the
values of credential query parameters (``?password=``, ``token=``, ``secret=``,
``key=``, ...), wherever they stand in a text: a Redis URL given as a setting, or a
database URL that a config holds under a key whose name does not look secret.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["MASK", "without_credentials"]

MASK: Final = "***"

_USERINFO: Final = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^\s/@'\"]*)@")
_QUERY: Final = re.compile(
    r"(?P<name>[?&;](?:[a-z_]*(?:password|passwd|pwd|secret|token|key|auth|credential)"
    r"[a-z_]*))=(?P<value>[^&;#\s'\"]*)",
    re.IGNORECASE,
)


def _userinfo(match: re.Match[str]) -> str:
    user, colon, _ = match["userinfo"].partition(":")
    if not colon:  # only a user name, or a token standing alone as the user
        return f"{match['scheme']}{MASK}@" if len(user) > 24 else match[0]
    return f"{match['scheme']}{user}:{MASK}@"


def without_credentials(text: str) -> str:
    """`text` with URL passwords and credential query values replaced by ``***``."""
    if "://" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(_userinfo, text)
    return _QUERY.sub(lambda m: f"{m['name']}={MASK}", text)
