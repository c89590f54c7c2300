"""cppo_rl: distributed RLVR training for LLMs with the CPPO trust-region mask.

Importing the package is cheap: heavy dependencies (Ray, vLLM, DeepSpeed) load only in the
modules of the roles that use them.
"""

__version__ = "0.1.0"
