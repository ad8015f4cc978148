"""Fine-tuning: every task trains the whole network. No isolation; it shows forgetting and is the
lower bound of every comparison."""

from .base import Method


class Finetune(Method):
    name = "finetune"
