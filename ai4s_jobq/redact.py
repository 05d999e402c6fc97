"""Keep secrets out of logs and error messages.

Connection strings and SAS URLs carry keys, Azure AD access tokens are bearer
credentials (a JWT: three base64url parts, the first two starting ``eyJ``); an
exception text from an SDK may echo any of them.  Everything we print about a
failure goes through :func:`redact`.
"""

from __future__ import annotations

import re

_PATTERNS = [
    re.compile(r"(?i)((?:SharedAccessKey|AccountKey|SharedAccessSignature|Password)=)[^;\s\"']+"),
    re.compile(r"(?i)([?&]sig=)[^&\s\"']+"),
    re.compile(r"(?i)(\bsig%3D)[^&\s\"']+"),
    re.compile(r"(?i)(Bearer\s+)[A-Za-z0-9\-_.~+/]+=*"),
    re.compile(r"()\beyJ[A-Za-z0-9_-]+\.eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"),
]


def redact(text: str) -> str:
    for pattern in _PATTERNS:
        text = pattern.sub(lambda match: match.group(1) + "***", text)
    return text
