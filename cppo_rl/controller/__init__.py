"""The controller: the training loop (`trainer.py`) and its metrics sinks (`tracker.py`)."""
