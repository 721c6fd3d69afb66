"""Segmentation distillation (kind seg-kd, TABLE XXIII): APD's terms against its official formulas and naive
per-pixel loops, mIoU against a hand-made confusion matrix, sliding windows against a direct forward,
bit-exact resume, ADE20K data checks and the reproduce pipeline."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gklcli.errors import GKLError
from gklcli.losses import LossTerm
from gklcli.recipes import RECIPES_DIR, load_recipe
from gklcli.seg_data import IGNORE, check_labels, write_synthetic_ade20k
from gklcli.seg_eval import confusion, predict, scores
from gklcli.seg_losses import pixel_distillation, prototype_terms
from test_fetch import server  # noqa: F401  (the fixture: files served from 127.0.0.1)
from tests_helpers import run_cli

ROWS = {name: RECIPES_DIR / "seg" / f"{name}.yaml" for name in
        ("ade20k_psp18_baseline", "ade20k_psp101_psp18_apd", "ade20k_psp101_psp18_apd_gkl")}


def settings(**kw):
    base = dict(name="gkl", alpha=5.0, beta=10.0, gamma=0.6, weights="class", weight_temperature=1.0, temperature=1.0,
                normalization="weights", kd_weight=10.0, prior_temperature=4.0)
    return SimpleNamespace(**(base | kw))


def maps(seed, b=2, c=5, h=3, w=4, size=(9, 11)):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, c, h, w, generator=g, requires_grad=True)
    t = torch.randn(b, c, h, w, generator=g) * 2
    y = torch.randint(0, c, (b, *size), generator=g)
    y[:, :2, :3] = IGNORE  # an ignored corner
    return s, t, y


# ------------------------------------------------------------------------------------------- losses


APD_MEAN = pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")  # APD's KLDivLoss() is the reference


@APD_MEAN
def test_pixel_kl_is_apds_kldivloss_mean_times_its_weight():
    """APD's CriterionKD: KLDivLoss() (mean over B·C·H·W) of the upsampled logits, ×T², × kl_weight."""
    s, t, y = maps(0)
    for temperature in (1.0, 2.0):
        term = LossTerm("kd", "seg", settings(name="kd", temperature=temperature), 5)
        ours = pixel_distillation(term, s, t, y, "elements")
        up = lambda x: F.interpolate(x, y.shape[1:], mode="bilinear", align_corners=True)  # noqa: E731
        apd = torch.nn.KLDivLoss()(F.log_softmax(up(s) / temperature, 1), F.softmax(up(t) / temperature, 1)) * temperature**2
        assert torch.allclose(ours, 10.0 * apd, rtol=1e-5, atol=1e-7)
        per_pixel = pixel_distillation(term, s, t, y, "pixels")
        assert torch.allclose(per_pixel, ours * 5, rtol=1e-5)


def naive_pixel_gkl(s, t, y, prior, alpha, beta, gamma, c):
    """GKL over pixels, one pixel at a time: class-wise v = prior[class]^γ (the teacher's class where ignored)."""
    size = y.shape[1:]
    up = lambda x: F.interpolate(x, size, mode="bilinear", align_corners=True)  # noqa: E731
    S, T = up(s), up(t)
    wmse, weight, ce, n = 0.0, 0.0, 0.0, 0
    for b in range(S.shape[0]):
        for i in range(size[0]):
            for j in range(size[1]):
                sp, tp = S[b, :, i, j], T[b, :, i, j]
                k = int(tp.argmax()) if int(y[b, i, j]) == IGNORE else int(y[b, i, j])
                v = prior[k] ** gamma
                ds, dt = sp[:, None] - sp[None, :], tp[:, None] - tp[None, :]
                wmse = wmse + (v[:, None] * v[None, :] * (dt - ds) ** 2).sum()
                weight = weight + (v[:, None] * v[None, :]).sum()
                ce = ce - (F.softmax(tp, 0) * F.log_softmax(sp, 0)).sum()
                n += 1
    return (alpha / 4 * wmse / weight + beta * ce / n) / c


def test_pixel_gkl_with_class_weights_equals_a_loop_over_pixels_with_its_gradient():
    s, t, y = maps(1, size=(6, 7))
    term = LossTerm("gkl", "seg", settings(), 5)
    prior = torch.softmax(torch.randn(5, 5, generator=torch.Generator().manual_seed(3)), 1)
    term.prior.prior = prior.clone()
    ours = pixel_distillation(term, s, t, y, "elements")
    ref = naive_pixel_gkl(s, t, y, prior, 5.0, 10.0, 0.6, 5)
    assert torch.allclose(ours, ref, rtol=1e-4)
    g_ours, = torch.autograd.grad(ours, s)
    g_ref, = torch.autograd.grad(ref, s)
    assert torch.allclose(g_ours, g_ref, rtol=1e-3, atol=1e-6)


def apd_prototypes(pred, soft, target, classes, temp):
    """APD's CriterionKmeansInterWhole written as its code does: a loop over the classes with nonzero(),
    one-hot conv2d weights, KLDivLoss() means (the adapters already applied; kmeans_norm on)."""
    b, c, h, w = soft.shape
    raw_target = target.clone()
    target = F.interpolate(target.unsqueeze(1).float(), size=(h, w), mode="nearest").squeeze(1)
    soft, pred = F.normalize(soft, 2, 1), F.normalize(pred, 2, 1)
    cp, cs, labels = [], [], []
    for cls in target.unique():
        if cls == IGNORE:
            continue
        pos = (target == cls).float().nonzero()
        cp.append(F.normalize(pred[pos[:, 0], :, pos[:, 1], pos[:, 2]].mean(0, keepdim=True), 2, 1))
        cs.append(F.normalize(soft[pos[:, 0], :, pos[:, 1], pos[:, 2]].mean(0, keepdim=True), 2, 1))
        labels.append(torch.ones(1) * cls)
    centers_pred = torch.cat(cp).view(-1, c, 1, 1)
    centers_soft = torch.cat(cs).view(-1, c, 1, 1)
    new_labels = torch.zeros(len(labels), classes).scatter_(1, torch.cat(labels).unsqueeze(1).long(), 1)
    new_labels = new_labels.permute(1, 0).view(classes, len(labels), 1, 1)
    pred_out = F.conv2d(pred, centers_pred) * temp
    soft_out = F.conv2d(soft, centers_soft)
    sum_soft = F.conv2d(soft_out, new_labels) / (new_labels.sum(1).unsqueeze(0) + 1e-12)
    sum_soft = F.interpolate(sum_soft, size=raw_target.shape[1:], mode="bilinear", align_corners=True) * temp
    soft_loss = nn.CrossEntropyLoss(ignore_index=IGNORE)(sum_soft, raw_target.long())
    pred_kl = nn.KLDivLoss()(F.log_softmax(pred_out, 1), F.softmax(soft_out.detach() * temp, 1))
    align = 0.5 * (1 - (centers_pred.flatten(1) * centers_soft.flatten(1).detach()).sum(1)).mean()
    return pred_kl, soft_loss, align


@APD_MEAN
def test_prototype_terms_equal_apds_code_with_their_gradients():
    g = torch.Generator().manual_seed(4)
    student = torch.randn(2, 6, 5, 5, generator=g, requires_grad=True)
    teacher = torch.randn(2, 6, 5, 5, generator=g, requires_grad=True)  # through the teacher adapter: it has gradient
    labels = torch.tensor([1, 3, 5])[torch.randint(0, 3, (2, 33, 33), generator=g)]  # classes 1, 3, 5: not 0…K−1
    labels[0, :10] = IGNORE
    ours = prototype_terms(student, teacher, labels, num_classes=7, temperature=10.0)
    ref = apd_prototypes(student, teacher, labels, 7, 10.0)
    for a, b in zip((ours.student_kl, ours.teacher_ce, ours.align), ref):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    assert ours.classes == 3
    for a, b in ((ours.student_kl + ours.align, ref[0] + ref[2]), (ours.teacher_ce, ref[1])):
        ga = torch.autograd.grad(a, (student, teacher), allow_unused=True)
        gb = torch.autograd.grad(b, (student, teacher), allow_unused=True)
        for x, y in zip(ga, gb):
            assert (x is None) == (y is None) or float((x if x is not None else y).abs().max()) == 0
            if x is not None and y is not None:
                assert torch.allclose(x, y, rtol=1e-4, atol=1e-7)
    # the student terms never reach the teacher's features, the teacher's CE never the student's
    assert torch.autograd.grad(ours.student_kl + ours.align, teacher, allow_unused=True)[0] is None
    empty = prototype_terms(student, teacher, torch.full_like(labels, IGNORE), num_classes=7, temperature=10.0)
    assert empty.classes == 0 and float(empty.student_kl.detach()) == 0


def test_pixel_gkl_memory_is_linear_in_pixels():
    """Pixels as samples: the wMSE never allocates pixels × C × C (Algorithm 2)."""
    s, t, y = maps(2, b=1, c=150, h=8, w=8, size=(64, 64))
    term = LossTerm("gkl", "seg", settings(weights="sample"), 150)
    pixels_c_c = 64 * 64 * 150 * 150 * 4
    largest = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: (largest.append(x.numel() * x.element_size()), x)[1], lambda x: x):
        loss = pixel_distillation(term, s, t, y, "elements")
    loss.backward()
    assert max(largest) < pixels_c_c / 100


# ------------------------------------------------------------------------------------------- evaluation


def test_miou_from_a_hand_made_confusion_matrix_with_ignored_pixels():
    labels = torch.tensor([[0, 0, 1, 1], [2, 2, IGNORE, IGNORE]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    m = confusion(pred, labels, 4)
    expected = torch.zeros(4, 4, dtype=torch.long)
    for (a, b), n in {(0, 0): 1, (0, 1): 1, (1, 1): 2, (2, 2): 1, (2, 0): 1}.items():
        expected[a, b] = n
    assert torch.equal(m, expected)
    result = scores(m)
    # IoU: class 0 = 1/(2+2−1), class 1 = 2/(2+3−2), class 2 = 1/(2+1−1); class 3 absent from both: no IoU
    assert result["miou"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert result["pixel_acc"] == pytest.approx(100 * 4 / 6) and result["classes"] == 3


class PerPixel(nn.Module):
    """A 1×1 convolution: its output at a pixel depends on that pixel alone, so windows and padding cannot change it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("shape", [(37, 50), (20, 15)])
def test_sliding_windows_with_flip_equal_a_direct_forward(shape):
    torch.manual_seed(0)
    model = PerPixel().eval()
    image = torch.rand(1, 3, *shape)
    cfg = SimpleNamespace(eval_scales=[1.0], base_size=max(shape), eval_mode="sliding", crop_size=17, stride_rate=2 / 3,
                          eval_flip=True)
    with torch.no_grad():
        direct = model(image)[0].argmax(0)
        sliding = predict(model, image, cfg)
        cfg.eval_mode = "whole"
        whole = predict(model, image, cfg)
    assert torch.equal(sliding, direct) and torch.equal(whole, direct)


def apd_scale_process(model, image, classes, crop, stride_rate, mean):
    """APD's tool/test.py `scale_process` + `net_process(flip=True)` on an H×W×3 array, as its code reads
    (cv2's copyMakeBorder / resize replaced by numpy padding and torch's bilinear resize)."""
    ori_h, ori_w, _ = image.shape
    pad_h, pad_w = max(crop - ori_h, 0), max(crop - ori_w, 0)
    ph, pw = int(pad_h / 2), int(pad_w / 2)
    if pad_h > 0 or pad_w > 0:
        image = np.pad(image - mean, ((ph, pad_h - ph), (pw, pad_w - pw), (0, 0))) + mean
    new_h, new_w, _ = image.shape
    stride_h = stride_w = int(np.ceil(crop * stride_rate))
    grid_h = int(np.ceil(float(new_h - crop) / stride_h) + 1)
    grid_w = int(np.ceil(float(new_w - crop) / stride_w) + 1)
    prediction = np.zeros((new_h, new_w, classes))
    count = np.zeros((new_h, new_w))
    for index_h in range(grid_h):
        for index_w in range(grid_w):
            s_h = index_h * stride_h
            e_h = min(s_h + crop, new_h)
            s_h = e_h - crop
            s_w = index_w * stride_w
            e_w = min(s_w + crop, new_w)
            s_w = e_w - crop
            x = torch.from_numpy(image[s_h:e_h, s_w:e_w].transpose(2, 0, 1).copy()).float()[None]
            with torch.no_grad():
                out = F.softmax(model(torch.cat([x, x.flip(3)])), 1)
            out = ((out[0] + out[1].flip(2)) / 2).numpy().transpose(1, 2, 0)
            count[s_h:e_h, s_w:e_w] += 1
            prediction[s_h:e_h, s_w:e_w, :] += out
    prediction /= np.expand_dims(count, 2)
    return prediction[ph:ph + ori_h, pw:pw + ori_w]


def test_sliding_inference_equals_apds_scale_process_with_a_spatial_model():
    from gklcli.seg_data import MEAN_RGB

    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 5, 3, padding=1)).eval()
    mean = np.array(MEAN_RGB)
    for h, w, base in ((30, 45, 40), (20, 14, 24)):
        image = torch.rand(1, 3, h, w)
        cfg = SimpleNamespace(eval_scales=[1.0], base_size=base, eval_mode="sliding", crop_size=17, stride_rate=2 / 3, eval_flip=True)
        with torch.no_grad():
            ours = predict(model, image, cfg)
        long = base
        nh, nw = (long, round(long / h * w)) if h > w else (round(long / w * h), long)
        resized = F.interpolate(image, (nh, nw), mode="bilinear", align_corners=False)[0].numpy().transpose(1, 2, 0)
        scores_ = torch.from_numpy(apd_scale_process(model, resized.astype(np.float64), 5, 17, 2 / 3, mean)).permute(2, 0, 1)[None]
        ref = F.interpolate(scores_.float(), (h, w), mode="bilinear", align_corners=False)[0].argmax(0)
        agree = float((ours == ref).float().mean())
        assert agree > 0.999, agree


# ------------------------------------------------------------------------------------------- models


def test_apd_release_and_csail_backbone_files_load(tmp_path):
    from gklcli.models import create_model
    from gklcli.models.pspnet import STEM_KEYS
    from gklcli.train.seg import load_backbone, load_seg_teacher

    donor = create_model("pspnet-tiny", 8)
    release = {"state_dict": {f"module.{k}": v for k, v in donor.state_dict().items() if not k.startswith("aux.")},
               "epoch": 100, "optimizer": {}}
    torch.save(release, tmp_path / "pspnet_tiny_release.pth")
    recipe = SimpleNamespace(teacher=SimpleNamespace(arch="pspnet-tiny", checkpoint=str(tmp_path / "pspnet_tiny_release.pth")))
    teacher = load_seg_teacher(recipe, 8, torch.device("cpu"), None)
    assert torch.equal(teacher.cls[0].weight, donor.cls[0].weight) and not teacher.training
    from safetensors.torch import save_file

    save_file(donor.state_dict(), tmp_path / "teacher.safetensors")  # the Hub's format, read by gkl's own loader
    recipe.teacher.checkpoint = str(tmp_path / "teacher.safetensors")
    assert torch.equal(load_seg_teacher(recipe, 8, torch.device("cpu"), None).ppm.merge[0].weight, donor.ppm.merge[0].weight)
    inverse = {v: k for k, v in STEM_KEYS.items()}
    csail = {}
    for k, v in donor.state_dict().items():
        head, index, rest = k.partition(".")[0], k.split(".")[1], ".".join(k.split(".")[2:])
        if head == "layer0":
            csail[f"module.{inverse[f'layer0.{index}']}.{rest}"] = v
        elif head.startswith("layer"):
            csail[f"module.{k}"] = v
    csail = {k: v for k, v in csail.items() if not k.endswith("num_batches_tracked")}  # files saved before PyTorch 0.4.1
    csail["module.fc.weight"] = torch.zeros(1000, 64)
    torch.save(csail, tmp_path / "resnet-imagenet.pth")
    fresh = create_model("pspnet-tiny", 8)
    load_backbone(fresh, tmp_path / "resnet-imagenet.pth")
    assert torch.equal(fresh.layer0[3].weight, donor.layer0[3].weight) and torch.equal(fresh.layer4[0].conv1.weight, donor.layer4[0].conv1.weight)
    del csail["module.layer2.0.conv1.weight"]
    torch.save(csail, tmp_path / "broken.pth")
    with pytest.raises(GKLError, match="missing layer2.0.conv1.weight"):
        load_backbone(fresh, tmp_path / "broken.pth")


# key names of APD's PSPNet state dicts (model/pspnet.py: layer0 = conv1, bn1, relu, conv2, bn2, relu, conv3, bn3,
# relu, maxpool; PPM features i = pool, conv, bn, relu; merge = conv, bn, relu, dropout; cls.0; aux = conv, bn,
# relu, dropout, conv), written out here rather than taken from gkl's model
APD_KEYS = ["layer0.0.weight", "layer0.1.running_mean", "layer0.3.weight", "layer0.4.bias", "layer0.6.weight", "layer0.7.weight",
            "layer1.0.conv1.weight", "layer1.0.downsample.0.weight", "layer1.0.downsample.1.running_var", "layer4.1.bn2.weight",
            "ppm.features.0.1.weight", "ppm.features.3.2.running_var", "ppm.merge.0.weight", "ppm.merge.1.bias", "cls.0.weight",
            "cls.0.bias", "aux.0.weight", "aux.1.running_mean", "aux.4.weight", "aux.4.bias"]


def test_pspnet_r18_layout_is_apds():
    from gklcli.models import create_model

    m = create_model("pspnet-r18", 150)
    assert set(APD_KEYS) <= set(m.state_dict())
    assert not any(k.startswith(("conv1", "bn1", "fc", "layer0.2", "layer0.9")) for k in m.state_dict())
    assert m.layer0[0].out_channels == 64 and m.layer0[6].out_channels == 128  # deep stem 64, 64, 128
    assert m.layer3[0].conv1.dilation == (2, 2) and m.layer3[0].conv2.dilation == (1, 1)  # APD's key_conv 'conv1'
    assert m.layer4[1].conv1.dilation == (4, 4) and m.layer4[0].downsample[0].stride == (1, 1)
    assert m.ppm.merge[0].in_channels == 1024 and m.ppm.merge[0].out_channels == 512 and m.aux[0].in_channels == 256
    r101 = create_model("pspnet-r101", 150)
    assert r101.layer3[5].conv2.dilation == (2, 2) and r101.ppm.merge[0].in_channels == 4096
    m.train()
    out = m(torch.rand(1, 3, 65, 65).repeat(2, 1, 1, 1))
    assert out.logits.shape == (2, 150, 9, 9) and out.features.shape == (2, 512, 9, 9)


def test_poly_schedule_and_head_lr():
    from gklcli.models import create_model
    from gklcli.train.build import make_optimizer
    from gklcli.train.schedule import learning_rate

    r = load_recipe(ROWS["ade20k_psp101_psp18_apd"], ["schedule.epochs=2"])
    spe = 10
    assert learning_rate(r.optim, r.schedule, 1, 0, spe) == 0.005  # APD: the first step at base_lr
    assert learning_rate(r.optim, r.schedule, 2, 3, spe) == pytest.approx(0.005 * (1 - 13 / 20) ** 0.9)
    module = create_model("pspnet-tiny", 8, adapter_dim=4)
    opt = make_optimizer(module, r.optim)
    heads = {id(p) for n in ("ppm", "cls", "aux", "kd_adapter") for p in getattr(module, n).parameters()}
    for group in opt.param_groups:
        assert group.get("lr_scale", 1.0) == (10.0 if id(group["params"][0]) in heads else 1.0)
        assert all((id(p) in heads) == (group.get("lr_scale") == 10.0) for p in group["params"])
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(module.parameters()))


# ------------------------------------------------------------------------------------------- data


def test_blur_is_opencvs_sigma_zero_kernel_and_empty_crops_take_another_image(tmp_path):
    from gklcli.seg_data import SegTrainView, blur5, open_split
    from gklcli.train.seg import labelled_ce

    delta = torch.zeros(3, 9, 9)
    delta[:, 4, 4] = 1.0
    taps = torch.tensor([1.0, 4, 6, 4, 1]) / 16
    assert torch.allclose(blur5(delta)[0, 2:7, 2:7], taps[:, None] * taps[None, :])
    root = tmp_path / "ade"
    write_synthetic_ade20k(root, num_train=3, num_val=1, size=24, num_classes=6)
    from PIL import Image

    masks = sorted((root / "ADEChallengeData2016" / "annotations" / "training").iterdir())
    Image.fromarray(np.zeros_like(np.asarray(Image.open(masks[0])))).save(masks[0])  # all "other": nothing labelled
    cfg = load_recipe(ROWS["ade20k_psp18_baseline"], _tiny(root)).seg
    view = SegTrainView(open_split(cfg, root, "train", 6), cfg, seed=0)
    for epoch in range(1, 6):
        _, mask = view[(epoch, 0)]
        assert bool((mask != IGNORE).any()) and mask.shape == (17, 17)
    assert float(labelled_ce(torch.randn(1, 6, 4, 4), torch.full((1, 4, 4), IGNORE))) == 0.0


def test_mask_values_are_checked_and_mapped():
    with pytest.raises(GKLError, match=r"seg.crop_size: must be 8k \+ 1"):
        load_recipe(ROWS["ade20k_psp18_baseline"], ["seg.crop_size=32"])
    raw = torch.tensor([[0, 1, 150]])
    assert check_labels(raw, 150, True, "m.png").tolist() == [[IGNORE, 0, 149]]
    with pytest.raises(GKLError, match=r"m.png: mask values \[151\] outside 0–150"):
        check_labels(torch.tensor([[151]]), 150, True, "m.png")
    assert check_labels(torch.tensor([[149, IGNORE]]), 150, False, "m.png").tolist() == [[149, IGNORE]]
    with pytest.raises(GKLError, match=r"outside 0–149 and the ignore value 255"):
        check_labels(torch.tensor([[150]]), 150, False, "m.png")


def _tiny(root: Path, *extra: str) -> list[str]:
    sets = [f"data.root={root}", "data.batch_size=2", "data.num_workers=0", "model.arch=pspnet-tiny", "model.pretrained=null",
            "model.sync_bn=false", "seg.num_classes=6", "seg.crop_size=17", "seg.base_size=24", "seg.adapter_dim=8",
            "teacher.arch=pspnet-tiny", "schedule.epochs=2", "train.max_steps_per_epoch=3", "eval.every_epochs=1", "eval.n_val=2",
            "eval.n_test=3", "output.tensorboard=false", "output.plots=false", *extra]
    return sets


@pytest.fixture(scope="module")
def ade(tmp_path_factory):
    root = tmp_path_factory.mktemp("ade")
    write_synthetic_ade20k(root, num_train=8, num_val=3, size=24, num_classes=6)
    return root


@pytest.fixture(scope="module")
def teacher_file(ade, tmp_path_factory):
    from gklcli.models import create_model

    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    torch.manual_seed(5)
    torch.save({"state_dict": create_model("pspnet-tiny", 6).state_dict()}, path)
    return path


def test_data_errors_are_one_line_through_the_cli(capsys, tmp_path, ade, teacher_file):
    row = ROWS["ade20k_psp101_psp18_apd_gkl"]
    sets = lambda *x: sum((["--set", s] for s in _tiny(ade, *x)), [])  # noqa: E731
    code, _, err = run_cli(capsys, "distill", row, *sets(f"teacher.checkpoint={teacher_file}", f"data.root={tmp_path / 'none'}"),
                           "--out", tmp_path / "a")
    assert code == 2 and "no ADE20K under" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "distill", row, *sets(f"teacher.checkpoint={teacher_file}", "model.pretrained=init/resnet18-imagenet.pth"),
                           "--out", tmp_path / "b")
    assert code == 2 and "model.pretrained: init/resnet18-imagenet.pth not found" in err and "resnet18-imagenet.pth" in err
    bad = tmp_path / "bad"
    write_synthetic_ade20k(bad, num_train=2, num_val=1, size=24, num_classes=6)
    mask = next((bad / "ADEChallengeData2016" / "annotations" / "training").iterdir())
    from PIL import Image

    values = np.asarray(Image.open(mask)).copy()
    values[0, 0] = 200
    Image.fromarray(values).save(mask)
    code, _, err = run_cli(capsys, "distill", row, *sets(f"teacher.checkpoint={teacher_file}", f"data.root={bad}",
                                                         "seg.scale_range=[1.0,1.0]", "seg.crop_size=33"), "--out", tmp_path / "c")
    assert code == 2 and f"{mask}: mask values [200] outside 0–6" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "distill", row, *sets(f"teacher.checkpoint={tmp_path / 'nowhere.pth'}"), "--out", tmp_path / "d")
    assert code == 2 and "teacher.checkpoint" in err and "nowhere.pth not found" in err


# ------------------------------------------------------------------------------------------- training


def test_apd_gkl_trains_and_resumes_bit_exactly(tmp_path, ade, teacher_file):
    from gklcli.train.seg import train_seg
    from gklcli.train.engine import Interrupted

    r = load_recipe(ROWS["ade20k_psp101_psp18_apd_gkl"], _tiny(ade, f"teacher.checkpoint={teacher_file}"))
    whole = train_seg(r, out_dir=tmp_path / "a", quiet=True, device="cpu")
    with pytest.raises(Interrupted):
        train_seg(r, out_dir=tmp_path / "b", quiet=True, device="cpu", interrupt_after_steps=4)  # mid-epoch 2
    resumed = train_seg(r, out_dir=tmp_path / "b", quiet=True, device="cpu", resume=True)
    a, b = (torch.load(tmp_path / x / "last.pt", weights_only=True) for x in "ab")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    step_a, step_b = a["train_state"]["step"], b["train_state"]["step"]
    for k in step_a["teacher_adapter"]:
        assert torch.equal(step_a["teacher_adapter"][k], step_b["teacher_adapter"][k])
    assert torch.equal(step_a["term"]["prior"]["prior"], step_b["term"]["prior"]["prior"])
    assert whole["last"]["test_miou"] == resumed["last"]["test_miou"]
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert {"train_kd", "train_proto_kl", "train_proto_align", "train_teacher_ce", "val_miou"} <= set(records[-1])
    assert "kd_adapter.0.weight" in a["model"] and a["model_kwargs"] == {"adapter_dim": 8}
    adam = step_a["teacher_optim"]
    assert all(float(st["step"]) == 6 for st in adam["state"].values())  # one teacher-adapter step per training step
    assert adam["param_groups"][0]["lr"] == 1e-5  # constant, as APD's (its poly update never runs)
    # the prior is the teacher's per-class mean softmax over its labelled output pixels (the mask by nearest)
    prior = step_a["term"]["prior"]["prior"]
    assert torch.allclose(prior.sum(1), torch.ones(6)) and not torch.allclose(prior, torch.full_like(prior, 1 / 6))


def test_the_class_prior_is_the_teachers_mean_prediction_per_labelled_class():
    from gklcli.seg_losses import nearest_labels, pixels
    from gklcli.train.seg import SegStep

    g = torch.Generator().manual_seed(9)
    teacher = SimpleNamespace(logits=torch.randn(2, 4, 5, 5, generator=g), features=None)
    out = SimpleNamespace(logits=torch.randn(2, 4, 5, 5, generator=g, requires_grad=True), adapted=None)
    labels = torch.randint(0, 4, (2, 33, 33), generator=g)
    labels[:, :8] = IGNORE
    step = SegStep.__new__(SegStep)
    step.ctx = SimpleNamespace(num_classes=4)
    step.seg = SimpleNamespace(kd_reduction="elements")
    step.term = LossTerm("gkl", "seg", settings(), 4)
    step.teacher_adapter = None
    step._distill(out, teacher, labels, {})
    step.term.end_epoch()
    small = nearest_labels(labels, (5, 5)).reshape(-1)
    probs = F.softmax(pixels(teacher.logits), 1)
    for k in range(4):
        rows = probs[small == k]
        expected = rows.mean(0) if len(rows) else torch.full((4,), 0.25)
        assert torch.allclose(step.term.prior.prior[k], expected, atol=1e-6)


def test_the_student_learns_the_scenes(tmp_path, ade):
    from gklcli.train.seg import train_seg

    r = load_recipe(ROWS["ade20k_psp18_baseline"], _tiny(ade, "schedule.epochs=6", "train.max_steps_per_epoch=4", "optim.lr=0.05",
                                                        "seg.scale_range=[1.0,1.0]", "seg.crop_size=25", "eval.every_epochs=6"))
    train_seg(r, out_dir=tmp_path / "run", quiet=True, device="cpu")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["train_main"] < 0.7 * records[0]["train_main"]


def test_reproduce_table23_smoke_fills_every_cell(capsys, tmp_path):
    code, text, _ = run_cli(capsys, "reproduce", "table23", "--smoke", "--out", tmp_path)
    assert code == 0
    report = json.loads((tmp_path / "smoke" / "table23.json").read_text())
    cells = [c for row in report["tables"][0]["rows"] for c in row["cells"] if c["metric"]]
    filled = [c for c in cells if c["values"] and c["values"][0] is not None]
    assert len(filled) == 5 and all(0 <= c["values"][0] <= 100 for c in filled)
    code, text, _ = run_cli(capsys, "reproduce", "table23", "--dry-run")
    flat = " ".join(text.split())
    assert code == 0 and "GPU-hours" in flat and "APD prototypes (KL ×10, align ×10)" in flat


@pytest.mark.device
def test_two_process_ddp_ranks_agree_on_student_teacher_adapter_and_prior(tmp_path, ade, teacher_file):
    import os
    import subprocess

    from test_ddp import _torchrun

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent), "CUDA_VISIBLE_DEVICES": ""}
    sets = _tiny(ade, f"teacher.checkpoint={teacher_file}", "data.batch_size=4", "schedule.epochs=2", "train.max_steps_per_epoch=2")
    proc = subprocess.run([*_torchrun(2), str(Path(__file__).with_name("ddp_seg_worker.py")), str(tmp_path), *sets],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["world"] == 2
    for part in ("model", "adapter"):
        for key, value in ranks[0][part].items():
            assert torch.equal(value, ranks[1][part][key]), (part, key)
    assert torch.equal(ranks[0]["prior"], ranks[1]["prior"])
    # each rank's own RNG is in the checkpoint (they were seeded seed + rank), so a resume restores both
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["train_state"]["rng_ranks"]
    assert len(saved) == 2 and not torch.equal(saved[0]["torch"], saved[1]["torch"])


def test_fetch_teachers_seg_puts_apds_files_where_the_recipes_look(server, tmp_path, capsys):
    import io

    from gklcli.fetch import SEG_FILES
    from gklcli.train.kd import resolve_teacher_path

    url, files = server
    for dest, source in SEG_FILES.items():
        buffer = io.BytesIO()
        torch.save({"state_dict": {"module.layer0.0.weight": torch.zeros(1)}} if "teachers" in dest else {"conv1.weight": torch.zeros(1)},
                   buffer)
        files.files["/" + source.split("/", 3)[3]] = buffer.getvalue()
    code, _, err = run_cli(capsys, "fetch", "teachers", "seg", "--data-dir", tmp_path, "--mirror", url, "-q")
    assert code == 0, err
    for row in ROWS.values():
        r = load_recipe(row)
        assert resolve_teacher_path(r.model.pretrained, str(tmp_path)).is_file()
        assert resolve_teacher_path(r.teacher.checkpoint, str(tmp_path)).is_file()


def test_data_check_ade20k_reads_every_mask(capsys, tmp_path, ade):
    from gklcli.seg_data import check_ade20k

    assert check_ade20k(ade, expected={"train": 8, "val": 3}) == [("train", 8, 8), ("val", 3, 3)]
    code, _, err = run_cli(capsys, "data", "check", "ade20k", "--data-dir", ade)
    assert code == 2 and "not a complete ADE20K folder: training: 8 pairs, expected 20,210" in " ".join(err.split())
    bad = tmp_path / "bad"
    write_synthetic_ade20k(bad, num_train=2, num_val=1, size=24, num_classes=6)
    from PIL import Image

    mask = sorted((bad / "ADEChallengeData2016" / "annotations" / "validation").iterdir())[0]
    Image.fromarray(np.full((5, 5), 3, np.uint8)).save(mask)
    code, _, err = run_cli(capsys, "data", "check", "ade20k", "--data-dir", bad)
    assert code == 2 and f"{mask}: mask 5×5 ≠ image" in err and len(err.strip().splitlines()) == 1
