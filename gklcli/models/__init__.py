"""Model registry: `create_model(name, num_classes)`, `list_models()`, one module per family."""

# Import order is listing order: adversarial-training models first, then the KD zoo, then ImageNet.
from gklcli.models import wideresnet, dm_wideresnet, resnet_cifar, resnet_kd, vgg, shufflenet, mobilenet, imagenet  # noqa: F401,I001
from gklcli.models import timm_models  # noqa: F401 (timm/NAME: TABLE XIX's BEiTv2-L teacher and ResNet-50 student)
from gklcli.models import vit_small  # noqa: F401,E402,I001  (USB's ViT-S/2, TABLE XXII)
from gklcli.models import pspnet  # noqa: F401,E402,I001  (APD's PSPNet, TABLE XXIII)
from gklcli.models.batchnorm import GhostBatchNorm2d, bn_momentum, use_ghost_batch_norm
from gklcli.models.registry import (
    ModelSpec,
    count_params,
    create_model,
    get_spec,
    list_models,
    normalize_input,
    register,
    register_input_norm,
)

__all__ = [
    "GhostBatchNorm2d",
    "ModelSpec",
    "bn_momentum",
    "count_params",
    "create_model",
    "get_spec",
    "list_models",
    "normalize_input",
    "register",
    "register_input_norm",
    "use_ghost_batch_norm",
]
