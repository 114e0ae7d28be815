"""FeedbackTrainer's collaborators (dtp_ext/trainer.py composes them; docs/feedback_trainer.md §10
maps them). One job per module, none imports dtp_ext.trainer:

- settings: the per-block settings' rules and record (BlockSettings), the trainer's bounds;
- selection: which blocks a step trains, in what order, why others are skipped, and the
  per-block settings bound to them (TrainedBlock);
- plans: each block's plan (dtp_ext.alignment), made again when its input shape changes;
- block_loop: one block's fused feedback loop for a step (precision, rank sync, CUDA graphs);
- memory: how many iterations share one batched forward under the memory budget;
- streams: the CUDA streams blocks run on concurrently;
- guard: the divergence guard (a step is kept whole or every block restored);
- history: per block, its steps and its forward weight's versions (warm start, averaging);
- report: FeedbackReport, what a step returns;
- ranks: the torch.distributed calls.
"""
