"""Integrations with other evaluation tools (each imports its tool only when used).

- :mod:`mmkv.integrations.lmms_eval`: an lmms-eval model, ``lmms-eval --model mmkv`` (``mmkv[lmms]``).
"""
