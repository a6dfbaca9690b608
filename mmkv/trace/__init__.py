"""Trace: what a run decided and measured, its decode replay, and run files that carry it."""
