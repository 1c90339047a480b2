"""Offline pipeline: datasets, tokenizers, the recommender, evaluation and export (torch)."""
import os

# oneDNN keeps up to 1024 compiled primitives by default. Training batches vary in length and in
# target count, so nearly every step adds new shapes; with bf16 on AMX each cached entry carries
# packed buffers, and a Beauty run grew to 8.5 GB and was OOM-killed beside two others. 64 entries
# hold a step's primitives (same step time within noise) and bound the memory. Read lazily by
# oneDNN, so setting it here works even when torch was imported first; an explicit value wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
