"""Learner: chunked logprobs over the vocabulary (`logprobs.py`, pure torch)."""
