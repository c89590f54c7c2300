"""Rollout: vLLM engines that sample responses with mu's top-K logprobs (`engine.py`), their Ray
actors and the group that shares a batch among them (`worker.py`), and sampling settings
(`sampling.py`). Import the submodules directly; `worker.py` imports Ray.
"""
