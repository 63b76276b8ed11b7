"""fop: torch.optim optimizers for Fisher-based second-order training over fop_kernels' ops."""

from fop._layers import LayerType, LinearType, register_as_linear, register_layer_type, unregister_layer_type
from fop.adafisher import AdaFisher, AdaFisherW
from fop.fop_optimizer import FOP
from fop.frog import FROG
from fop.kfac import KFAC
from fop.kfrog import KFROG

__all__ = ["FOP", "FROG", "KFAC", "KFROG", "AdaFisher", "AdaFisherW", "LayerType", "LinearType",
           "register_as_linear", "register_layer_type", "unregister_layer_type"]
