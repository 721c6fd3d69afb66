"""The recipe schema: one typed dataclass per section, named as the paper names things (α weights the
wMSE term, β the soft-label cross-entropy, γ is the power on the weights, τ the temperature of the
class prior). Its own module because it is only the types and their allowed ranges; `gklcli.recipes`
validates a merged mapping into them (and re-exports them)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

EPS_8 = 8 / 255
EPS_2 = 2 / 255


def _num(default: Any, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> Any:
    """A numeric field with an allowed range; `lo_open` makes the lower bound exclusive."""
    return field(default=default, metadata={"lo": lo, "hi": hi, "lo_open": lo_open})


@dataclass
class MetaCfg:
    """What the recipe reproduces; used by `gkl reproduce` and shown in reports."""

    name: Optional[str] = None
    description: str = ""
    table: Optional[str] = None
    row: Optional[str] = None


@dataclass
class ModelCfg:
    arch: str = "wrn-34-10"
    num_classes: Optional[int] = _num(None, 2)  # None: the dataset's class count
    sync_bn: bool = False  # convert BatchNorm to SyncBatchNorm under DDP
    channels_last: bool = False
    # Ghost batches: in training, BatchNorm normalises groups of this many images (per process), as
    # nn.DataParallel does on batch/bn_group_size GPUs (running statistics from the first group, as
    # replica 0's). The official GKL-AT runs: DataParallel on 4 GPUs, 32 of 128 images per GPU.
    bn_group_size: Optional[int] = _num(None, 1)
    # DM-AT's first step runs BatchNorm at momentum 1 (running statistics start as that batch's)
    bn_first_batch_stats: bool = False
    # clip-kd: recompute activations in the backward pass (OpenCLIP's --grad-checkpointing): ~3× less memory
    # for ~1.3× the time, what fits 1024 images per GPU of ViT-B/16
    grad_checkpointing: bool = False
    # timm models (timm/NAME): stochastic depth, and initial weights from a local file (USB's ViT-small, …)
    drop_path: float = _num(0.0, 0.0, 1.0)
    pretrained: Optional[str] = None


@dataclass
class GeneratedCfg:
    """DM-AT generated data (npz with `image`/`label`), mixed into every batch."""

    path: Optional[str] = None
    fraction: float = _num(0.7, 0.0, 1.0)  # share of each batch drawn from the generated set
    required: bool = False  # the recipe is meaningless without it: training refuses to start
    # dmat: DM-AT's SemiSupervisedSampler (ceil(N/B) batches per epoch of B − int(B·fraction) real
    # images); real-pass: one pass over the real images per epoch (gkl's earlier rule, ~3.3× the steps)
    sampler: Literal["dmat", "real-pass"] = "dmat"


@dataclass
class SyntheticCfg:
    """A small generated dataset with learnable structure, for the quick start and tests."""

    num_train: int = _num(2048, 1)
    num_test: int = _num(512, 1)
    num_classes: int = _num(10, 2)
    image_size: int = _num(32, 8)
    seed: int = 0
    # largest / smallest class in the training split (exponential profile, as ImageNet-LT); 1: balanced.
    # Test images stay balanced; distillation then reports Many/Medium/Few as on ImageNet-LT.
    imbalance: float = _num(1.0, 1.0)


@dataclass
class DigitsCfg:
    """scikit-learn's handwritten digits (8×8, 10 classes), upsampled to `image_size` for the models."""

    image_size: int = _num(16, 8)


@dataclass
class DataCfg:
    dataset: Literal["cifar10", "cifar100", "npz", "synthetic", "digits", "imagenet", "imagenet-lt", "pairs", "ade20k"] = "cifar10"
    root: Optional[str] = None  # dataset directory (`--data-dir`); None: ./data
    download: bool = True  # torchvision download when the files are missing (needs internet)
    path: Optional[str] = None  # the .npz training file for dataset=npz (keys `image`, `label`)
    # ImageNet-LT: the standard list files (`relative/path.jpg label` per line) under the data root
    lt_train_list: str = "ImageNet_LT_train.txt"
    lt_val_list: str = "ImageNet_LT_val.txt"
    lt_test_list: str = "ImageNet_LT_test.txt"
    image_size: int = _num(224, 8)  # ImageNet crops
    test_path: Optional[str] = None  # an .npz test file for dataset=npz (final test numbers)
    # basic: RandomCrop(32, 4) + flip; basic-rot15: + RandomRotation(15) (DM-AT's CIFAR-100 `base`);
    # timm: timm's ImageNet training transform (RandomResizedCrop, flip, `rand_augment`, `re_prob`)
    augment: Literal["basic", "basic-rot15", "autoaug", "mdistiller", "imagenet", "timm", "none"] = "basic"
    rand_augment: Optional[str] = None  # augment=timm: timm's RandAugment string, e.g. rand-m7-mstd0.5 (None: none)
    train_interpolation: Literal["bilinear", "bicubic", "random"] = "bilinear"  # augment=timm
    re_prob: float = _num(0.0, 0.0, 1.0)  # augment=timm: random-erasing probability
    eval_crop_pct: float = _num(0.875, 0.0, 1.0, lo_open=True)  # ImageNet evaluation: resize to size/crop_pct, centre crop
    # Mixup/CutMix on the device batch (timm's Mixup; teacher and student see the same mixed images)
    mixup: float = _num(0.0, 0.0)  # Mixup α (0: off)
    cutmix: float = _num(0.0, 0.0)  # CutMix α (0: off)
    mixup_prob: float = _num(1.0, 0.0, 1.0)
    mixup_switch_prob: float = _num(0.5, 0.0, 1.0)
    repeated_aug: int = _num(1, 1)  # repeated augmentation: each image this many times per epoch (timm's RepeatAugSampler)
    autoaug_fill: int = _num(128, 0, 255)  # AutoAugment's fill grey (official CIFAR10Policy: 128; torchvision: 0)
    batch_size: int = _num(128, 1)
    eval_batch_size: int = _num(256, 1)
    num_workers: int = _num(4, 0)
    val_size: int = _num(1000, 0)  # held out from the training set for model selection
    drop_last: bool = False
    # dataset=pairs (kind clip-kd): image–caption pairs, WebDataset tar shards (a braceexpand pattern such as
    # datacomp/{00000000..00127999}.tar, a folder of .tar, or a file listing them) or a CSV/TSV of (image path, caption)
    pairs: Optional[str] = None
    val_pairs: Optional[str] = None  # held-out pairs for validation retrieval (R@1) and best.pt
    samples_per_epoch: Optional[int] = _num(None, 1)  # a fresh random sample of the pool each epoch (None: its size)
    shuffle_buffer: int = _num(1000, 1)  # tar shards: samples shuffled in a buffer of this size per stream
    csv_image_key: str = "filepath"  # OpenCLIP's --csv-img-key
    csv_caption_key: str = "title"  # OpenCLIP's --csv-caption-key
    generated: GeneratedCfg = field(default_factory=GeneratedCfg)
    synthetic: SyntheticCfg = field(default_factory=SyntheticCfg)
    digits: DigitsCfg = field(default_factory=DigitsCfg)


@dataclass
class LossCfg:
    """The outer (training) loss.

    Official AT scripts name the weights the other way round: their ``--alpha`` is β here and their
    ``--beta`` is α here (see `gklcli.losses`).
    """

    name: str = "gkl"  # a name of the loss registry (gklcli.losses.LOSSES): gkl, ikl, dkl, trades, kd, jsd, dkd, dist, ce
    alpha: float = _num(20.0, 0.0)  # α: wMSE weight (the term is α/4·‖·‖²)
    beta: float = _num(4.0, 0.0)  # β: soft-label cross-entropy weight
    gamma: float = _num(1.0, 0.0, 1.0)  # γ: power on the wMSE weights
    weights: Literal["class", "sample"] = "class"  # class-wise prior (GI) or sample-wise scores
    prior_temperature: float = _num(4.0, 0.0, lo_open=True)  # τ: softmax temperature of the prior
    weight_temperature: float = _num(1.0, 0.0, lo_open=True)  # T2: sample-wise weight temperature
    temperature: float = _num(1.0, 0.0, lo_open=True)  # T: cross-entropy (and KD) temperature
    normalization: Literal["weights", "batch"] = "weights"  # GKL (v2) vs conference IKL (v1)
    ce_weight: float = _num(1.0, 0.0)  # weight of the hard-label cross-entropy
    trades_beta: float = _num(6.0, 0.0)  # β of TRADES when name=trades
    aug_weight: float = _num(0.5, 0.0)  # weight of the AutoAugment view's robust term
    # AT: which training forward runs first (BatchNorm's running statistics see the last one last):
    # the official GKL code runs the adversarial batch first, DM-AT's TRADES the clean one
    forward_order: Literal["adv-first", "clean-first"] = "adv-first"
    label_smoothing: float = _num(0.0, 0.0, 1.0)
    warmup_epochs: int = _num(0, 0)  # KD: the distillation term is scaled by min(epoch/warmup, 1)
    kd_weight: float = _num(1.0, 0.0)  # weight of the KL (KD), JSD or DIST distillation term
    dist_beta: float = _num(1.0, 0.0)  # DIST: weight of the inter-class (per sample) relation
    dist_gamma: float = _num(1.0, 0.0)  # DIST: weight of the intra-class (per class, over the batch) relation
    label_loss: Literal["ce", "bce"] = "ce"  # the label term: cross-entropy, or timm's BinaryCrossEntropy (Hao et al.)


@dataclass
class AttackCfg:
    """The inner maximisation of adversarial training (run in eval mode by default)."""

    eps: float = _num(EPS_8, 0.0)
    loss: str = "gkl"  # an attack loss of the registry: gkl (α=β=γ=1, official C-100), sce (C-10), kl, ce
    # official: 5 steps of ε_t/2 every epoch (what the official `if` chain really does);
    # staged: the 2/3/4/5-step schedule it intended; fixed: `steps` × `step_size`.
    schedule: Literal["official", "staged", "fixed"] = "official"
    steps: int = _num(10, 1)
    step_size: float = _num(EPS_2, 0.0, lo_open=True)
    eps_ramp: bool = True  # ε_t = ε·epoch/epochs
    # start point: normal = x + init_std·N(0, 1) (official GKL/TRADES-AWP); uniform = x + U(−ε, ε)
    # clamped to [0, 1] (DM-AT's gowal21uncovering TRADES attack)
    init: Literal["normal", "uniform"] = "normal"
    init_std: float = _num(0.001, 0.0)
    # eval: BatchNorm uses running statistics (official DKL); train: batch statistics without
    # updating the running ones (DM-AT's `track_bn_stats(model, False)`).
    bn_mode: Literal["eval", "train"] = "eval"


@dataclass
class AwpCfg:
    """Adversarial weight perturbation (Wu et al.), as the official TRADES-AWP code."""

    enabled: bool = True
    gamma: float = _num(0.005, 0.0)
    warmup_epochs: int = _num(10, 0)  # perturb from this epoch on (official: `epoch >= awp_warmup`)
    # exact: copy the unperturbed weights back before the optimizer step (bit-exact restore);
    # subtract: the official order, step on the perturbed weights and then subtract γ·diff (weight
    # decay then also acts on the perturbation, and rounding leaves ~1 ulp of drift).
    restore: Literal["exact", "subtract"] = "exact"


@dataclass
class OptimCfg:
    name: Literal["sgd", "adamw", "lamb"] = "sgd"
    lr: float = _num(0.2, 0.0, lo_open=True)
    momentum: float = _num(0.9, 0.0, 1.0)
    weight_decay: float = _num(5e-4, 0.0)
    nesterov: bool = False
    bn_weight_decay: bool = True  # false: BatchNorm weights/biases without weight decay (DM-AT's group_weight)
    # adamw (OpenCLIP's optimizer): betas and eps; decay_1d false: no weight decay on tensors of fewer than
    # 2 dimensions (biases, norm gains, logit_scale), OpenCLIP's exclusion rule
    beta1: float = _num(0.9, 0.0, 1.0)
    beta2: float = _num(0.98, 0.0, 1.0)
    eps: float = _num(1e-6, 0.0, lo_open=True)
    decay_1d: bool = True
    # layer-wise lr decay for ViTs (USB, BEiT): a parameter group at depth d of D gets lr·layer_decay^(D − d)
    layer_decay: float = _num(1.0, 0.0, 1.0, lo_open=True)
    # the lr of a model's head (its `head_modules`: a PSPNet's ppm, cls, aux and APD adapter) is lr × this (APD: 10)
    head_lr_scale: float = _num(1.0, 0.0, lo_open=True)


@dataclass
class ScheduleCfg:
    epochs: int = _num(200, 1)
    # cosine-official: lr·½(1+cos(π·epoch/(epochs+1))) per epoch, epochs counted from 1 (DKL code)
    # cosine-trades: lr·½(1+cos(π(epoch−1)/epochs)) (official train_trades_cifar.py); onecycle: DM-AT's
    # `cosinew` (torch OneCycleLR per epoch, warm-up = warmup_epochs, momentum cycled 0.95↔0.85)
    # cosine-timm: timm's CosineLRScheduler per epoch (linear warm-up from warmup_lr, cosine to min_lr);
    # cosine-usb: USB's get_cosine_schedule_with_warmup per step, lr·cos(7π·k/(16·K)) after warmup_steps
    # poly: lr·(1 − k/K)^poly_power per step k of K (APD's / semseg's poly_learning_rate)
    lr_schedule: Literal["cosine-official", "cosine-trades", "onecycle", "cosine", "cosine-timm", "cosine-usb", "multistep",
                         "poly", "constant"] = "cosine-official"
    milestones: list[int] = field(default_factory=list)
    lr_decay: float = _num(0.1, 0.0, 1.0)
    warmup_epochs: int = _num(0, 0)  # linear learning-rate warm-up
    warmup_mode: Literal["step", "epoch"] = "step"  # epoch: lr·e/W per epoch (the official ImageNet-LT script)
    # a linear warm-up over this many steps, then cosine to 0 over the rest (OpenCLIP's --warmup with cosine_lr)
    warmup_steps: int = _num(0, 0)
    min_lr: float = _num(0.0, 0.0)  # cosine-timm: the last epochs' lr
    warmup_lr: float = _num(0.0, 0.0)  # cosine-timm: the first warm-up epoch's lr
    poly_power: float = _num(0.9, 0.0)  # poly: the power


@dataclass
class EmaCfg:
    """Weight averaging. epoch: EMA over per-epoch weights (official swa.py, BN buffers included);
    step: in-loop EMA after every step (DM-AT style)."""

    mode: Literal["none", "epoch", "step"] = "epoch"
    tau: float = _num(0.9, 0.0, 1.0)
    start_epoch: int = _num(1, 1)  # epoch mode: the first epoch averaged
    # step mode (DM-AT's ema_update): the average copies the model for the first warmup_fraction of
    # all training steps, then decays by min(τ, (1+n)/(10+n)), n steps after the warm-up
    warmup_fraction: float = _num(0.0, 0.0, 1.0)
    dynamic: bool = True  # step mode: DM-AT's dynamic decay min(τ, (1+n)/(10+n)); false: constant τ (USB's EMA)


@dataclass
class TeacherCfg:
    """The frozen teacher of distillation: a registry architecture and a weight file (gkl checkpoint,
    mdistiller `{"model": …}`, RobustBench `{"state_dict": …}`, or a plain/torchvision state dict)."""

    arch: Optional[str] = None
    checkpoint: Optional[str] = None  # relative paths are looked up under --data-dir's parent and ./
    # (kind clip-kd: an OpenCLIP pretrained tag such as datacomp_xl_s13b_b90k, or a weight file)
    cache_dir: Optional[str] = None  # clip-kd: where OpenCLIP keeps downloaded weights (None: the Hugging Face cache)


@dataclass
class SemiCfg:
    """Semi-supervised learning (kind semi, TABLE XXII) as USB runs it: FixMatch or Mean-Teacher on a
    labelled split of `num_labels` images (the same number per class, drawn with `split_seed`) and the
    unlabelled rest; `loss.*` is the consistency term (the registry's kind "semi")."""

    algorithm: Literal["fixmatch", "meanteacher"] = "fixmatch"
    num_labels: int = _num(200, 1)  # labelled images in all (USB's num_labels); per class num_labels / classes
    split_seed: int = 0  # USB's seed: the per-class shuffle that picks the labelled images
    include_lb_to_ulb: bool = True  # the unlabelled set also holds the labelled images (USB's default)
    uratio: int = _num(1, 1)  # unlabelled images per labelled one in a step
    p_cutoff: Optional[float] = _num(0.95, 0.0, 1.0)  # confidence mask on the weak / teacher prediction (None: no mask)
    hard_label: bool = True  # FixMatch: pseudo-labels as argmax (hard) or the weak softmax (soft)
    ulb_loss_ratio: float = _num(1.0, 0.0)  # λ_u, the consistency weight
    unsup_warmup: float = _num(0.0, 0.0, 1.0)  # a linear ramp of λ_u over this share of training (USB MT: 0.4)
    # FixMatch with loss gkl: the weak view's logits receive the wMSE gradient (the official DKL fork: its
    # weak logits come from the same forward, not detached); false: detached, as for every other loss
    weak_grad: bool = True


@dataclass
class SegCfg:
    """Segmentation distillation (kind seg-kd, TABLE XXIII) as APD's ADE20K config (config/ade20k/
    ade20k_release_psp18_psp101.yaml): data, augmentation, evaluation and APD's loss weights. `loss.*` is
    the pixel term (kd = APD's KL, gkl, or ce: no teacher, the baseline)."""

    num_classes: int = _num(150, 2)
    reduce_zero_label: bool = True  # raw ADE20K masks: 0 (other) → ignore 255, k → k − 1
    train_list: Optional[str] = None  # APD/semseg list files (`image mask` per line, relative to the dataset root)
    val_list: Optional[str] = None
    crop_size: int = _num(473, 9)  # train_h/train_w (APD: (size − 1) % 8 == 0)
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])  # scale_min, scale_max
    rotate_range: list[float] = field(default_factory=lambda: [-10.0, 10.0])  # rotate_min, rotate_max
    aux_weight: float = _num(0.4, 0.0)
    main_weight: float = _num(1.0, 0.0)
    # APD's KLDivLoss() mean divides by every element, classes included (elements); pixels: the per-pixel mean
    kd_reduction: Literal["elements", "pixels"] = "elements"
    pred_kmeans_weight: float = _num(10.0, 0.0)  # APD's weight of the pixel→prototype KL (0: no prototype terms)
    proto_align_weight: float = _num(10.0, 0.0)
    kmeans_temp: float = _num(10.0, 0.0, lo_open=True)
    kmeans_norm: bool = True
    adapter_dim: int = _num(512, 1)  # kmeans_adapt_dim of both 1×1 adapters
    # the teacher adapter's Adam (betas 0.9, 0.99), at a constant lr: APD's poly update of it never runs
    teacher_lr: float = _num(1e-5, 0.0, lo_open=True)
    base_size: int = _num(512, 8)  # evaluation: the long side before inference
    eval_mode: Literal["sliding", "whole"] = "sliding"
    stride_rate: float = _num(2.0 / 3.0, 0.0, 1.0, lo_open=True)
    eval_flip: bool = True
    eval_scales: list[float] = field(default_factory=lambda: [1.0])


@dataclass
class TrainCfg:
    seed: int = 0
    amp: Literal["none", "bf16"] = "none"
    compile: bool = False
    deterministic: bool = True
    save_every_steps: int = _num(0, 0)  # 0: checkpoint at epoch ends only
    log_every_steps: int = _num(50, 1)  # --quiet: a progress line every N steps
    max_steps_per_epoch: Optional[int] = _num(None, 1)  # truncate epochs (smoke runs)


@dataclass
class EvalCfg:
    """Validation during training and the defaults of robustness evaluation."""

    every_epochs: int = _num(1, 1)
    eps: float = _num(EPS_8, 0.0)
    pgd_steps: int = _num(10, 0)
    pgd_step_size: float = _num(EPS_2, 0.0, lo_open=True)
    pgd_loss: Literal["ce", "cw"] = "ce"  # the validation attack's loss (DM-AT selects on PGD-40 with CW)
    n_val: Optional[int] = _num(None, 1)  # validate on the first n held-out images (None: all)
    select: Literal["pgd", "clean"] = "pgd"  # best.pt: highest validation PGD (or clean) accuracy
    final_test: bool = True  # evaluate last and best on the test set when training ends
    n_test: Optional[int] = _num(None, 1)  # first n test images for that evaluation (None: all)
    # evaluate on the test set every N epochs (and at the last) and record the best over epochs,
    # mdistiller's protocol (it selects on the test set; gkl also keeps the last epoch). 0: off
    test_every_epochs: int = _num(0, 0)
    aa_version: Literal["standard", "plus", "rand", "custom"] = "standard"
    aa_n_ex: int = _num(10000, 1)
    aa_batch_size: int = _num(500, 1)


@dataclass
class OutputCfg:
    dir: Optional[str] = None  # None: runs/<recipe name>
    overwrite: bool = False
    # the experiment trackers that receive every epoch's record, the recipe and results.json (docs/tracking.md)
    tracker: list[Literal["tensorboard", "wandb", "mlflow"]] = field(default_factory=lambda: ["tensorboard"])
    tensorboard: bool = True  # false: no TensorBoard whatever output.tracker lists (the switch of older recipes)
    project: str = "gkl"  # the W&B project and the MLflow experiment
    mlflow_uri: Optional[str] = None  # None: MLFLOW_TRACKING_URI, else the file store OUT/mlruns
    plots: bool = True


@dataclass
class Recipe:
    kind: Literal["at", "kd", "clip-kd", "semi", "seg-kd"] = "at"
    meta: MetaCfg = field(default_factory=MetaCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    loss: LossCfg = field(default_factory=LossCfg)
    attack: AttackCfg = field(default_factory=AttackCfg)
    awp: AwpCfg = field(default_factory=AwpCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    schedule: ScheduleCfg = field(default_factory=ScheduleCfg)
    ema: EmaCfg = field(default_factory=EmaCfg)
    teacher: TeacherCfg = field(default_factory=TeacherCfg)
    semi: SemiCfg = field(default_factory=SemiCfg)
    seg: SegCfg = field(default_factory=SegCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    output: OutputCfg = field(default_factory=OutputCfg)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def content_hash(self) -> str:
        """A stable hash of every setting, for content-addressed runs."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()
