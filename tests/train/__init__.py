"""`dtp-ext train` and dtp_ext.train: algorithms, runs, resume, checkpoints, data, errors."""
