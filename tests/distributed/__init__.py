"""Several processes: FeedbackTrainer under DDP, and `dtp-ext train` on 2 ranks."""
