"""Runtime: the session around a model's forward, mmkv.generate, and version shims for transformers."""
