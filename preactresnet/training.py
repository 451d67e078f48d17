"""The training loop: the spec's recipe, exact resume, atomic checkpoints, TensorBoard, CSV, curves."""

from __future__ import annotations

import csv
import math
import signal
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import find_run, load_state, save_state, save_weights, unwrap_model
from .config import RESUMABLE_OVERRIDES, TrainConfig, from_dict, print_config
from .data import BatchAugment, TensorLoader, load_dataset
from .evaluation import EvalResult, evaluate
from .inference import predict_probs
from .models import create_model
from .whitening import whiten_stem_
from .system import (
    autocast,
    resolve_amp,
    resolve_device,
    rng_state,
    seed_everything,
    set_deterministic,
    set_rng_state,
    tune_malloc,
)


class NonFiniteLoss(Exception):
    pass


@dataclass
class RunDirs:
    name: str
    checkpoints: Path
    logs: Path
    figures: Path


def resolve_resume(cfg: TrainConfig, explicit: dict) -> tuple[TrainConfig, dict | None, Path | None]:
    """With --resume, the saved config wins; an explicit flag may only change what cannot alter results."""
    if not cfg.resume:
        return cfg, None, None
    run_dir = find_run(cfg.resume, cfg.checkpoint_dir)
    state = load_state(run_dir / "last.state.pt")
    saved = from_dict(state["config"], where=f"{run_dir}/last.state.pt")
    for key, value in explicit.items():
        if key in RESUMABLE_OVERRIDES:
            setattr(saved, key, value)
        elif value != getattr(saved, key):
            raise ValueError(
                f"--{key.replace('_', '-')} {value} differs from {getattr(saved, key)} in the run being resumed "
                f"({run_dir}); drop the flag, or start a new run without --resume"
            )
    saved.resume = cfg.resume
    saved.run_name = run_dir.name
    saved.checkpoint_dir = str(run_dir.parent)
    return saved, state, run_dir


def param_groups(cfg: TrainConfig, model: nn.Module) -> list[dict]:
    """Weights get weight decay; BN parameters and biases none, and their own lr scale (timm's schedulers
    multiply a group's lr by its 'lr_scale'). Under Muon, the classifier takes the AdamW fallback."""
    weights, others, head = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1:
            others.append(param)
        elif cfg.optimizer == "muon" and name.startswith("head."):
            head.append(param)
        else:
            weights.append(param)
    groups = [{"params": weights, "weight_decay": cfg.weight_decay}]
    if head:
        groups.append({"params": head, "weight_decay": cfg.weight_decay, "use_fallback": True})
    if others:
        groups.append({"params": others, "weight_decay": 0.0, "lr_scale": cfg.bn_lr_scale})
    return groups


def build_optimizer(cfg: TrainConfig, model: nn.Module, lr_scale: float = 1) -> torch.optim.Optimizer:
    from timm.optim import create_optimizer_v2

    # timm's 'sgd' is Nesterov SGD; its 'muon' orthogonalizes conv/linear updates, AdamW for the rest.
    extra = {"nesterov": True} if cfg.optimizer == "muon" else {}
    optimizer = create_optimizer_v2(
        param_groups(cfg, model), opt=cfg.optimizer, lr=cfg.lr * lr_scale, weight_decay=cfg.weight_decay,
        momentum=cfg.momentum, **extra,
    )
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr * lr_scale * group.get("lr_scale", 1.0)
    return optimizer


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int, lr_scale: float = 1):
    """Linear warmup from warmup_lr to lr, then cosine (or linear) decay to min_lr, counted in steps."""
    from timm.scheduler import CosineLRScheduler, PolyLRScheduler

    total = cfg.epochs * steps_per_epoch
    warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total - 1)
    common = dict(
        t_initial=max(1, total - warmup),
        lr_min=cfg.min_lr * lr_scale,
        warmup_t=warmup,
        warmup_lr_init=cfg.warmup_lr * lr_scale,
        warmup_prefix=True,
        t_in_epochs=False,
    )
    if cfg.schedule == "linear":  # polynomial decay of power 1: a straight line to min_lr
        return PolyLRScheduler(optimizer, power=1.0, **common)
    return CosineLRScheduler(optimizer, **common)


def build_mixup(cfg: TrainConfig, num_classes: int):
    """timm's Mixup builds every target, mixed or not, so label smoothing is applied exactly once."""
    from timm.data import Mixup

    mixup = Mixup(
        mixup_alpha=cfg.mixup_alpha,
        cutmix_alpha=cfg.cutmix_alpha,
        prob=cfg.mix_prob,
        switch_prob=cfg.mix_switch_prob,
        mode="batch",
        label_smoothing=cfg.label_smoothing,
        num_classes=num_classes,
    )
    mixup.mixup_enabled = cfg.mixing
    return mixup


def use_channels_last(cfg: TrainConfig, device: torch.device, amp_dtype) -> bool:
    if cfg.channels_last != "auto":
        return cfg.channels_last == "on"
    # NHWC is what cuDNN's tensor-core kernels want; on the CPU (oneDNN, fp32) it measured 1.1-1.6x
    # faster for PreActResNet18 and ResNeXt-29 here too (torch 2.14, AVX2), grouped convs included.
    return True


class _NullWriter:
    """Stands in for TensorBoard's SummaryWriter on ranks other than 0."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class _StopFlag:
    """First Ctrl-C: finish the current step, save, exit. Second Ctrl-C: stop at once."""

    def __init__(self):
        self.stop = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handler(self, signum, frame):
        if self.stop:
            raise KeyboardInterrupt
        self.stop = True
        print("\ninterrupt: finishing this step, saving, then exiting (Ctrl-C again to stop at once)", file=sys.stderr)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


class Trainer:
    def __init__(self, cfg: TrainConfig, explicit: dict | None = None, out=print, command: str = ""):
        from .distributed import init_distributed

        self.command = command
        self.dist = init_distributed(cfg.device)
        self.out = out if self.dist.is_main else (lambda *a, **k: None)
        cfg, self.resume_state, resume_dir = resolve_resume(cfg, explicit or {})
        cfg.validate()
        self.cfg = cfg
        if self.resume_state is None:  # a resumed run keeps the settings it was saved with
            self._apply_profile(explicit or {})
        tune_malloc()
        seed_everything(cfg.seed)
        set_deterministic(cfg.deterministic)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(cfg.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        # Linear scaling rule (Goyal et al. 2017): the global batch grew world_size times. The config
        # keeps the unscaled values, so a resume under another world size scales afresh.
        self.lr_scale = self.dist.world_size if self.dist.enabled and cfg.scale_lr else 1
        self.amp_dtype = resolve_amp(cfg.amp, self.device)
        self.channels_last = use_channels_last(cfg, self.device, self.amp_dtype)
        from .distributed import broadcast_object

        name = cfg.run_name or broadcast_object(f"{cfg.model}-{datetime.now():%Y%m%d-%H%M%S}", self.dist)
        cfg.run_name = name
        self.dirs = RunDirs(name, Path(cfg.checkpoint_dir) / name, Path(cfg.log_dir) / name, Path(cfg.fig_dir) / name)

        self.data = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download, val_size=cfg.val_size, seed=cfg.seed)
        in_dtype = self.amp_dtype or torch.float32
        train_tf = BatchAugment(cfg.augment(), self.data.mean, self.data.std, in_dtype, self.channels_last)
        eval_tf = BatchAugment(None, self.data.mean, self.data.std, in_dtype, self.channels_last)
        self.train_loader = TensorLoader(
            self.data.train_images, self.data.train_labels, cfg.batch_size,
            train=True, transform=train_tf, device=self.device, seed=cfg.seed,
            rank=self.dist.rank, world_size=self.dist.world_size, alternate_flip=cfg.alt_flip,
        )
        eval_batch = max(cfg.batch_size, 500)
        shard = dict(rank=self.dist.rank, world_size=self.dist.world_size)
        self.test_loader = TensorLoader(
            self.data.test_images, self.data.test_labels, eval_batch, train=False, transform=eval_tf, device=self.device, **shard
        )
        self.val_loader = None
        if self.data.val_images is not None:
            self.val_loader = TensorLoader(
                self.data.val_images, self.data.val_labels, eval_batch, train=False, transform=eval_tf, device=self.device, **shard
            )
        self.steps_per_epoch = len(self.train_loader)
        if cfg.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.max_steps_per_epoch)

        self.model_args = {
            "num_classes": self.data.num_classes,
            "width_mult": cfg.width_mult,
            "drop_rate": cfg.drop_rate,
            "zero_init_residual": cfg.zero_init_residual,
        }
        model = create_model(cfg.model, **self.model_args)
        if cfg.pretrained and self.resume_state is None:
            from .hub import load_pretrained_into

            self.out(load_pretrained_into(model, cfg.model, cfg.pretrained))
        if cfg.whiten_stem and self.resume_state is None and not cfg.pretrained:
            whiten_stem_(model, self.data.train_images, self.data.mean, self.data.std)
        self.model = model.to(self.device, memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        if self.dist.enabled and cfg.sync_bn:
            if self.device.type == "cpu":
                raise ValueError("--sync-bn needs GPUs: PyTorch's SyncBatchNorm has no CPU kernel; drop --sync-bn")
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.optimizer = build_optimizer(cfg, self.model, self.lr_scale)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.steps_per_epoch, self.lr_scale)
        self.mixup = build_mixup(cfg, self.data.num_classes)
        from timm.loss import SoftTargetCrossEntropy
        from timm.utils import ModelEmaV3

        self.criterion = SoftTargetCrossEntropy()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup) if cfg.ema else None
        self.forward = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.dist.local_rank] if self.device.type == "cuda" else None
            self.forward = DistributedDataParallel(self.model, device_ids=ids)  # broadcasts rank 0's weights
            seed_everything(cfg.seed + self.dist.rank)  # different dropout masks on each rank
        if cfg.compile:
            self.forward = torch.compile(self.forward)
        self.reduce = None
        if self.dist.enabled:
            from .distributed import all_reduce_sum

            self.reduce = all_reduce_sum

        self.start_epoch, self.step, self.history = 0, 0, []
        self.best_metric, self.best_epoch = -1.0, -1
        self.resumed_mid_epoch = False
        if self.resume_state is not None:
            self._load_state(self.resume_state, resume_dir)

    def _apply_profile(self, explicit: dict) -> None:
        """optimize_system.py's measured winner, for every setting the user did not give explicitly."""
        from .optimize import load_profile

        profile = load_profile(self.cfg.profile, self.cfg.model, resolve_device(self.cfg.device), warn=self.out)
        if profile is None:
            return
        applied = {k: v for k, v in profile["settings"].items() if k not in explicit}
        if self.cfg.deterministic:
            applied.pop("compile", None)  # --deterministic always wins over the profile
        for key, value in applied.items():
            setattr(self.cfg, key, value)
        if profile.get("tf32") and not self.cfg.deterministic:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        self.out(f"using system profile {profile['path']} ({', '.join(f'{k}={v}' for k, v in applied.items()) or 'nothing new'}); "
                 "--profile off ignores it")

    # -- state ------------------------------------------------------------------------------------
    def _weights_metadata(self, epoch: int, result: EvalResult | None, split: str) -> dict:
        meta = {
            "model": self.cfg.model,
            "model_args": self.model_args,
            "classes": self.data.classes,
            "mean": list(self.data.mean),
            "std": list(self.data.std),
            "dataset": self.cfg.dataset,
            "data_dir": self.cfg.data_dir,
            "run": self.dirs.name,
            "epoch": epoch,
            "data_description": f"{self.cfg.dataset} test split ({len(self.data.test_labels)} images from {self.data.source})",
        }
        if self.command:
            meta["command"] = self.command
        if result is not None:
            meta[f"{split}_accuracy"] = round(result.accuracy, 4)
        return meta

    def _state(self, epoch: int) -> dict:
        return {
            "format": 1,
            "config": self.cfg.to_dict(),
            "epoch": epoch,
            "step": self.step,
            "model": unwrap_model(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "loader": self.train_loader.state_dict(),
            "rng": rng_state(),
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "history": self.history,
            "classes": self.data.classes,
            "mean": list(self.data.mean),
            "std": list(self.data.std),
            "model_args": self.model_args,
        }

    def _load_state(self, state: dict, run_dir: Path) -> None:
        if state["model_args"]["num_classes"] != self.data.num_classes:
            raise ValueError(f"{run_dir} was trained on {state['model_args']['num_classes']} classes, this data has {self.data.num_classes}")
        unwrap_model(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.module.load_state_dict(state["ema"])
        self.train_loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        self.start_epoch, self.step = int(state["epoch"]), int(state["step"])
        # The learning rate is a pure function of the step, so the schedule needs no saved state.
        self.scheduler.step_update(num_updates=self.step)
        self.best_metric, self.best_epoch = float(state["best_metric"]), int(state["best_epoch"])
        self.history = list(state["history"])
        self.resumed_mid_epoch = self.train_loader.batch > 0
        where = f"epoch {self.start_epoch + 1}" + (f", batch {self.train_loader.batch + 1}" if self.resumed_mid_epoch else "")
        self.out(f"resumed {run_dir} at {where} (step {self.step})")

    def save_last(self, epoch: int) -> None:
        """The training state first, then the weights: each file is replaced atomically."""
        if not self.dist.is_main:
            return
        save_state(self.dirs.checkpoints / "last.state.pt", self._state(epoch))
        last = self.history[-1] if self.history else {}
        meta = self._weights_metadata(epoch, None, "test")
        if "test_acc" in last:
            meta["test_accuracy"] = last["test_acc"]
        save_weights(self.dirs.checkpoints / "last.safetensors", unwrap_model(self.model).state_dict(), meta)
        if self.ema is not None:
            save_weights(self.dirs.checkpoints / "ema.safetensors", self.ema.module.state_dict(), {**meta, "ema": True})

    # -- loop -------------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg = self.cfg
        print_config(cfg, file=sys.stdout)
        self.out(self.data.summary())
        self.out(
            f"device {self.device}, precision {self.amp_dtype or torch.float32}, channels_last {self.channels_last}, "
            f"{self.steps_per_epoch} steps/epoch x {cfg.epochs} epochs"
        )
        selection = "validation split" if self.val_loader is not None else "TEST set (no --val-size given)"
        self.out(f"best checkpoint chosen on the {selection}")
        if self.dist.enabled:
            self.out(f"distributed: {self.dist.world_size} processes, global batch {cfg.batch_size * self.dist.world_size}, "
                     f"lr {cfg.lr * self.lr_scale:g}")
        from tqdm.auto import tqdm

        show = cfg.progress and self.dist.is_main
        if self.dist.is_main:  # only rank 0 writes logs, figures and checkpoints
            from torch.utils.tensorboard import SummaryWriter

            self.dirs.checkpoints.mkdir(parents=True, exist_ok=True)
            (self.dirs.checkpoints / "config.yaml").write_text(_yaml(cfg.to_dict()))
            self._write_augmented_grid()
            writer = SummaryWriter(str(self.dirs.logs), purge_step=self.step if self.step else None)
        else:
            writer = _NullWriter()
        epochs = tqdm(range(self.start_epoch, cfg.epochs), desc="epochs", disable=not show, initial=self.start_epoch, total=cfg.epochs)
        final: EvalResult | None = None
        with _StopFlag() as stop:
            for epoch in epochs:
                if not self.resumed_mid_epoch:
                    self.train_loader.set_epoch(epoch)
                self.resumed_mid_epoch = False
                self.mixup.mixup_enabled = cfg.mixing and epoch < cfg.epochs - cfg.mix_off_epochs
                epoch_start = time.perf_counter()
                train_loss, seconds, images = self._train_epoch(epoch, writer, stop, tqdm, show)
                if stop.stop:
                    self.save_last(epoch)
                    self.out(f"interrupted: saved {self.dirs.checkpoints}/last.state.pt; continue with "
                             f"python train.py --resume {self.dirs.checkpoints}")
                    self._write_curves()
                    writer.close()
                    raise KeyboardInterrupt
                final = self._end_epoch(epoch, train_loss, seconds, images, writer, epoch_start)
                epochs.set_postfix(test_acc=f"{final.accuracy:.2f}")
        writer.close()
        self._write_curves()
        if final is None:  # resumed a finished run
            final = evaluate(self.model, self.test_loader, self.data.num_classes, self.amp_dtype, self.reduce)
        return self._report(final)

    def _train_epoch(self, epoch: int, writer, stop: _StopFlag, tqdm, show: bool = True) -> tuple[float, float, int]:
        cfg = self.cfg
        model, opt = self.forward, self.optimizer
        self.model.train()
        first_batch = self.train_loader.batch
        total = self.steps_per_epoch - first_batch
        bar = tqdm(total=total, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=not show)
        loss_sum = torch.zeros((), device=self.device)
        window = torch.zeros((), device=self.device)
        n, n_window = 0, 0
        start = time.perf_counter()
        for i, (x, y) in enumerate(self.train_loader, start=first_batch):
            if i >= self.steps_per_epoch:
                break
            x, target = self.mixup(x, y)
            with autocast(self.device, self.amp_dtype):
                logits = model(x)
            loss = self.criterion(logits.float(), target)
            opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                self.scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.scaler.step(opt)
            self.scaler.update()
            self.step += 1
            self.scheduler.step_update(num_updates=self.step)
            if self.ema is not None:
                self.ema.update(self.model, step=self.step)
            loss_sum += loss.detach()
            window += loss.detach()
            n += 1
            n_window += 1
            bar.update(1)
            if self.step % cfg.log_interval == 0:
                value = (window / n_window).item()  # the only sync inside the epoch
                self._check_finite(value, epoch)
                writer.add_scalar("train/loss", value, self.step)
                writer.add_scalar("train/lr", opt.param_groups[0]["lr"], self.step)
                bar.set_postfix(loss=f"{value:.3f}", lr=f"{opt.param_groups[0]['lr']:.4f}")
                window.zero_()
                n_window = 0
            if stop.stop:
                break
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        bar.close()
        mean_loss = (loss_sum / max(n, 1)).item()
        self._check_finite(mean_loss, epoch)
        return mean_loss, seconds, n * cfg.batch_size

    def _check_finite(self, value: float, epoch: int) -> None:
        if not math.isfinite(value):
            raise NonFiniteLoss(
                f"training loss became {value} in epoch {epoch + 1} (step {self.step}); stopped without saving, "
                f"so {self.dirs.checkpoints}/last.* still holds the last good epoch. Lower --lr or set --grad-clip"
            )

    def _end_epoch(self, epoch: int, train_loss: float, seconds: float, images: int, writer, epoch_start: float) -> EvalResult:
        cfg, classes = self.cfg, self.data.classes
        k, amp, reduce = self.data.num_classes, self.amp_dtype, self.reduce
        test = evaluate(self.model, self.test_loader, k, amp, reduce)
        val = evaluate(self.model, self.val_loader, k, amp, reduce) if self.val_loader else None
        row = {
            "epoch": epoch + 1,
            "step": self.step,
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": round(train_loss, 6),
            "test_loss": round(test.loss, 6),
            "test_acc": round(test.accuracy, 4),
            "images_per_sec": round(images / max(seconds, 1e-9), 1),
            "epoch_seconds": round(seconds, 2),
            # wall time since the run began, evaluation included: what "time to accuracy" means
            "elapsed_seconds": round((self.history[-1]["elapsed_seconds"] if self.history else 0.0)
                                     + time.perf_counter() - epoch_start, 2),
        }
        writer.add_scalar("train/epoch_loss", train_loss, self.step)
        writer.add_scalar("train/lr", row["lr"], self.step)
        writer.add_scalar("test/loss", test.loss, self.step)
        writer.add_scalar("test/accuracy", test.accuracy, self.step)
        for c, acc in zip(classes, test.per_class):
            writer.add_scalar(f"test_per_class/{c}", acc, self.step)
        writer.add_scalar("perf/images_per_sec", row["images_per_sec"], self.step)
        writer.add_scalar("perf/epoch_seconds", seconds, self.step)
        if val is not None:
            row.update(val_loss=round(val.loss, 6), val_acc=round(val.accuracy, 4))
            writer.add_scalar("val/loss", val.loss, self.step)
            writer.add_scalar("val/accuracy", val.accuracy, self.step)
        ema_val = None
        if self.ema is not None:
            ema = evaluate(self.ema.module, self.test_loader, k, amp, reduce)
            row["ema_test_acc"] = round(ema.accuracy, 4)
            writer.add_scalar("test/ema_accuracy", ema.accuracy, self.step)
            if val is not None:
                ema_val = evaluate(self.ema.module, self.val_loader, k, amp, reduce)
                row["ema_val_acc"] = round(ema_val.accuracy, 4)
                writer.add_scalar("val/ema_accuracy", ema_val.accuracy, self.step)
        writer.flush()
        self.history.append(row)
        if self.dist.is_main:
            self._write_csv()

        chosen, split, weights = (val, "val", self.model) if val is not None else (test, "test", self.model)
        if ema_val is not None and ema_val.accuracy > val.accuracy:  # the better of raw/EMA, judged on val only
            chosen, weights = ema_val, self.ema.module
        if chosen.accuracy > self.best_metric:
            self.best_metric, self.best_epoch = chosen.accuracy, epoch + 1
            meta = self._weights_metadata(epoch + 1, chosen, split)
            meta["test_accuracy"] = round(test.accuracy if weights is self.model else ema.accuracy, 4)
            meta["ema"] = weights is not self.model
            if self.dist.is_main:
                save_weights(self.dirs.checkpoints / "best.safetensors", unwrap_model(weights).state_dict(), meta)
        self.train_loader.set_epoch(epoch + 1)  # the state saved is "start of the next epoch"
        self.save_last(epoch + 1)
        extra = f", val {val.accuracy:.2f}%" if val is not None else ""
        extra += f", EMA test acc {row['ema_test_acc']:.2f}%" if self.ema is not None else ""
        self.out(
            f"epoch {epoch + 1}/{cfg.epochs}: train loss {train_loss:.4f}, test loss {test.loss:.4f}, "
            f"test acc {test.accuracy:.2f}%{extra}, {row['images_per_sec']:.0f} img/s, {seconds:.1f}s"
        )
        return test

    # -- outputs ------------------------------------------------------------------------------------
    def _write_csv(self) -> None:
        self.dirs.logs.mkdir(parents=True, exist_ok=True)
        keys = list(dict.fromkeys(k for row in self.history for k in row))
        with open(self.dirs.logs / "metrics.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.history)

    def _write_augmented_grid(self) -> Path:
        """What the model sees, drawn without touching any RNG the training run uses."""
        import numpy as np

        from .plots import augmented_grid

        np_state = np.random.get_state()  # timm's Mixup draws from numpy's global RNG
        mix_prob = self.mixup.mix_prob
        try:
            n = min(32, len(self.train_loader.labels)) // 2 * 2  # Mixup pairs images: an even count
            pick = torch.randperm(len(self.train_loader.labels), generator=torch.Generator().manual_seed(self.cfg.seed))[:n]
            pick = pick.to(self.device)
            g = torch.Generator(device=self.device).manual_seed(self.cfg.seed + 12345)
            x = self.train_loader.transform(self.train_loader.images[pick], g)
            self.mixup.mix_prob = 1.0  # show the mixing itself, which the run applies to mix_prob of its batches
            x, target = self.mixup(x, self.train_loader.labels[pick])
        finally:
            self.mixup.mix_prob = mix_prob
            np.random.set_state(np_state)
        mean = torch.tensor(self.data.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.data.std, device=x.device).view(1, 3, 1, 1)
        title = "Augmented training images with their targets" + (
            f" (MixUp/CutMix shown; the run mixes {100 * mix_prob:.0f}% of batches)" if self.cfg.mixing else ""
        )
        return augmented_grid(x.float() * std + mean, target, self.data.classes, self.dirs.figures / "augmented_batch.png", title)

    def _write_curves(self) -> Path | None:
        if not self.history or not self.dist.is_main:
            return None
        from .plots import training_curves

        return training_curves(self.history, self.dirs.figures / "training_curves.png", title=self.dirs.name)

    def _report(self, final: EvalResult) -> dict:
        split = "validation" if self.val_loader is not None else "test"
        self.out(f"\nfinal test accuracy: {final.accuracy:.2f}% ({final.correct}/{final.total}), test loss {final.loss:.4f}")
        tta = self._tta_accuracy()
        if tta is not None:
            self.out(f"with {self.cfg.tta} TTA: {tta:.2f}% (the plain figure above is the headline)")
        self.out("per-class test accuracy:\n" + final.per_class_table(self.data.classes))
        self.out(f"best: {self.best_metric:.2f}% on the {split} split at epoch {self.best_epoch}")
        self.out(f"checkpoints: {self.dirs.checkpoints}/ (best.safetensors, last.safetensors, last.state.pt)")
        self.out(f"tensorboard: tensorboard --logdir={self.cfg.log_dir}/   (run {self.dirs.name})")
        self.out(f"figures:     {self.dirs.figures}/training_curves.png; metrics: {self.dirs.logs}/metrics.csv")
        return {
            "run": self.dirs.name,
            "checkpoint_dir": self.dirs.checkpoints,
            "log_dir": self.dirs.logs,
            "figure_dir": self.dirs.figures,
            "final": final,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "history": self.history,
            "tta_accuracy": tta,
        }

    def _tta_accuracy(self) -> float | None:
        """The final model's test accuracy averaged over the --tta views (None with --tta none)."""
        if self.cfg.tta == "none":
            return None
        probs, labels = predict_probs(self.model, self.test_loader, self.cfg.tta, self.amp_dtype)
        correct = (probs.argmax(dim=1) == labels).sum().double().to(self.device)
        total = torch.tensor(float(len(labels)), dtype=torch.float64, device=self.device)
        if self.reduce is not None:
            self.reduce(correct)
            self.reduce(total)
        return 100.0 * float(correct) / max(float(total), 1.0)


def _yaml(values: dict) -> str:
    import yaml

    return yaml.safe_dump(values, sort_keys=False)


def train(cfg: TrainConfig, explicit: dict | None = None, out=print, command: str = "") -> dict:
    return Trainer(cfg, explicit, out=out, command=command).fit()
