"""The optimization recipe's parts: parameter groups, optimizer, learning-rate schedule, MixUp/CutMix, EMA.

Each is built from the finished config by one function; timm supplies the algorithms.
"""

from __future__ import annotations

import inspect
from functools import lru_cache, partial
from unittest import mock

import timm
import timm.optim.muon as timm_muon
import torch
import torch.nn as nn
from timm.data import Mixup
from timm.optim import Muon, create_optimizer_v2
from timm.scheduler import CosineLRScheduler, PolyLRScheduler
from timm.utils import ModelEmaV3

from .config import TrainConfig
from .plan import PlannedSchedule, RunPlan


def param_groups(cfg: TrainConfig, model: nn.Module) -> list[dict]:
    """Weights get weight decay; BN parameters and biases none, and their own lr scale (timm's schedulers
    multiply a group's lr by its 'lr_scale'). The classifier's weights have their own group (under Muon: the AdamW fallback)."""
    weights, others, head = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1:
            others.append(param)
        elif name.startswith("head.") and (cfg.optimizer == "muon" or cfg.head_lr_scale != 1):
            head.append(param)  # its own group only where it differs: the groups of older checkpoints still load
        else:
            weights.append(param)
    groups = [{"params": weights, "weight_decay": cfg.weight_decay}]
    if head:
        fallback = {"use_fallback": True} if cfg.optimizer == "muon" else {}
        groups.append({"params": head, "weight_decay": cfg.weight_decay, "lr_scale": cfg.head_lr_scale, **fallback})
    if others:
        groups.append({"params": others, "weight_decay": 0.0, "lr_scale": cfg.bn_lr_scale})
    return groups


FUSED_KERNELS = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW, "adagrad": torch.optim.Adagrad}  # timm builds these
# --muon-ns-dtype, as spelled on the command line: the Gram form in fp32, timm's bf16 iteration, the Gram form in bf16 (restarted)
NS_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16-gram": torch.bfloat16}  # fp32 first: a slower bf16 is judged on its warm-up
GRAM_RESTART = 2  # below fp32 the Gram form forms X X^T again after 2 steps (why: newton_schulz)


class MuonNS(Muon):
    """timm's Muon with the dtype of its Newton-Schulz orthogonalization chosen (bf16 in timm, always).

    Written here because timm's optimizer passes no dtype to `zeropower_via_newtonschulz`: without bf16
    hardware bf16 is emulated and the step costs more than forward and backward together (2.2x slower
    steps on AVX2). In fp32, and in bf16 when `gram` (--muon-ns-dtype bf16-gram), the same iteration runs in its
    Gram form (`newton_schulz`). tests/test_precision.py fails if timm stops looking the function up where this patches it.
    """

    # GradScaler (fp16) hands this optimizer `grad_scale` and `found_inf` instead of reading found_inf on the
    # host to decide whether to step (a synchronization per step): the step is taken and undone on the device.
    _step_supports_amp_scaling = True

    def __init__(self, params, ns_dtype: torch.dtype = torch.bfloat16, gram: bool | None = None, fixed_norm: bool = False,
                 **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype
        self.gram = ns_dtype != torch.bfloat16 if gram is None else gram  # bf16: timm's own iteration unless asked
        self.fixed_norm = fixed_norm

    @torch.no_grad()
    def step(self, closure=None):
        found_inf = getattr(self, "found_inf", None)
        if found_inf is None:  # no GradScaler: a plain step
            return self._step(closure)
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        scale = getattr(self, "grad_scale", None)
        if scale is not None:  # the gradients are still scaled
            torch._foreach_div_([p.grad for p in params], scale.to(params[0].grad.dtype) if params else scale)
        before = {id(t): t.clone() for t in self._tensors(params)}
        result = self._step(closure)
        skip = found_inf > 0
        for t in self._tensors(params):  # state made by this step (the first) goes back to its zeros
            t.copy_(torch.where(skip, before.get(id(t), torch.zeros_like(t)), t))
        return result

    def _tensors(self, params) -> list[torch.Tensor]:
        """The parameters and every floating-point state tensor (momentum, Adam moments) a step changes, but the
        step counters a non-capturable group keeps on the host: a device value written into one is a copy to the
        host per tensor (36 synchronizations a step on a GPU). A skipped step still counts there."""
        host = {id(s) for g in self.param_groups if not (g.get("capturable") or g.get("fused")) for p in g["params"]
                if torch.is_tensor(s := self.state.get(p, {}).get("step"))}
        state = [v for p in params for k, v in self.state.get(p, {}).items()
                 if torch.is_tensor(v) and v.is_floating_point() and id(v) not in host and k != FIXED_NORM]
        return [*params, *state]

    def _step(self, closure=None):
        fixed = self._fixed_norms() if self.fixed_norm else []
        if not self.gram:  # timm's own bf16 iteration: nothing to change
            result = super().step(closure)
        else:
            with mock.patch.object(timm_muon, "zeropower_via_newtonschulz", partial(newton_schulz, dtype=self.ns_dtype)):
                result = super().step(closure)
        for param, norm in fixed:  # --muon-fixed-norm: back onto the sphere it started on (timm's AdamW ones aside)
            if self.state[param].get("use_muon", True):
                param.mul_(norm / param.norm().clamp_min(1e-12))
        return result

    def _fixed_norms(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(weight, its norm before the first step) for each matrix Muon updates; the norm is kept in the state, so a
        resumed run holds the same sphere (a skipped fp16 step leaves it: `_tensors` passes it by)."""
        pairs = []
        for group in self.param_groups:
            if group.get("use_fallback"):
                continue
            for param in group["params"]:
                if param.grad is None or param.ndim < 2:
                    continue
                state = self.state[param]
                if FIXED_NORM not in state:
                    state[FIXED_NORM] = param.detach().norm().clone()
                pairs.append((param, state[FIXED_NORM]))
        return pairs


FIXED_NORM = "fixed_norm"  # the state key of a weight's norm under --muon-fixed-norm


_ZEROPOWER = timm_muon.zeropower_via_newtonschulz


def newton_schulz(G, steps, coefficients, eps=timm_muon.MUON_EPS, safety_factor=1.0, dtype=torch.float32, scale_eps=False):
    """timm's Newton-Schulz iteration, in its Gram form for a wide matrix (n >= 2m), timm's own otherwise.

    Each step X <- (aI + bA + cA^2) X with A = X X^T is a polynomial P in A, so A <- P A P and Q <- P Q
    stay m x m and X is multiplied once at the end: for a 3x3 conv (n = 9 in) about half the FLOPs
    (bench/precision.py), and the same result to rounding (tests/test_precision.py). Below fp32, A's rounding gives it
    small negative eigenvalues that the polynomial blows up (a low-rank gradient's result off by 7-60x in bf16): X is
    multiplied and A formed again after GRAM_RESTART steps (Dao lab's stabilized Gram Newton-Schulz, 2026).
    """
    if G.ndim != 2 or scale_eps or max(G.shape) < 2 * min(G.shape):
        extra = (scale_eps,) if scale_eps else ()  # timm 1.0.21 has no scale_eps
        return _ZEROPOWER(G, steps, coefficients, eps, safety_factor, dtype, *extra)
    sequence = coefficients[:steps] + coefficients[-1:] * max(0, steps - len(coefficients))  # timm's padding
    X = G.to(dtype=dtype, copy=True)
    X = X.T if X.size(0) > X.size(1) else X
    X.div_(X.norm().mul(safety_factor).clamp_(min=eps))
    restart = len(sequence) if dtype.itemsize >= 4 else GRAM_RESTART
    for start in range(0, len(sequence), restart):
        A, Q = X @ X.T, None
        for a, b, c in sequence[start:start + restart]:
            P = torch.addmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
            P.diagonal().add_(a)
            Q = P if Q is None else P @ Q
            A = P @ A @ P
        X = Q @ X
    return X.T if G.size(0) > G.size(1) else X


def build_optimizer(cfg: TrainConfig, model: nn.Module, lr_scale: float = 1) -> torch.optim.Optimizer:
    groups, lr = param_groups(cfg, model), cfg.lr * lr_scale
    if cfg.optimizer == "muon":  # what timm's create_optimizer_v2('muon') builds, with the Newton-Schulz dtype
        # step counters on the GPU (a skipped fp16 step is undone there too), where timm's Muon offers it
        capturable = next(model.parameters()).is_cuda and "capturable" in inspect.signature(Muon).parameters
        name = ns_dtype_name(cfg)
        return MuonNS(groups, ns_dtype=NS_DTYPES[name], gram=name != "bf16", fixed_norm=cfg.muon_fixed_norm,
                      adjust_lr_fn=cfg.muon_adjust_lr, ns_coefficients=cfg.muon_ns_coefficients, **muon_algo(cfg), lr=lr,
                      weight_decay=cfg.weight_decay, momentum=cfg.momentum, nesterov=True, **({"capturable": True} if capturable else {}))
    # timm's 'sgd' is Nesterov SGD; every group starts at the base lr (the scheduler applies 'lr_scale').
    extra = {}
    if wants_fused(cfg.optimizer, next(model.parameters()).device):
        extra["fused"] = True  # one kernel for all parameters, and GradScaler's fp16 check stays on the GPU
    return create_optimizer_v2(groups, opt=cfg.optimizer, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, **extra)


def muon_algo(cfg: TrainConfig) -> dict:
    """timm's `algo` argument for --muon-algo: none for plain Muon (timm 1.0.21, the oldest admitted, has no such argument)."""
    if cfg.muon_algo == "muon":
        return {}
    if "algo" not in inspect.signature(Muon).parameters:
        raise ValueError(f"--muon-algo {cfg.muon_algo} needs a newer timm than this {timm.__version__}: pip install -U timm")
    return {"algo": cfg.muon_algo}


def wants_fused(name: str, device: torch.device) -> bool:
    """Fused kernels on a GPU, where the installed torch takes them (on a CPU its foreach kernels are as fast)."""
    return device.type == "cuda" and fused_refusal(name, device) is None


@lru_cache(maxsize=None)
def fused_refusal(name: str, device: torch.device) -> str | None:
    """None when the installed torch takes a fused step of `name` on `device`, else its reason, in one line.

    Tried on a one-element parameter, not read from a version list: torch 2.5.1 refuses fused Adagrad on
    CUDA ("requires all the params to be floating point Tensors of supported devices: ['cpu']"), 2.14 takes it."""
    if name not in FUSED_KERNELS:
        return f"torch has no fused {name}"
    try:
        param = torch.zeros(1, device=device, requires_grad=True)
        param.grad = torch.ones_like(param)
        FUSED_KERNELS[name]([param], lr=0.1, fused=True).step()
    except (RuntimeError, ValueError, TypeError, AssertionError) as err:
        return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return None


def ns_dtype_name(cfg: TrainConfig) -> str:
    """The resolved --muon-ns-dtype; 'auto' not yet timed (a Trainer built without from_config) is timm's bf16."""
    return "bf16" if cfg.muon_ns_dtype == "auto" else cfg.muon_ns_dtype


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, plan: RunPlan, lr_scale: float = 1) -> PlannedSchedule:
    """Linear warmup from warmup_lr to lr, then cosine (or linear) decay to min_lr, counted in steps of `plan`
    (a time budget's re-plans stretch the decay still to go: plan.RunPlan.schedule_step)."""
    total, warmup = plan.schedule_steps, plan.schedule_warmup  # the first plan's: a re-plan moves only the knots
    common = dict(
        t_initial=max(1, total - warmup),
        lr_min=cfg.min_lr * lr_scale,
        warmup_t=warmup,
        warmup_lr_init=cfg.warmup_lr * lr_scale,
        warmup_prefix=True,
        t_in_epochs=False,
    )
    if cfg.schedule == "linear":  # polynomial decay of power 1: a straight line to min_lr
        return PlannedSchedule(PolyLRScheduler(optimizer, power=1.0, **common), plan)
    return PlannedSchedule(CosineLRScheduler(optimizer, **common), plan)


def build_mixup(cfg: TrainConfig, num_classes: int):
    """timm's Mixup builds every target, mixed or not, so label smoothing is applied exactly once."""
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


class Lookahead:
    """airbench's Lookahead (Jordan 2024): every `every` steps a slow copy of the weights and BN statistics moves toward
    the network by 1 - decay, decay = base^every x (progress of the schedule)^3, and the network starts again from it;
    the plan's last step ends on the slow copy. Held in timm's EMA (its foreach lerp of parameters and buffers): timm's
    Lookahead wrapper has a fixed rate, leaves the BN statistics out and ends on the fast weights."""

    def __init__(self, model: nn.Module, plan: RunPlan, every: int = 5, base: float = 0.95):
        self.plan, self.every, self.base = plan, every, base
        self.slow = ModelEmaV3(model, decay=0.0)

    @torch.no_grad()
    def step(self, model: nn.Module, step: int) -> None:
        """After optimizer step `step`: on every `every`-th and the plan's last, the network goes back to the slow copy."""
        last = step >= self.plan.total_steps
        if step % self.every and not last:
            return
        if not last:  # the last step takes no update: the run ends on the slow weights (airbench's decay 1)
            self.slow.decay = self.base ** self.every * (self.plan.schedule_step(step) / self.plan.schedule_steps) ** 3
            self.slow.update(model)
        pairs = [(m, s) for m, s in zip(model.state_dict().values(), self.slow.module.state_dict().values()) if m.is_floating_point()]
        torch._foreach_copy_([m for m, _ in pairs], [s for _, s in pairs])

    def state_dict(self) -> dict:
        return self.slow.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.slow.module.load_state_dict(state)


def build_lookahead(cfg: TrainConfig, model: nn.Module, plan: RunPlan) -> Lookahead | None:
    return Lookahead(model, plan) if cfg.lookahead else None


def build_ema(cfg: TrainConfig, model: nn.Module) -> ModelEmaV3 | None:
    """timm's EMA of the weights; with ema_warmup its decay ramps up, so short runs profit from it too."""
    return ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup) if cfg.ema else None


__all__ = ["Lookahead", "MuonNS", "NS_DTYPES", "build_ema", "build_lookahead", "build_mixup", "build_optimizer", "build_scheduler",
           "fused_refusal", "ns_dtype_name", "param_groups", "wants_fused"]
