"""`--conv-wgrad auto`: a CPU step may compute a convolution's weight gradient as one matmul, where that is faster here.

oneDNN's bf16 weight-gradient kernel is slow on small feature maps: on a 2-core Xeon with AMX (2026-12-06) a 256->256
3x3 conv on 4x4 maps at batch 128 took 8.1 ms for its weight gradient against 1.9 ms for its forward, while the same
gradient as the product of the output gradient with the input's k*k shifted windows took 3.3 ms. Which is faster
depends on the layer's shape and the CPU, so each distinct conv shape of the run is timed both ways once (about a
second in all) and cached beside the precision figures; the layers where the matmul wins by MARGIN get it. The
weights, their names and the forward pass are unchanged: only the backward pass of those layers differs.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from datetime import datetime, timezone

import torch
import torch.nn as nn
import torch.nn.functional as F

from .distributed import DistInfo, broadcast_object
from .precision import cache_path, machine_key, read_cache, write_cache
from .system import cpu_name

MARGIN = 1.1  # the matmul must be 10% faster: closer than that, two timings of one kernel differ as much
TIMED_SECONDS, MIN_CALLS = 0.08, 5  # per candidate and shape, after one untimed call


def weight_grad_mm(grad: torch.Tensor, x: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """conv2d's weight gradient as grad (B*Ho*Wo, Cout)^T @ windows (B*Ho*Wo, k*k*Cin), in channels-last order."""
    cout, ho, wo = grad.shape[1:]
    xp = F.pad(x, (padding,) * 4).permute(0, 2, 3, 1)  # B, H, W, C
    span_h, span_w = stride * (ho - 1) + 1, stride * (wo - 1) + 1
    windows = torch.cat([xp[:, i:i + span_h:stride, j:j + span_w:stride] for i in range(kernel) for j in range(kernel)], dim=-1)
    g = grad.permute(0, 2, 3, 1).reshape(-1, cout)
    w = g.t() @ windows.reshape(g.shape[0], -1)
    return w.reshape(cout, kernel, kernel, -1).permute(0, 3, 1, 2)


def onednn_grads(grad, x, weight, stride: int, padding: int, mask: list[bool]) -> tuple:
    """aten's conv2d backward (oneDNN on a CPU) for (input, weight, bias) as `mask` asks."""
    return torch.ops.aten.convolution_backward(grad, x, weight, None, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], 1, mask)


class _MatmulWeightGrad(torch.autograd.Function):
    """conv2d (square kernel, stride and padding, no bias, no groups) whose backward takes its weight gradient by matmul."""

    @staticmethod
    def forward(ctx, x, weight, stride: int, padding: int):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding = stride, padding
        return F.conv2d(x, weight, None, stride, padding)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        s, p = ctx.stride, ctx.padding
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = onednn_grads(grad, x, weight, s, p, [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad_mm(grad, x, weight.shape[-1], s, p)
        return grad_x, grad_w, None, None


class MatmulGradConv2d(nn.Conv2d):
    """An nn.Conv2d (same weight, same state_dict) whose weight gradient is one matmul (`weight_grad_mm`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if torch.is_autocast_enabled(x.device.type):  # cast as autocast would, then run the Function outside it
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            return _MatmulWeightGrad.apply(x, weight, self.stride[0], self.padding[0])


def eligible(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.bias is None and conv.groups == 1 and conv.dilation == (1, 1)
            and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)
            and len(set(conv.kernel_size)) == 1 and len(set(conv.stride)) == 1 and len(set(conv.padding)) == 1)


def conv_inputs(model: nn.Module, image: tuple[int, int, int], batch: int) -> dict[str, tuple]:
    """Each eligible conv's name -> its shape key (batch, Cin, H, W, Cout, k, stride, padding), from one forward pass."""
    found, hooks = {}, []
    for name, conv in model.named_modules():
        if eligible(conv):
            def hook(mod, args, name=name):
                found[name] = (batch, *args[0].shape[1:], mod.out_channels, mod.kernel_size[0], mod.stride[0], mod.padding[0])
            hooks.append(conv.register_forward_pre_hook(hook))
    param, training = next(model.parameters()), model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, *image, device=param.device, dtype=param.dtype))  # eval: BN statistics untouched
    finally:
        model.train(training)
        for h in hooks:
            h.remove()
    return found


def _seconds(fn: Callable[[], object], clock=time.perf_counter) -> float:
    fn()  # untimed: first-call allocations
    calls, start = 0, clock()
    while calls < MIN_CALLS or clock() - start < TIMED_SECONDS:
        fn()
        calls += 1
    return (clock() - start) / calls


def time_shape(shape: tuple, dtype: torch.dtype, channels_last: bool) -> dict[str, float]:
    """Milliseconds of one weight gradient of a conv of `shape` (conv_inputs' key): oneDNN's ("aten") and the matmul."""
    b, cin, h, w, cout, k, s, p = shape
    layout = torch.channels_last if channels_last else torch.contiguous_format
    g = torch.Generator().manual_seed(0)  # not the seeded stream: a run that times must draw what a cached one draws
    x = torch.randn(b, cin, h, w, dtype=dtype, generator=g).to(memory_format=layout)
    weight = torch.randn(cout, cin, k, k, dtype=dtype, generator=g).to(memory_format=layout)
    grad = torch.randn(F.conv2d(x, weight, None, s, p).shape, dtype=dtype, generator=g).to(memory_format=layout)
    aten = lambda: onednn_grads(grad, x, weight, s, p, [False, True, False])
    return {"aten": 1000 * _seconds(aten), "matmul": 1000 * _seconds(lambda: weight_grad_mm(grad, x, k, s, p))}


def shape_key(shape: tuple, dtype: torch.dtype, channels_last: bool) -> str:
    b, cin, h, w, cout, k, s, p = shape
    return (f"conv-wgrad | {machine_key(cpu_name())} | {str(dtype).removeprefix('torch.')} channels_last={channels_last} | "
            f"batch={b} {cin}->{cout} {h}x{w} k{k} s{s} p{p}")


def choose_matmul(model: nn.Module, image: tuple, batch: int, dtype: torch.dtype, channels_last: bool,
                  timer=time_shape) -> tuple[set[str], str]:
    """The eligible convs whose weight gradient is faster by matmul here (timed per shape, cached), and a line saying so."""
    shapes, path = conv_inputs(model, image, batch), cache_path()
    cache, timed = read_cache(path), 0
    figures = {}
    for shape in sorted(set(shapes.values())):
        key = shape_key(shape, dtype, channels_last)
        if key not in cache:
            cache[key] = {**timer(shape, dtype, channels_last), "measured": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            write_cache(path, key, cache[key])  # each as it is timed: an interrupted start keeps what it found
            timed += 1
        figures[shape] = cache[key]
    faster = {shape for shape, f in figures.items() if f["aten"] >= MARGIN * f["matmul"]}
    chosen = {name for name, shape in shapes.items() if shape in faster}
    ms = lambda use: sum(figures[s]["matmul" if s in faster and use else "aten"] for s in shapes.values())
    where = f"timed {timed} shapes here" if timed else "cached"
    return chosen, (f"--conv-wgrad auto: matmul for {len(chosen)} of {len(shapes)} convs' weight gradients "
                    f"({ms(False):.1f} ms a step with oneDNN's, {ms(True):.1f} ms as chosen; {where}, {path})")


def use_matmul(model: nn.Module, names: set[str]) -> nn.Module:
    """Switch the named convs to MatmulGradConv2d in place (same parameters, same state_dict)."""
    for name, module in model.named_modules():
        if name in names:
            module.__class__ = MatmulGradConv2d
    return model


def ddp_compile_refuses_matmul() -> bool:
    """Whether this torch's compiled DDP refuses MatmulGradConv2d: its DDPOptimizer raised on any higher-order op (as
    a traced autograd.Function is) until a later release took them (seen: 2.5.1 raises, 2.14.1 takes them). Read
    from the code that raises, not from a version number."""
    import torch._dynamo

    if not torch._dynamo.config.optimize_ddp:  # no DDPOptimizer: one graph, which takes the Function
        return False
    try:
        from torch._dynamo.backends.distributed import DDPOptimizer

        return "has_higher_order_op" in inspect.unwrap(DDPOptimizer.compile_fn).__code__.co_names
    except Exception:  # noqa: BLE001 - moved or wrapped in a later torch: oneDNN's gradient costs speed, a refusal the run
        return True


def use_aten(model: nn.Module) -> int:
    """Switch every MatmulGradConv2d back to nn.Conv2d (oneDNN's weight gradient) in place; how many there were."""
    switched = [m for m in model.modules() if type(m) is MatmulGradConv2d]
    for module in switched:
        module.__class__ = nn.Conv2d
    return len(switched)


def configure(model: nn.Module, setting: str, image: tuple, batch: int, dtype: torch.dtype | None, channels_last: bool,
              dist: DistInfo) -> str:
    """Apply --conv-wgrad to a CPU model (under torchrun rank 0 times and the others follow)."""
    if setting == "matmul":
        names = set(conv_inputs(model, image, batch))
        line = f"--conv-wgrad matmul: {len(names)} convs' weight gradients by matmul"
    else:
        names, line = choose_matmul(model, image, batch, dtype or torch.float32, channels_last) if dist.is_main else (set(), "")
        names = broadcast_object(names, dist)
    use_matmul(model, names)
    return line
