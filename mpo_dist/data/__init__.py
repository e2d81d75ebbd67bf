"""Shard sets (pairs, reference log-probs, D_ref: the data contracts between tools and trainer, README
"Shard formats"), their manifests and preparation, and the resumable loaders the trainer streams them with."""
