"""Precision: bfloat16 / float16 ops, mixed precision in the trainer, loss scaling, --precision."""
