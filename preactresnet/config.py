"""The one typed training config: defaults <- --config YAML <- command-line flags; printed and saved."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from .data.augment import AugmentConfig

OPTIMIZERS = ("adagrad", "sgd", "adamw", "muon")
SCHEDULES = ("cosine", "linear")
TTA_CHOICES = ("none", "flip", "flip-translate")


@dataclass
class TrainConfig:
    # model
    model: str = "preactresnet18"
    width_mult: float = 1.0  # channel multiplier: 0.25 gives a narrow net for CPU demos
    drop_rate: float = 0.0  # dropout before the classifier
    zero_init_residual: bool = False
    whiten_stem: bool = False  # initialise the first conv by patch whitening of the training images
    pretrained: str = ""  # fine-tune from a pretrained folder or Hub repo id (export.py makes them)
    # data
    dataset: str = "cifar10"
    data_dir: str = "data"  # folder (downloads here), archive, image tree, or 'sample'
    download: bool = True
    val_size: int = 0  # >0: hold out this many training images to choose the best checkpoint
    # augmentation (per sample, batched on the training device)
    crop_padding: int = 4
    flip_prob: float = 0.5
    alt_flip: bool = False  # derandomized flip: each image mirrored on alternate epochs (flip_prob unused)
    jitter_prob: float = 0.8
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.05
    erase_prob: float = 0.25
    # MixUp / CutMix (timm) and the loss
    mixup_alpha: float = 1.0
    cutmix_alpha: float = 1.0
    mix_prob: float = 0.5  # chance a batch is mixed at all
    mix_switch_prob: float = 0.5  # chance a mixed batch uses CutMix rather than MixUp
    mix_off_epochs: int = 0  # no mixing in the last N epochs
    label_smoothing: float = 0.1
    # optimization
    epochs: int = 200
    batch_size: int = 256  # per process: under torchrun the global batch is batch_size x processes
    scale_lr: bool = False  # under torchrun, multiply lr, warmup_lr and min_lr by the number of processes
    sync_bn: bool = False  # under torchrun, BatchNorm statistics over the global batch
    optimizer: str = "adagrad"  # adagrad | sgd (Nesterov momentum) | adamw
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4  # never applied to BN parameters and biases
    bn_lr_scale: float = 1.0  # learning-rate multiplier for BN parameters and biases
    warmup_epochs: float = 5.0
    warmup_lr: float = 1e-5  # learning rate at step 0, rising linearly to lr
    schedule: str = "cosine"  # after warmup: cosine | linear decay to min_lr
    min_lr: float = 0.0  # end of the decay
    grad_clip: float = 0.0  # max global gradient norm; 0 = off
    ema: bool = False
    ema_decay: float = 0.999
    ema_warmup: bool = False  # EMA decay grows as 1 - (1 + step)^(-2/3) up to ema_decay: suits short runs
    tta: str = "flip"  # test-time augmentation reported beside the plain figure at the end: none | flip | flip-translate
    # speed
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto | bf16 | fp16 | off
    channels_last: str = "auto"  # auto | on | off
    compile: bool = False
    threads: int = 0  # CPU threads for PyTorch; 0 = PyTorch's choice
    profile: str = "auto"  # optimize_system.py's measured settings: auto (if made here) | off | PATH
    # reproducibility
    seed: int = 0
    deterministic: bool = False
    # run, outputs
    run_name: str = ""  # default: <model>-<date>-<time>
    checkpoint_dir: str = "checkpoints"
    log_dir: str = "runs"
    fig_dir: str = "fig"
    resume: str = ""  # a run folder, a run name, or 'auto' (the newest run)
    log_interval: int = 50  # steps between training-loss logs
    progress: bool = True  # tqdm bars
    max_steps_per_epoch: int = 0  # >0: cut epochs short (smoke tests, benchmarks)

    def augment(self) -> AugmentConfig:
        return AugmentConfig(
            crop_padding=self.crop_padding,
            flip_prob=self.flip_prob,
            jitter_prob=self.jitter_prob,
            brightness=self.brightness,
            contrast=self.contrast,
            saturation=self.saturation,
            hue=self.hue,
            erase_prob=self.erase_prob,
        )

    def validate(self) -> None:
        """Bad settings fail here, at start, with one line naming the flag."""
        from .models import canonical_name, list_models

        if canonical_name(self.model) not in list_models():
            raise ValueError(f"unknown --model '{self.model}'; choose one of: {', '.join(list_models())}")
        self.model = canonical_name(self.model)
        self.optimizer = self.optimizer.lower()
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown --optimizer '{self.optimizer}'; choose one of: {', '.join(OPTIMIZERS)}")
        checks = [
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.width_mult > 0, f"--width-mult must be > 0, got {self.width_mult}"),
            (0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {self.warmup_epochs}"),
            (0 <= self.min_lr <= self.lr, f"--min-lr must be in [0, lr], got {self.min_lr}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (self.mixup_alpha >= 0 and self.cutmix_alpha >= 0, "--mixup-alpha and --cutmix-alpha must be >= 0"),
            (0 <= self.mix_prob <= 1 and 0 <= self.mix_switch_prob <= 1, "--mix-prob and --mix-switch-prob must be in [0, 1]"),
            (self.grad_clip >= 0, f"--grad-clip must be >= 0, got {self.grad_clip}"),
            (0 < self.ema_decay < 1, f"--ema-decay must be in (0, 1), got {self.ema_decay}"),
            (self.schedule in SCHEDULES, f"unknown --schedule '{self.schedule}'; choose one of: {', '.join(SCHEDULES)}"),
            (self.tta in TTA_CHOICES, f"unknown --tta '{self.tta}'; choose one of: {', '.join(TTA_CHOICES)}"),
            (self.bn_lr_scale > 0, f"--bn-lr-scale must be > 0, got {self.bn_lr_scale}"),
            (self.channels_last in ("auto", "on", "off"), f"--channels-last must be auto, on or off, got '{self.channels_last}'"),
            (self.dataset in ("cifar10", "cifar100"), f"unknown --dataset '{self.dataset}'; use cifar10 or cifar100"),
        ]
        if self.mixing and self.batch_size % 2:
            checks.append((False, f"--batch-size must be even when MixUp/CutMix is on, got {self.batch_size}"))
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.augment()  # its own range checks

    @property
    def mixing(self) -> bool:
        return self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def format(self) -> str:
        width = max(len(f.name) for f in dataclasses.fields(self))
        return "\n".join(f"  {f.name:<{width}} : {getattr(self, f.name)}" for f in dataclasses.fields(self))


# Settings a resumed run may change: they alter speed or output, never the numbers it computes.
RESUMABLE_OVERRIDES = {"device", "threads", "progress", "log_interval", "resume", "compile", "data_dir", "download", "profile"}


def _field_types() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig)}


def from_dict(values: dict, where: str = "config") -> TrainConfig:
    types = _field_types()
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {', '.join(unknown)}; see python train.py --help")
    cfg = TrainConfig()
    for key, value in values.items():
        setattr(cfg, key, _coerce(value, types[key], f"{where}: {key}"))
    return cfg


def _coerce(value, typ: type, where: str):
    try:
        if typ is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes", "on")
            return bool(value)
        return typ(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be {typ.__name__}, got {value!r}") from None


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config {path} not found; see the recipes in configs/")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"--config {path} is not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path} must be a mapping of setting: value")
    return {k.replace("-", "_"): v for k, v in data.items()}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="Train a PreActResNet or ResNeXt-29 on CIFAR. Defaults <- --config YAML <- flags.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS,  # only flags the user typed reach the config
    )
    ap.add_argument("--config", help="YAML recipe, e.g. configs/demo.yaml")
    defaults = TrainConfig()
    for name, typ in _field_types().items():
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        if typ is bool:
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, help=f"(default: {default})")
        else:
            ap.add_argument(flag, type=typ, metavar=typ.__name__.upper(), help=f"(default: {default})")
    return ap


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, dict]:
    """Return the resolved config and the settings given explicitly (YAML or flags)."""
    args = vars(build_parser().parse_args(argv))
    config_path = args.pop("config", None)
    explicit = load_yaml(config_path) if config_path else {}
    explicit.update(args)
    cfg = from_dict(explicit, where=config_path or "flags")
    return cfg, explicit


def print_config(cfg: TrainConfig, file=sys.stdout) -> None:
    print("config:\n" + cfg.format(), file=file)


__all__ = ["TrainConfig", "RESUMABLE_OVERRIDES", "build_parser", "from_dict", "load_yaml", "parse_args", "print_config"]
