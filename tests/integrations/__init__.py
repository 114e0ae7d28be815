"""Optional integrations: lightning, TensorBoard, torchvision."""
