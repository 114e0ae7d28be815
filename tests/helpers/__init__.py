"""What the tests share: block configurations, op arguments, tiny training runs, the GPU gate, paths."""
