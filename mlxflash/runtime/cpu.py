"""CPU-only speed-ups; the math is unchanged and Metal never takes these paths.

- MLX's CPU wheel for Linux carries the reference (netlib) BLAS: about 1.5 GFLOP/s. The CLI re-executes
  itself once with OpenBLAS preloaded (its cblas/BLAS symbols then win over the wheel's): the system's
  where Debian's is installed, else the one the `ngsolve-openblas` wheel ships (a dependency on Linux
  x86-64; DYNAMIC_ARCH, standard symbol names). That library needs libgfortran.so.5, which MLX's wheel
  ships under a mangled name; a link by the standard name in the user's cache lets the loader find it.
  MLXFLASH_BLAS=reference opts out.
- glibc's malloc serves blocks up to a threshold it raises as large blocks are freed (to 32 MB) from its
  heap, which it rarely gives back: a budgeted run's freed KV-cache and attention buffers then stay in
  RSS. `release_freed_memory` pins the threshold, so large blocks are mapped and unmapped.
- MLX's CPU `quantized_matmul` is a plain loop: fine for one token, slow for a prompt. With many rows,
  dequantizing the weight and calling the BLAS is tens of times faster.
"""

from __future__ import annotations

import ctypes.util
import hashlib
import importlib.util
import os
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .dtypes import f32_dequantize

SYSTEM_OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
WHEEL_OPENBLAS = "ngsolve_openblas"  # the importable name of PyPI's ngsolve-openblas
PRELOADED = "MLXFLASH_BLAS_PRELOADED"  # set in the re-executed process: never re-exec twice
MANY_ROWS = 8  # from here on, dequantize + BLAS beats the CPU quantized kernel
SLICE_ROWS = 4096


def blas_in_use(env: dict[str, str] | None = None) -> str:
    """The BLAS a process with environment `env` (default: this one's) runs MLX's CPU math on."""
    env = os.environ if env is None else env
    if sys.platform == "darwin":
        return "Accelerate"
    preloaded = env.get(PRELOADED, "")
    if WHEEL_OPENBLAS in preloaded:
        return "OpenBLAS (ngsolve-openblas wheel, preloaded)"
    if "openblas" in preloaded or "openblas" in env.get("LD_PRELOAD", ""):
        return "OpenBLAS (system, preloaded)"
    return "reference BLAS (MLX's CPU wheel)"


def _wheel_openblas() -> Path | None:
    spec = importlib.util.find_spec(WHEEL_OPENBLAS)  # found, not imported: its __init__ loads the library
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(spec.submodule_search_locations[0]).glob("libopenblas*.so*"))
    return found[0] if found else None


def _gfortran_folders() -> list[str] | None:
    """Folders that make `libgfortran.so.5` loadable: none where the system has it, else a link to the
    copy in MLX's wheel (and that wheel's folder, for the libquadmath it needs); None if there is none."""
    if ctypes.util.find_library("gfortran"):
        return []
    wheel_libs = Path(mx.__file__).resolve().parents[1] / "mlx_cpu.libs"
    copies = sorted(wheel_libs.glob("libgfortran-*.so.5*"))
    if not copies:
        return None
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlxflash" / "blas"
    links = cache / hashlib.sha1(str(copies[0].resolve()).encode()).hexdigest()[:12]  # one per MLX install
    link = links / "libgfortran.so.5"
    try:
        if not link.exists() or link.resolve() != copies[0].resolve():
            links.mkdir(parents=True, exist_ok=True)
            tmp = links / f".libgfortran.so.5.{os.getpid()}"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(copies[0])
            os.replace(tmp, link)  # atomic: a concurrent start sees the old link or the new one
    except OSError:
        return None
    return [str(links), str(wheel_libs)]


def openblas_preload() -> tuple[str, list[str]] | None:
    """(OpenBLAS library to preload, folders to add to the loader's path), or None where none is usable."""
    if os.path.exists(SYSTEM_OPENBLAS):
        return SYSTEM_OPENBLAS, []
    lib = _wheel_openblas()
    folders = _gfortran_folders() if lib else None
    return (str(lib), folders) if lib and folders is not None else None


def openblas_env(env: dict[str, str]) -> dict[str, str] | None:
    """`env` with OpenBLAS preloaded for a process started with it (Linux), or None where it already is,
    is opted out of (MLXFLASH_BLAS=reference) or none is usable."""
    if sys.platform != "linux" or env.get("MLXFLASH_BLAS") == "reference" or env.get(PRELOADED):
        return None
    if "openblas" in env.get("LD_PRELOAD", ""):
        return None
    found = openblas_preload()
    if found is None:
        return None
    lib, folders = found
    out = {**env, PRELOADED: lib, "LD_PRELOAD": f"{lib} {env.get('LD_PRELOAD', '')}".strip()}
    if folders:
        out["LD_LIBRARY_PATH"] = os.pathsep.join([*folders, *filter(None, [env.get("LD_LIBRARY_PATH")])])
    return out


def reexec_with_openblas() -> None:
    """Restart this process with OpenBLAS preloaded, once, where one is usable (Linux)."""
    env = openblas_env(dict(os.environ))
    if env is not None:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 128 << 10  # glibc's initial value, kept from then on


def release_freed_memory() -> None:
    """Have freed large blocks go back to the system: glibc on Linux; elsewhere (no glibc, no mallopt)
    the allocator keeps its default."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):
        pass


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def quantized_matmul(
    x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int
) -> mx.array:
    """x @ dequantize(w).T, the same product as mx.quantized_matmul(..., transpose=True)."""
    rows = x.size // x.shape[-1]
    if rows < MANY_ROWS or not on_cpu():
        return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits)
    # Dequantize a slice of output rows at a time (a 49k-token LM head would be 113 MB at once), still
    # lazily: each slice waits on the previous product, so only one is dequantized at a time, and a product
    # nobody evaluates (a prefill step's logits) costs nothing.
    parts: list[mx.array] = []
    for lo in range(0, w.shape[0], SLICE_ROWS):
        sl = slice(lo, lo + SLICE_ROWS)
        wq = w[sl] if not parts else mx.depends(w[sl], parts[-1])
        dense = f32_dequantize(wq, scales[sl], None if biases is None else biases[sl], group_size, bits, x.dtype)
        parts.append(x @ dense.T)
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)


def quantized_matmul_rows(
    x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int
) -> mx.array:
    """x (..., m) @ dequantize(w) (m, d), w quantized along d: mx.quantized_matmul(..., transpose=False).
    Prompts on the CPU dequantize the (bounded) rows once and multiply with BLAS, as above."""
    if x.size // x.shape[-1] < MANY_ROWS or not on_cpu():
        return mx.quantized_matmul(x, w, scales, biases, transpose=False, group_size=group_size, bits=bits)
    return x @ f32_dequantize(w, scales, biases, group_size, bits, x.dtype)


class PromptQuantizedLinear(nn.QuantizedLinear):
    """mlx-lm's QuantizedLinear, with prompts (many rows) routed through `quantized_matmul` above."""

    def __call__(self, x: mx.array) -> mx.array:
        if x.size // x.shape[-1] < MANY_ROWS or not on_cpu() or getattr(self, "mode", "affine") != "affine":
            return super().__call__(x)
        y = quantized_matmul(x, self["weight"], self["scales"], self.get("biases"), self.group_size, self.bits)
        return y + self["bias"] if "bias" in self else y


class PromptQuantizedEmbedding(nn.QuantizedEmbedding):
    """mlx-lm's tied LM head (`as_linear`) with the same CPU prompt path, and lookups dequantized in the
    compute dtype (the scales stay float16 in memory: runtime/dtypes.py)."""

    def __call__(self, x: mx.array) -> mx.array:
        if not on_cpu() or self.mode != "affine":
            return super().__call__(x)
        biases = self.get("biases")
        return f32_dequantize(
            self["weight"][x],
            self["scales"][x],
            None if biases is None else biases[x],
            self.group_size,
            self.bits,
            mx.float32,
        )

    def as_linear(self, x: mx.array) -> mx.array:
        if x.size // x.shape[-1] < MANY_ROWS or not on_cpu() or self.mode != "affine":
            return super().as_linear(x)
        return quantized_matmul(x, self["weight"], self["scales"], self.get("biases"), self.group_size, self.bits)


def speed_up_prompts(model: nn.Module) -> None:
    """Give `model`'s quantized layers the CPU prompt path (same parameters, same math)."""
    faster = {nn.QuantizedLinear: PromptQuantizedLinear, nn.QuantizedEmbedding: PromptQuantizedEmbedding}
    for _, module in model.named_modules():
        if type(module) in faster:
            module.__class__ = faster[type(module)]
