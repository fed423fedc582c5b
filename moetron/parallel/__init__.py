"""Parallelism applied to a plain model from outside: mesh, TP, EP, FSDP, pipeline stages."""
