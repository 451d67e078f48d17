"""The one typed training config: defaults <- --config YAML <- command-line flags; printed and saved."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .data.augment import CROP_FILLS, AugmentConfig
from .duration import parse_duration
from .fileio import first_line
from .models import check_model_name

OPTIMIZERS = ("adagrad", "sgd", "adamw", "muon")
SCHEDULES = ("cosine", "linear")
TTA_CHOICES = ("none", "flip", "flip-translate")
AMP_CHOICES = ("auto", "bf16", "fp16", "off", "fp32", "none", "no", "false")  # what system.resolve_amp accepts


def setting(default, group: str, help: str):
    """A TrainConfig field with its --help group and text: the one place a setting is described."""
    return field(default=default, metadata={"group": group, "help": help})


MODEL, DATA, AUGMENT, MIXING, OPTIM, SCHEDULE, SPEED, OUTPUT, REPRO = (  # the --help groups
    "model", "data", "augmentation", "mixing and loss", "optimization", "schedule", "precision and speed",
    "output", "resume and reproducibility",
)


SPEED_CHOICES = {"channels_last": ("auto", "on", "off"), "compile": ("auto", "on", "off"), "conv_wgrad": ("auto", "aten", "matmul")}
MUON_CHOICES = {"muon_ns_dtype": ("auto", "bf16", "bf16-gram", "fp32"), "muon_algo": ("muon", "adamuon"),
                "muon_adjust_lr": ("match_rms_adamw", "original"), "muon_ns_coefficients": ("quintic", "polar_express", "original")}
AUGMENT_SETTINGS = ("crop_padding", "crop_fill", "flip_prob", "jitter_prob", "brightness", "contrast", "saturation", "hue", "erase_prob")
FREEZE_CHOICES = ("stem", "bn-scale")
SWITCHES = ("compile",)  # settings that were on/off switches and now also take auto: --x, --x auto|on|off, --no-x


@dataclass
class TrainConfig:
    model: str = setting("preactresnet18", MODEL, "network from the zoo: preactresnet18/34/50/101/152, resnext29_8x64d, ...")
    width_mult: float = setting(1.0, MODEL, "channel multiplier: 0.25 gives a narrow net for CPU runs")
    drop_rate: float = setting(0.0, MODEL, "dropout before the classifier")
    zero_init_residual: bool = setting(False, MODEL, "start every residual branch's last layer at zero")
    whiten_stem: bool = setting(False, MODEL, "initialise the first conv by patch whitening of the training images")
    freeze: str = setting("", MODEL, "parameters that never train, comma-separated: stem (the first conv; with --whiten-stem its "
                          "whitening, as airbench), bn-scale (every BatchNorm's weight stays 1, as airbench)")
    pretrained: str = setting("", MODEL, "fine-tune from a pretrained folder (export.py makes them), a Hub repo id or a run's .safetensors checkpoint")
    dataset: str = setting("cifar10", DATA, "cifar10 or cifar100")
    data_dir: str = setting("data", DATA, "a folder (downloads there), an archive, an image tree, or 'sample'")
    download: bool = setting(True, DATA, "download the dataset when --data-dir has none")
    val_size: int = setting(0, DATA, "hold out this many training images to choose the best checkpoint (0: none)")
    crop_padding: int = setting(4, AUGMENT, "RandomCrop padding in pixels (0: no crop)")
    crop_fill: str = setting("zero", AUGMENT, "what a crop shows beyond the image: zero (black, as torchvision's RandomCrop) | "
                             "reflect (the image mirrored at its edge, as airbench)")
    flip_prob: float = setting(0.5, AUGMENT, "chance of a horizontal flip per image")
    alt_flip: bool = setting(False, AUGMENT, "derandomized flip: each image mirrored on alternate epochs (flip_prob unused)")
    jitter_prob: float = setting(0.8, AUGMENT, "chance of ColorJitter per image")
    brightness: float = setting(0.2, AUGMENT, "ColorJitter brightness strength")
    contrast: float = setting(0.2, AUGMENT, "ColorJitter contrast strength")
    saturation: float = setting(0.2, AUGMENT, "ColorJitter saturation strength")
    hue: float = setting(0.05, AUGMENT, "ColorJitter hue strength (at most 0.5)")
    erase_prob: float = setting(0.25, AUGMENT, "chance of RandomErasing per image")
    mixup_alpha: float = setting(1.0, MIXING, "MixUp Beta(alpha, alpha); 0 turns MixUp off")
    cutmix_alpha: float = setting(1.0, MIXING, "CutMix Beta(alpha, alpha); 0 turns CutMix off")
    mix_prob: float = setting(0.5, MIXING, "chance a batch is mixed at all (0: no mixing)")
    mix_switch_prob: float = setting(0.5, MIXING, "chance a mixed batch uses CutMix rather than MixUp")
    mix_off_epochs: int = setting(0, MIXING, "no mixing in the last N epochs")
    label_smoothing: float = setting(0.1, MIXING, "label smoothing of the cross-entropy targets")
    epochs: int = setting(200, OPTIM, "training epochs")
    batch_size: int = setting(256, OPTIM, "per process: under torchrun the global batch is batch_size x processes")
    scale_lr: bool = setting(False, OPTIM, "under torchrun, multiply lr, warmup_lr and min_lr by the number of processes")
    sync_bn: bool = setting(False, OPTIM, "under torchrun on GPUs, BatchNorm statistics over the global batch; torch's "
                            "SyncBatchNorm reads the device 3 times per BatchNorm layer (51 host waits a step for PreActResNet18)")
    optimizer: str = setting("adagrad", OPTIM, "adagrad | sgd (Nesterov) | adamw | muon (conv/linear; AdamW for the rest)")
    muon_ns_dtype: str = setting("auto", OPTIM, "Muon's orthogonalization: auto (the fastest timed here on a CPU; bf16 on GPUs "
                                 "from sm80) | bf16 (timm's) | bf16-gram (its Gram form, restarted) | fp32 (Gram form)")
    muon_adjust_lr: str = setting("match_rms_adamw", OPTIM, "Muon's step per shape: match_rms_adamw (0.2 lr) | original")
    muon_ns_coefficients: str = setting("quintic", OPTIM, "Muon's 5 orthogonalization steps, timm's presets: quintic | polar_express "
                                        "(Amsel et al. 2025: small singular values raised further) | original (Keller Jordan's)")
    muon_algo: str = setting("muon", OPTIM, "muon | adamuon (timm's AdaMuon: Adam's second moment on the orthogonal step)")
    muon_fixed_norm: bool = setting(False, OPTIM, "Muon's weights scaled back to their first norm after each step (airbench)")
    lr: float = setting(0.05, OPTIM, "peak learning rate")
    momentum: float = setting(0.9, OPTIM, "SGD momentum")
    weight_decay: float = setting(5e-4, OPTIM, "weight decay, never applied to BN parameters and biases")
    bn_lr_scale: float = setting(1.0, OPTIM, "learning-rate multiplier for BN parameters and biases")
    head_lr_scale: float = setting(1.0, OPTIM, "learning-rate multiplier for the classifier (under Muon: its AdamW fallback)")
    grad_clip: float = setting(0.0, OPTIM, "max global gradient norm (0: off)")
    ema: bool = setting(False, OPTIM, "keep an exponential moving average of the weights (ema.safetensors)")
    ema_decay: float = setting(0.999, OPTIM, "EMA decay per step")
    ema_warmup: bool = setting(False, OPTIM, "EMA decay grows as 1 - (1 + step)^(-2/3) up to ema_decay: suits short runs")
    lookahead: bool = setting(False, OPTIM, "airbench's Lookahead: every 5 steps weights and BN statistics go back to a slow copy, the run ends on it")
    warmup_epochs: float = setting(5.0, SCHEDULE, "linear warmup length in epochs (fractions allowed)")
    warmup_lr: float = setting(1e-5, SCHEDULE, "learning rate at step 0, rising linearly to lr")
    warmup_max_fraction: float = setting(0.25, SCHEDULE, "the warmup takes at most this share of the run's steps, so "
                                         "a short run or small budget still decays (1: all of --warmup-epochs)")
    schedule: str = setting("cosine", SCHEDULE, "decay after warmup: cosine | linear, down to min_lr")
    min_lr: float = setting(0.0, SCHEDULE, "learning rate at the end of the decay")
    time_budget: str = setting("", SCHEDULE, "train as long as fits this wall-clock budget here instead of --epochs: 90s, 10m, 2h, 1h30m")
    total_steps: int = setting(0, SCHEDULE, "stop after this many optimizer steps, schedule fitted to them (0: epochs x steps/epoch)")
    device: str = setting("auto", SPEED, "auto | cpu | cuda | cuda:N")
    amp: str = setting("auto", SPEED, "mixed precision: auto (CPU: bf16 or fp32, whichever trains faster when timed here, cached; GPU: bf16 from sm80, else fp16) | bf16 | fp16 | off")
    channels_last: str = setting("auto", SPEED, "NHWC memory format: auto | on | off")
    compile: str = setting("auto", SPEED, "torch.compile the step: on | off | auto (a --time-budget run compiles where "
                           "the gain measured here repays the compilation; cached)")
    conv_wgrad: str = setting("auto", SPEED, "CPU conv weight gradients: auto (oneDNN's or one matmul per layer shape, as timed here; cached) | aten | matmul")
    threads: int = setting(0, SPEED, "CPU threads for PyTorch (0: PyTorch's choice)")
    flush_denormal: bool = setting(True, SPEED, "CPU: denormal floats count as zero (FTZ/DAZ): late in training they made steps 3x slower")
    profile: str = setting("auto", SPEED, "optimize_system.py's measured settings: auto (if made here) | off | PATH")
    sync_debug: bool = setting(False, SPEED, "CUDA: warn at every host synchronization (torch.cuda.set_sync_debug_mode)")
    run_name: str = setting("", OUTPUT, "run name (default: <model>-<date>-<time>)")
    checkpoint_dir: str = setting("checkpoints", OUTPUT, "where run folders with checkpoints go")
    log_dir: str = setting("runs", OUTPUT, "where TensorBoard logs and metrics.csv go")
    fig_dir: str = setting("fig", OUTPUT, "where figures go")
    figures: bool = setting(True, OUTPUT, "write the figures (augmented batch, training curves); --no-figures for sweeps and smoke tests")
    log_interval: int = setting(50, OUTPUT, "steps between training-loss logs")
    eval_every: int = setting(1, OUTPUT, "evaluate every N epochs and after the last (0: after the last only); "
                              "a --time-budget run trains in the time saved")
    progress: bool = setting(True, OUTPUT, "progress bars (drawn on a terminal only, never into a log file)")
    tta: str = setting("flip", OUTPUT, "TTA reported beside the plain test accuracy at the end: none | flip | flip-translate")
    max_steps_per_epoch: int = setting(0, OUTPUT, "cut epochs short after N steps (smoke tests, benchmarks; 0: off)")
    resume: str = setting("", REPRO, "continue a run: its folder, its name, or 'auto' (the newest run)")
    seed: int = setting(0, REPRO, "seed of every random draw")
    deterministic: bool = setting(False, REPRO, "bit-exact repeat runs (deterministic kernels; slower on GPUs)")

    def augment(self) -> AugmentConfig:  # the settings the augmentation shares by name (its others keep their defaults)
        return AugmentConfig(**{name: getattr(self, name) for name in AUGMENT_SETTINGS})

    def validated(self) -> TrainConfig:
        """A copy with names in canonical form; bad settings fail here, at start, with one line naming the flag."""
        cfg = dataclasses.replace(self, model=check_model_name(self.model), optimizer=self.optimizer.lower())
        cfg.validate()
        return cfg

    def validate(self) -> None:
        checks = [
            (self.optimizer in OPTIMIZERS, f"unknown --optimizer '{self.optimizer}'; choose one of: {', '.join(OPTIMIZERS)}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.width_mult > 0, f"--width-mult must be > 0, got {self.width_mult}"),
            (0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {self.warmup_epochs}"),
            (0 < self.warmup_max_fraction <= 1, f"--warmup-max-fraction must be in (0, 1], got {self.warmup_max_fraction}"),
            (0 <= self.min_lr <= self.lr, f"--min-lr must be in [0, lr], got {self.min_lr}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (self.mixup_alpha >= 0 and self.cutmix_alpha >= 0, "--mixup-alpha and --cutmix-alpha must be >= 0"),
            (0 <= self.mix_prob <= 1 and 0 <= self.mix_switch_prob <= 1, "--mix-prob and --mix-switch-prob must be in [0, 1]"),
            (self.grad_clip >= 0, f"--grad-clip must be >= 0, got {self.grad_clip}"),
            (0 < self.ema_decay < 1, f"--ema-decay must be in (0, 1), got {self.ema_decay}"),
            (self.schedule in SCHEDULES, f"unknown --schedule '{self.schedule}'; choose one of: {', '.join(SCHEDULES)}"),
            (self.tta in TTA_CHOICES, f"unknown --tta '{self.tta}'; choose one of: {', '.join(TTA_CHOICES)}"),
            (self.total_steps >= 0, f"--total-steps must be >= 0, got {self.total_steps}"),
            (self.log_interval >= 1, f"--log-interval must be >= 1 (steps between loss lines), got {self.log_interval}"),
            (self.eval_every >= 0, f"--eval-every must be >= 0 (0: evaluate after the last epoch only), got {self.eval_every}"),
            (self.threads >= 0, f"--threads must be >= 0 (0: PyTorch's default), got {self.threads}"),
            (str(self.amp).lower() in AMP_CHOICES, f"unknown --amp '{self.amp}'; use auto, bf16, fp16 or off"),
            *[(scale > 0, f"--{name}-lr-scale must be > 0, got {scale}") for name, scale in (("bn", self.bn_lr_scale), ("head", self.head_lr_scale))],
            *[(getattr(self, name) in allowed, f"--{name.replace('_', '-')} must be {', '.join(allowed[:-1])} or {allowed[-1]}, "
               f"got '{getattr(self, name)}'") for name, allowed in {**SPEED_CHOICES, **MUON_CHOICES, "crop_fill": CROP_FILLS}.items()],
            (set(self.frozen) <= set(FREEZE_CHOICES), f"--freeze takes {' and '.join(FREEZE_CHOICES)}, comma-separated; got '{self.freeze}'"),
            (self.dataset in ("cifar10", "cifar100"), f"unknown --dataset '{self.dataset}'; use cifar10 or cifar100"),
            (not (self.mixing and self.batch_size % 2), f"--batch-size must be even when MixUp/CutMix is on, got {self.batch_size}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.augment()  # its own range checks
        if self.time_budget:
            parse_duration(self.time_budget)

    @property
    def frozen(self) -> tuple[str, ...]:  # --freeze's parts
        return tuple(part.strip() for part in self.freeze.split(",") if part.strip())

    @property
    def mixing(self) -> bool:
        return self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def format(self) -> str:
        width = max(len(f.name) for f in dataclasses.fields(self))
        return "\n".join(f"  {f.name:<{width}} : {getattr(self, f.name)}" for f in dataclasses.fields(self))


# Settings a resumed run may change: they alter speed or output, never the numbers it computes.
RESUMABLE_OVERRIDES = {
    "device", "threads", "progress", "log_interval", "resume", "compile", "conv_wgrad", "data_dir", "download", "profile", "sync_debug",
    "figures", "tta", "eval_every",  # output (PNGs, TTA) or which epochs evaluate: a time budget re-plans, as for any speed
    "checkpoint_dir", "log_dir", "fig_dir",  # where a moved run is found and writes: never what it computes
}


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
        if key in SWITCHES and isinstance(value, bool):  # a config saved when the setting was a plain switch
            value = "on" if value else "off"
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
        raise ValueError(f"--config {path} is not valid YAML ({first_line(err)})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path} must be a mapping of setting: value")
    return {k.replace("-", "_"): v for k, v in data.items()}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="Train a PreActResNet or ResNeXt-29 on CIFAR. Defaults <- --config YAML <- flags.",
        argument_default=argparse.SUPPRESS,  # only flags the user typed reach the config
    )
    ap.add_argument("--config", help="YAML recipe, e.g. configs/demo.yaml")
    groups: dict[str, argparse._ArgumentGroup] = {}
    types = _field_types()
    for f in dataclasses.fields(TrainConfig):
        group = groups.get(f.metadata["group"]) or groups.setdefault(f.metadata["group"], ap.add_argument_group(f.metadata["group"]))
        flag, typ = "--" + f.name.replace("_", "-"), types[f.name]
        text = f"{f.metadata['help']} (default: {f.default!r})"
        if typ is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        elif f.name in SWITCHES:  # --compile (on), --compile auto|on|off, --no-compile (off)
            group.add_argument(flag, nargs="?", const="on", metavar="auto|on|off", help=text)
            group.add_argument("--no-" + flag[2:], dest=f.name, action="store_const", const="off", help=f"the same as {flag} off")
        else:
            group.add_argument(flag, type=typ, metavar=typ.__name__.upper(), help=text)
    return ap


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, dict]:
    """Return the resolved config and the settings given explicitly (YAML or flags)."""
    args = vars(build_parser().parse_args(argv))
    config_path = args.pop("config", None)
    if "time_budget" in args and ({"epochs", "total_steps"} & set(args)):
        raise ValueError("--time-budget chooses the epochs itself; give --time-budget or --epochs/--total-steps, not both")
    explicit = load_yaml(config_path) if config_path else {}
    if {"epochs", "total_steps"} & set(args) and "time_budget" not in args:
        explicit.pop("time_budget", None)  # a flag's epoch count wins over a recipe's budget
    explicit.update(args)
    if explicit.get("time_budget") and explicit.get("total_steps"):  # a recipe's total_steps under a budget
        raise ValueError(f"time_budget and total_steps both set the run's length (from {config_path or 'flags'}); "
                         "keep one: --total-steps 0 lets the budget choose")
    cfg = from_dict(explicit, where=config_path or "flags")
    return cfg, explicit


@dataclass(frozen=True)
class ResolvedConfig:
    """The finished config of a run and what resolving it found; nothing changes it afterwards."""

    cfg: TrainConfig
    state: dict | None = None  # the training state to resume from
    run_dir: Path | None = None  # the run being resumed
    profile: dict | None = None  # the system profile applied (its 'applied' settings, 'path', 'tf32')
    precision_line: str | None = None  # why --amp auto / --muon-ns-dtype auto chose what they did (None: no choice timed)


__all__ = ["RESUMABLE_OVERRIDES", "ResolvedConfig", "TrainConfig", "build_parser", "from_dict", "load_yaml", "parse_args"]
