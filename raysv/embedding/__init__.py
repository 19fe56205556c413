"""Embeddings of utterances: the maths (chunks, equal-length batches, crops) and the Ray actor pool that runs it.

Training (per-epoch dev EER), evaluation, inference and extraction all embed through
:mod:`raysv.embedding.core`, so an utterance gets the same vector wherever it is embedded.
"""
