"""dtp_ext.Linear / Conv2d as torch.nn layers, and dtp_ext.convert."""
