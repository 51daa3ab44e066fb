"""show_config(): what was built, what this machine offers, what will be used."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys

import torch

from . import backends


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def kernel_isa() -> str:
    """The instruction set of the native CPU kernel that runs here ("none" without the extension)."""
    mod = backends.cpu.load()
    return mod.gram_isa() if mod else "none"


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module in sys.modules without a __spec__
        return False


def optional_package(module: str, install: str, use: str = "") -> str:
    """"<module> <version> installed[ (<use>)]" when ``module`` is importable, else
    "missing — <install>" (found without importing it: ``info`` stays cheap)."""
    if not _importable(module):
        return f"missing — {install}"
    try:
        version = importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:  # importable from a path without package metadata
        version = "(version unknown)"
    return f"{module} {version} installed" + (f" ({use})" if use else "")


def cuda_device_status() -> str:
    """Whether torch sees a CUDA device and, where it does not, why: a CPU build of torch, or a CUDA
    build with no device visible (no GPU, no driver, or ``CUDA_VISIBLE_DEVICES`` hiding them)."""
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        name = torch.cuda.get_device_name(torch.cuda.current_device())
        return f"{n} CUDA device{'s' if n != 1 else ''} visible (current: {name})"
    hip = getattr(torch.version, "hip", None)
    if torch.version.cuda is None and not hip:
        return f"no CUDA device (torch {torch.__version__} is a CPU build)"
    build = f"ROCm {hip}" if hip else f"CUDA {torch.version.cuda}"
    return f"no CUDA device visible (torch {torch.__version__} is built for {build})"


_TRITON_INSTALL = "pip install 'rankme_fast[gpu]'"


def _backend_lines() -> dict:
    """One line per backend. torch and cpu: as they run on CPU tensors. cuda and triton: as they run on
    the current CUDA device, or — without one — why there is none (saying that the CUDA kernels cannot
    read CPU memory would be true but answers no question a user has)."""
    out = backends.describe()
    if torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
        for name in ("cuda", "triton"):
            ok, why = backends.BACKENDS[name].available(dev)
            out[name] = f"available on {dev}" + (f" ({why})" if why else "") if ok else f"unavailable on {dev}: {why}"
        if not _importable("triton"):
            out["triton"] += "; triton " + optional_package("triton", _TRITON_INSTALL)
        return out
    none = cuda_device_status()
    out["cuda"] = none
    if not out["triton"].startswith("available"):  # TRITON_INTERPRET=1 makes it available on CPU
        have = optional_package("triton", _TRITON_INSTALL, "TRITON_INTERPRET=1 runs its kernels on CPU")
        out["triton"] = f"{none}; " + (have if have.startswith("triton") else "triton " + have)
    return out


def config() -> dict:
    info: dict = {
        "rankme_fast": __import__("rankme_fast").__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        from . import _build_info as b  # noqa: PLC0415

        info["build"] = {
            "cxx_compiler": b.cxx_compiler,
            "build_type": b.build_type,
            "cpu_isa_variants": list(b.cpu_isa_variants),
            "cuda_option": b.cuda_option,
            "cuda_built": b.cuda_built,
            "cuda_compiler_version": b.cuda_compiler_version,
            "cuda_architectures": b.cuda_architectures,
        }
    except ImportError:
        info["build"] = "no build info (running from a source tree without a compiled build)"
    mod = backends.cpu.load()
    forced = os.environ.get("RANKME_FAST_ISA", "").strip()
    info["cpu_extension"] = (f"loaded, kernel isa={mod.gram_isa()}" + (" (forced by RANKME_FAST_ISA)" if forced else "")
                             if mod else f"missing ({backends.cpu.load_error()})")
    if isinstance(info["build"], dict) and info["build"]["cuda_built"]:
        try:
            from . import _C_cuda  # noqa: PLC0415

            info["cuda_extension"] = f"loaded, runtime {_C_cuda.runtime_version()}, devices {_C_cuda.device_count()}"
        except ImportError as exc:
            info["cuda_extension"] = f"built but not importable ({exc})"
    else:
        info["cuda_extension"] = "not built"
    info["backends"] = _backend_lines()
    info["file_formats"] = {
        ".npy": f"built in (read with preadv; O_DIRECT for chunks not in the page cache: RANKME_FAST_DIRECT_IO={os.environ.get('RANKME_FAST_DIRECT_IO', 'auto')})",
        ".safetensors": "built in (header parsed by rankme_fast; bfloat16 supported)",
        ".pt/.pth": "built in (torch.load weights_only=True)",
        ".h5/.hdf5": optional_package("h5py", "pip install 'rankme_fast[hdf5]'"),
        ".zarr": optional_package("zarr", "pip install 'rankme_fast[zarr]'"),
        "progress bar": optional_package("tqdm", "pip install tqdm", "shown on stderr when it is a terminal"),
    }
    env = os.environ.get(backends.ENV_VAR)
    try:
        chosen = backends.select(None, torch.device("cpu")).NAME
    except (RuntimeError, ValueError) as exc:
        chosen = f"error: {exc}"
    info["backend_for_cpu_tensors"] = chosen + (f" (from {backends.ENV_VAR}={env})" if env else " (auto)")
    table = backends.dispatch_table()
    info["gpu_dispatch"] = {"measured": table["measured"], "source": table["source"],
                            "exact_order": table["order"]["exact"], "fast_order": table["order"]["fast"]}
    if torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
        info["gpu"] = torch.cuda.get_device_name(dev)
        info["gpu_backends"] = backends.describe(dev)
        try:
            info["backend_for_cuda_tensors"] = {
                str(dt).replace("torch.", ""): backends.select(None, dev, dtype=dt, shape=(1 << 20, 1024)).NAME
                for dt in (torch.float32, torch.bfloat16, torch.float64)}
        except (RuntimeError, ValueError) as exc:
            info["backend_for_cuda_tensors"] = f"error: {exc}"
    else:
        info["gpu"] = cuda_device_status()
    return info


def show_config(file=None) -> None:
    """Print the build configuration and the backend that will be used for CPU tensors."""
    out = file or sys.stdout
    for k, v in config().items():
        if isinstance(v, dict):
            print(f"{k}:", file=out)
            for k2, v2 in v.items():
                print(f"  {k2}: {v2}", file=out)
        else:
            print(f"{k}: {v}", file=out)
