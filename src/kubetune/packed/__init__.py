"""Packed rows of prepared shards, shared by training and evaluation: rows, collation, the fused loss (computed
by the model's output layer), validation metrics and the per-document attention that keeps packed documents
apart."""

IGNORE = -100  # the label of a token that is not trained on (PyTorch's cross-entropy ignore_index)
