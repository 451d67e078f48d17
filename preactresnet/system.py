"""What this machine can do and the process-level settings that make it fast (and, if asked, exact)."""

from __future__ import annotations

import ctypes
import os
import platform
import random
from contextlib import nullcontext
from functools import lru_cache

import numpy as np
import torch


@lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """CPU feature flags from /proc/cpuinfo (empty where that file does not exist)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_bf16() -> bool:
    """True where the CPU computes bf16 natively (AVX512-BF16 or AMX): bf16 autocast then pays off."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def cpu_kind() -> str:
    """The kernels this process runs: the CPU's own kind, or the one ATEN_CPU_CAPABILITY/ONEDNN_MAX_CPU_ISA impose."""
    flags = cpu_flags()
    real = "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else "AVX512" if "avx512f" in flags else "AVX2"
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "")
    if os.environ.get("ATEN_CPU_CAPABILITY") or isa:
        emulated = {"AVX2": "AVX2", "AVX512_CORE_BF16": "AVX512-BF16"}.get(isa.upper(), isa or "?")
        return f"{emulated} kernels emulated on a {real} CPU (ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', '')}, ONEDNN_MAX_CPU_ISA={isa})"
    return f"{real} (real)"


def machine_description(device: torch.device) -> str:
    """Where a run trained, for the metadata of its weights: the GPU's name, or the CPU's and its kind."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {cpu_kind()}, {os.cpu_count()} cores"


def cuda_has_bf16(device: torch.device) -> bool:
    """True from Ampere (compute capability 8.0) on; V100/T4 report bf16 support but emulate it slowly."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def resolve_device(name: str = "auto") -> torch.device:
    """The device every entry point runs on. A GPU always comes with its index (cuda:N; for a bare 'cuda' the
    local rank's under torchrun, else 0, and 0 where a launcher (SLURM --gpus-per-task, Kubernetes, MPI) left the
    process one visible GPU) and is made current: torch.cuda.set_device refuses a bare 'cuda'."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:  # torch's message lists twenty device types; ours, the ones this package runs on
        raise ValueError(f"--device '{name}' is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but PyTorch sees no CUDA GPU; use --device cpu")
    count = torch.cuda.device_count()
    if dev.index is None:  # the local rank's GPU; a launcher that shows each process one GPU means that one
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if count > 1 else 0)
    if dev.index >= count:
        raise ValueError(f"--device {dev} was asked for, but PyTorch sees {count} GPU(s); use cuda:0 to cuda:{count - 1}")
    torch.cuda.set_device(dev)
    return dev


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """'auto' -> bf16 on GPUs from sm80, fp16 on older ones, fp32 (None) on a CPU. Training decides a CPU's
    'auto' by timing first (precision.py): CPU flags cannot tell whether bf16 is faster for a given net."""
    amp = amp.lower()
    if amp in ("off", "none", "fp32", "no", "false"):
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise ValueError("--amp fp16 needs a CUDA GPU; on the CPU use --amp bf16 or --amp off")
        return torch.float16
    if amp != "auto":
        raise ValueError(f"unknown --amp '{amp}'; use auto, bf16, fp16 or off")
    if device.type == "cuda":
        return torch.bfloat16 if cuda_has_bf16(device) else torch.float16
    return None


PRECISION_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "off"}  # as --amp spells them


def apply_process_settings(settings: dict, deterministic: bool) -> dict:
    """A profile's process-wide GPU settings (TF32 matmuls and convolutions, cudnn.benchmark); returns
    those it names, to be saved with the run and applied again on resume (a setting it does not name
    keeps PyTorch's and set_deterministic's choice). --deterministic wins."""
    wanted = {k: bool(settings[k]) for k in ("tf32", "cudnn_benchmark") if k in settings}
    if not deterministic:
        if wanted.get("tf32"):
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        if "cudnn_benchmark" in wanted:  # what was measured fastest, either way
            torch.backends.cudnn.benchmark = wanted["cudnn_benchmark"]
    return wanted


def autocast(device: torch.device, dtype: torch.dtype | None):
    """One mixed-precision context for the forward pass; a no-op when dtype is None."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def tune_malloc() -> bool:
    """Keep freed tensor memory in glibc's heap instead of returning it to the OS at every free.

    PyTorch's CPU allocator is plain malloc: without this, each multi-MB activation is mmap'ed and
    page-faulted anew on every step (measured here: augmentation 2-3x slower, all of it system time).
    Same effect as the jemalloc/tcmalloc preload that Intel recommends, without an extra library.
    """
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 256 << 20) == 1
        return ok and libc.mallopt(m_trim_threshold, 1 << 30) == 1
    except (OSError, AttributeError):
        return False


def flush_denormals(on: bool = True) -> bool:
    """Denormal floats as zero (x86 FTZ/DAZ; ARM's flush-to-zero) in this thread and in every thread it starts later,
    which inherit the setting: so before torch's first parallel op starts its thread pool (a pool already running
    keeps its own). Late in training the gradients and Muon's momentum hold denormals, each a slow microcode assist:
    a 15-minute run's last steps ran at 0.32x (bench/denormal.py). Returns whether the CPU supports it."""
    return torch.set_flush_denormal(on)


def compile_module(module: torch.nn.Module) -> torch.nn.Module:
    """torch.compile(module), with inductor's C++ vector width pinned in its config first (pin_vector_width)."""
    pin_vector_width()
    return torch.compile(module)


def pin_vector_width() -> None:
    """Inductor's cache key leaves out the vector ISA it writes C++ kernels for (torch 2.5-2.14): a kernel cached at
    AVX512's width and loaded at AVX2's (one cache dir shared by hosts of two kinds; on torch 2.14 also a run under
    ATEN_CPU_CAPABILITY=avx2 after one without) is rebuilt at the other width and gives wrong numbers (NaN in
    training) or corrupts the heap. cpp.simdlen is in the key: set to the width inductor picks anyway, each width gets
    its own cache entries. Left unset where no C++ compiler can tell the ISA."""
    from torch._inductor import config
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    if config.cpp.simdlen is None:
        try:
            config.cpp.simdlen = pick_vec_isa().bit_width()  # 0: no vector ISA (inductor then picks none, as before)
        except Exception:  # noqa: BLE001 - e.g. a GPU image without g++: its CPU kernels are inductor's own business
            pass


def process_age() -> float | None:
    """Seconds since this process started (read from /proc on Linux; None where there is none)."""
    try:
        after_name = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
        uptime = float(open("/proc/uptime").read().split()[0])
        return uptime - int(after_name[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime, in clock ticks
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic(on: bool) -> None:
    """Bit-exact repeat runs: deterministic kernels, no autotuning (slower on GPU)."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = not on and torch.cuda.is_available()


def rng_state() -> dict:
    """Every global RNG the training loop draws from, in a form torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
