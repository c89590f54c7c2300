"""Weight sync from the learner to the rollout engines: bucket planning and packing (`buckets.py`),
the sync process group (`transport.py`) and the orchestrator with its two transports
(`weight_sync.py`, which imports Ray and both roles)."""
