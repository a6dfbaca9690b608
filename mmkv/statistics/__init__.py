"""Statistics: the attention function mmkv registers and the per-layer statistics methods request."""
