"""Errors the app shows to the user as a message (the app keeps serving)."""

from __future__ import annotations


class UserError(ValueError):
    """Something the user can fix (a bad file, an empty prompt, a budget out of range, ...)."""
