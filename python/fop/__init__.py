"""fop: torch.optim optimizers for Fisher-based second-order training over fop_kernels' ops."""
