"""Model registry: `create_model(name, num_classes)`, `list_models()`, one module per family."""

# Import order is listing order: adversarial-training models first, then the KD zoo, then ImageNet.
from gklcli.models import wideresnet, dm_wideresnet, resnet_cifar, resnet_kd, vgg, shufflenet, mobilenet, imagenet  # noqa: F401,I001
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
    "ModelSpec",
    "count_params",
    "create_model",
    "get_spec",
    "list_models",
    "normalize_input",
    "register",
    "register_input_norm",
]
