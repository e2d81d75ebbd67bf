"""Shards, their manifests, and the streaming loader: see SPEC.md's data contracts."""
