"""The tools that make shard sets, one module each, and the job runner they share (job.py):
prepare.py (pairs from raw records), score.py (reference log-probs of pairs), sample.py (D_ref
samples from the reference model) and import_dref.py (D_ref from samples made elsewhere)."""
