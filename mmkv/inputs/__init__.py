"""Inputs: media loading (images, video frames), the prompt builder, budgets, and each token's modality."""
