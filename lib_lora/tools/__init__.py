"""Offline LoRA tools: resize, merge, bake, extract, convert (one module each).

Shared pieces: ``common`` (named errors, output rules, dtypes), ``progress`` (terminal bar),
``layout`` (a model's layers with their file keys and diffusers names), ``deltas`` (exact
per-layer deltas of any adapter), ``svd`` (low-rank factorisation and rank choice, GPU when
available), ``stream`` (a safetensors writer that takes one tensor at a time).  Surfaces:
``options`` (each tool's options, declared once), ``cli`` (the sub-commands made from them),
``jobs`` (background jobs for the API and the tab) and ``ui`` (the tab's Tools section).
"""
