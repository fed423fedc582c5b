"""Quantized weight formats (GGML's block layouts) for serving."""
