"""Figure builders and image/frame overlays that take a Trace (no Gradio imports)."""
