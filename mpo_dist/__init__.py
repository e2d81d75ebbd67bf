"""mpo_dist: distributed preference optimisation (MPO, DPO, IPO) with FSDP2 and streamed shards."""

__version__ = "0.1.0"
