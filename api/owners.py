"""Who owns a record: a digest of the caller's API key, never the key itself.

Its own module because both the routes' dependencies (`api/deps.py`) and the per-key limits in
the middleware (`api/limits.py`) name owners, and neither should import the other for it.
"""

from __future__ import annotations

import hashlib


def owner_id(api_key: str) -> str:
    """The owner id records store for `api_key` ('' is the open API's owner)."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:24]
