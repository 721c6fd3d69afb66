"""The registry's models against the code they must match: RobustBench's own classes, AutoAttack's
example checkpoint, mdistiller's CIFAR zoo and torchvision."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest
import torch

from gklcli.compat import import_robustbench
from gklcli.errors import GKLError
from gklcli.models import count_params, create_model, get_spec, list_models
from gklcli.models.registry import MDISTILLER_CIFAR100_STATS

IMAGENET_NAMES = {"resnet18", "resnet34", "resnet50", "mobilenetv1"}
# parameter counts only: a forward pass is slow on 2 cores (the BEiT-L teachers: 304M parameters at 224²)
HEAVY = {"wrn-70-16-swish", "wrn-34-20", "timm/beitv2_large_patch16_224", "timm/beit_large_patch16_224"}


def _randomise(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Random weights *and* BN statistics, so eval-mode logits test every buffer."""
    g = torch.Generator().manual_seed(0)
    sd = model.state_dict()
    for key, tensor in sd.items():
        if tensor.is_floating_point():
            noise = torch.randn(tensor.shape, generator=g) * 0.05
            tensor.copy_(noise.abs() + 0.5 if key.endswith("running_var") else noise)
    return sd


def _fingerprint(sd: dict[str, torch.Tensor]) -> str:
    text = ";".join(f"{k}:{tuple(v.shape)}" for k, v in sd.items())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@pytest.mark.parametrize("name", [n for n in list_models() if n not in HEAVY and get_spec(n).family != "segmentation"])
def test_every_model_builds_and_maps_images_to_logits(name):  # (segmentation models map to C×H×W: tests/test_seg.py)
    size = 224 if name in IMAGENET_NAMES else 32
    model = create_model(name, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, size, size))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    assert count_params(name, 7) == sum(p.numel() for p in model.parameters())
    assert not any(k in ("mean", "std") for k in model.state_dict())  # normalisation is not state


def test_heavy_models_parameter_counts():
    # RobustBench's DMWideResNet-70-16 (Gowal/Rebuffi), and WRN-34-20 of the TRADES family
    assert count_params("wrn-70-16-swish", 10) == 266_796_506
    assert count_params("wrn-34-20", 10) == 184_531_674
    assert count_params("timm/beitv2_large_patch16_224", 1000) == 304_430_568  # timm's 304.43M (results-imagenet.csv)


ROBUSTBENCH_CASES = {
    "wrn-34-10": (10, "wide_resnet", lambda m, c: m.WideResNet(depth=34, widen_factor=10, num_classes=c, sub_block1=False)),
    "wrn-28-10": (100, "wide_resnet", lambda m, c: m.WideResNet(depth=28, widen_factor=10, num_classes=c)),
    "wrn-28-10-swish": (
        100,
        "dm_wide_resnet",
        lambda m, c: m.DMWideResNet(c, 28, 10, torch.nn.SiLU, m.CIFAR100_MEAN, m.CIFAR100_STD),
    ),
    "resnet-18": (10, "resnet", lambda m, c: m.ResNet18()),
    "preact-resnet-18": (10, "resnet", lambda m, c: m.PreActResNet(m.PreActBlock, [2, 2, 2, 2], bn_before_fc=True, out_shortcut=True)),
}


@pytest.mark.parametrize("name", list(ROBUSTBENCH_CASES))
def test_state_dict_loads_strict_into_robustbench_class_with_equal_logits(name):
    num_classes, module, build = ROBUSTBENCH_CASES[name]
    import_robustbench()
    rb = importlib.import_module(f"robustbench.model_zoo.architectures.{module}")
    ours = create_model(name, num_classes)
    sd = _randomise(ours)
    theirs = build(rb, num_classes)
    theirs.load_state_dict(sd, strict=True)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ours.eval(), theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


def test_cui2023_wrn_34_10_zoo_entry_loads_our_weights():
    """The exact zoo entry `Cui2023Decoupled_WRN-34-10` (CIFAR-100) accepts a plain state dict of ours."""
    rb = import_robustbench()
    from robustbench.model_zoo.cifar100 import cifar_100_models
    from robustbench.model_zoo.enums import ThreatModel

    entry = cifar_100_models[ThreatModel.Linf]["Cui2023Decoupled_WRN-34-10"]
    zoo_model = entry["model"]()
    zoo_model.load_state_dict(create_model("wrn-34-10", 100).state_dict(), strict=True)
    assert rb is not None


def _import_file(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_autoattack_example_checkpoint_loads_into_resnet18_with_equal_logits():
    """pyautoattack ships AutoAttack's example model (`examples/model_test.pt`, a real CIFAR-10 ResNet-18)."""
    import pyautoattack

    examples = Path(pyautoattack.__file__).parent / "examples"
    sd = torch.load(examples / "model_test.pt", map_location="cpu", weights_only=True)
    ours = create_model("resnet-18", 10)
    ours.load_state_dict(sd, strict=True)
    theirs = _import_file(examples / "resnet.py", "aa_example_resnet").ResNet18()
    theirs.load_state_dict(sd, strict=True)
    ours.eval(), theirs.eval()
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


# (number of state-dict entries, parameter count, sha256[:16] of "key:shape;..." in order) of
# mdistiller's CIFAR-100 models (megvii-research/mdistiller, mdistiller/models/cifar, 100 classes),
# recorded by building mdistiller's classes and hashing their state dicts. Equal fingerprints mean
# mdistiller's released `{"model": state_dict}` teachers load `strict=True` into ours.
MDISTILLER = {
    "resnet8": (56, 83892, "eec123cffead889d"),
    "resnet14": (92, 181108, "b671d2c42cef460b"),
    "resnet20": (128, 278324, "e480ef445ab85de5"),
    "resnet32": (200, 472756, "716a10c3e306cb9b"),
    "resnet44": (272, 667188, "0ea6f5caec17075f"),
    "resnet56": (344, 861620, "d4fcbd5d057cb214"),
    "resnet110": (668, 1736564, "daa718d52ef69745"),
    "resnet8x4": (62, 1233540, "8135fcd31bd66896"),
    "resnet32x4": (206, 7433860, "685f596181ef34e8"),
    "resnet50-cifar": (320, 23705252, "d995be9cd6ba6cf7"),
    "wrn-16-1": (82, 180916, "3a1556399e4031e9"),
    "wrn-16-2": (83, 703284, "5af6aa9e7ef23f35"),
    "wrn-40-1": (226, 569780, "878f52387f93459c"),
    "wrn-40-2": (227, 2255156, "f074c18001055d3e"),
    "vgg8": (37, 3965028, "38970949c714781f"),
    "vgg11": (58, 9277284, "c07b7303493cdd87"),
    "vgg13": (72, 9462180, "eb9f56f5fa1be1b5"),
    "vgg16": (93, 14774436, "701437b739103735"),
    "vgg19": (114, 20086692, "384a4cdf0dfa75b6"),
    "mobilenetv2": (320, 812836, "dc5f751da70599bb"),
    "shufflenetv1": (296, 949258, "c21b32ee346e9700"),
    "shufflenetv2": (338, 1355528, "4a894fed324fb11e"),
}


@pytest.mark.parametrize("name", list(MDISTILLER))
def test_kd_zoo_state_dicts_match_mdistiller(name):
    n_keys, n_params, fingerprint = MDISTILLER[name]
    sd = create_model(name, 100).state_dict()
    assert (len(sd), count_params(name, 100), _fingerprint(sd)) == (n_keys, n_params, fingerprint)


def test_mdistiller_format_teacher_file_loads_strict_and_normalises_inside(tmp_path):
    teacher = create_model("resnet32x4", 100)
    sd = _randomise(teacher)
    torch.save({"model": sd, "epoch": 240, "best_acc": 79.42}, tmp_path / "ckpt_epoch_240.pth")
    loaded = torch.load(tmp_path / "ckpt_epoch_240.pth", map_location="cpu", weights_only=True)
    student_view = create_model("resnet32x4", 100)
    student_view.load_state_dict(loaded["model"], strict=True)
    student_view.eval()
    # the same network fed externally normalised inputs, as mdistiller's data pipeline does
    external = create_model("resnet32x4", 100, stats=None)
    external.load_state_dict(loaded["model"], strict=True)
    external.eval()
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in MDISTILLER_CIFAR100_STATS)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(student_view(x), external((x - mean) / std))


@pytest.mark.parametrize("name, tv_name", [("resnet18", "resnet18"), ("resnet50", "resnet50"), ("resnet101", "resnet101"), ("resnext50-32x4d", "resnext50_32x4d")])
def test_torchvision_imagenet_weights_load_strict(name, tv_name):
    import torchvision

    tv = getattr(torchvision.models, tv_name)(weights=None)
    sd = _randomise(tv)
    ours = create_model(name, 1000)
    ours.load_state_dict(sd, strict=True)
    ours.eval(), tv.eval()
    x = torch.rand(2, 3, 64, 64)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv((x - mean) / std), rtol=1e-4, atol=1e-5)


def test_swish_models_pick_cifar100_statistics_for_100_classes():
    m10, m100 = create_model("wrn-28-10-swish", 10), create_model("wrn-28-10-swish", 100)
    assert m10.mean.flatten().tolist() == pytest.approx([0.4914, 0.4822, 0.4465])
    assert m100.mean.flatten().tolist() == pytest.approx([0.5071, 0.4865, 0.4409])
    assert m100.std.flatten().tolist() == pytest.approx([0.2673, 0.2564, 0.2762])


def test_names_aliases_and_errors():
    assert get_spec("wrn_40_2").name == "wrn-40-2"
    assert get_spec("MobileNetV2").name == "mobilenetv2"
    assert get_spec("ShuffleV1").name == "shufflenetv1"
    with pytest.raises(GKLError, match="did you mean wrn-34-10"):
        get_spec("wrn-34-1O")
    with pytest.raises(GKLError, match="num_classes"):
        create_model("resnet20", 1)
    with pytest.raises(GKLError, match="bad keyword"):
        create_model("resnet20", 10, depth=3)
    assert list_models("imagenet") == ["mobilenetv1", "resnet18", "resnet34", "resnet50", "resnet101", "resnext50-32x4d", "resnext101-32x4d"]
