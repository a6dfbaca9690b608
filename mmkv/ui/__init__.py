"""The app's logic without Gradio: model choice, input checks, runs, Compare agreement, Inspect views.

``mmkv/app.py`` (the Gradio layer) only lays out components and forwards events here; every function
raises :class:`UserError` with a message saying what to do when the user can fix the problem.
"""

from .config import Limits, default_model
from .errors import UserError

__all__ = ["Limits", "UserError", "default_model"]
