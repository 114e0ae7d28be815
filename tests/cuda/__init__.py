"""The CUDA kernels and CUDA graphs; skipped without a GPU, failing with one if the kernels are missing."""
