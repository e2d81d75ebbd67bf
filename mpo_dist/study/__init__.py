"""The reward/KL frontier study (tools/study_frontier.py): its synthetic story task and reward, and
the sweep's reading and plotting. Nothing in training imports this package."""
