"""Training side of lora-lab: config checks, data, models, optimizers, the trainer loop, checkpoints, reports.

Modules import torch lazily where they can, so the CLI answers config errors quickly.
"""
