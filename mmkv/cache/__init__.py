"""Cache: the compressed cache layers (per-head ragged storage, decode-time eviction, HybridKV's retrieval)."""
