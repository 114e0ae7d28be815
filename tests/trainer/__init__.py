"""FeedbackTrainer: block selection, feedback plans, memory, torch.compile."""
