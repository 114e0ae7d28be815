"""The registered ops and their kernels (CPU, fake) against the autograd reference."""
