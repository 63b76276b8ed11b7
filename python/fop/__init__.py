"""fop: torch.optim optimizers for Fisher-based second-order training over fop_kernels' ops."""

from fop.fop_optimizer import FOP
from fop.kfac import KFAC

__all__ = ["FOP", "KFAC"]
