"""Shard sets (pairs, reference log-probs, D_ref: the data contracts between tools and trainer,
docs/data.md), their manifests and preparation, and the resumable loaders the trainer streams them with."""
