"""Experiments built on the main job: long runs watched from outside (soak)."""
