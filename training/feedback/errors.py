"""The feedback store's errors (re-exported by ``store``).

Both are ``ValueError`` subclasses, so the CLI (training/cli.py) prints them as one line and
exits 2. A refused write never touches what is stored: the transaction is rolled back.
"""

from __future__ import annotations


class StoreError(ValueError):
    """A write or read the store refuses; the message names the field and the value."""


class UnknownReference(StoreError):
    """A record refers to a generation or rater the store does not hold."""
