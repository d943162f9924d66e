"""The native (C++) operator library: loader, build driver and the ``backend="native"`` step functions.

The library ``libcg4ctr_ops`` (sources in the repository's ``kernels/`` folder, built by the root
``CMakeLists.txt``) registers the ``torch.ops.cg4ctr`` operators: the five fused step ops (CPU kernels,
and CUDA kernels when built against a CUDA torch with a CUDA toolkit) and the product composite.

* :func:`library_path`: where the library is looked for: ``cg4ctr_fast/kernels/_lib/`` in the source
  tree, or the file named by the environment variable ``CG4CTR_NATIVE_LIB``.
* :func:`load`: loads it once (``torch.ops.load_library``); raises :class:`NativeUnavailableError` with
  a one-line message naming ``make native`` when it is missing or does not load.
* :func:`native_unavailable_reason`: None when the library loads, else that message.
* ``<name>_native``: the step functions, with exactly the signatures and results of the torch references
  (:mod:`cg4ctr_fast.kernels.reference`), and :func:`composite_native` / :func:`composite_float_native`.
* :func:`build` / ``cg4ctr-native build`` (``python -m cg4ctr_fast.kernels.native build``): cmake
  configure + build + install into :func:`library_path`; ``cg4ctr-native info`` reports the build.

Importing this module loads nothing; ``import cg4ctr_fast`` and :mod:`cg4ctr_fast.kernels.step` never
import it until a step runs with ``backend="native"``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from ._layout import check_out, check_step_noise, prepare

__all__ = [
    "NativeUnavailableError",
    "build",
    "composite_float_native",
    "composite_native",
    "ddim_step_native",
    "dpm_solver_step_native",
    "euler_step_native",
    "lcm_step_native",
    "library_path",
    "load",
    "main",
    "native_unavailable_reason",
    "tcd_step_native",
]

ENV_LIB = "CG4CTR_NATIVE_LIB"
LIB_STEM = "cg4ctr_ops"
_PACKAGE_DIR = Path(__file__).resolve().parent
_SOURCE_ROOT = _PACKAGE_DIR.parents[1]  # the repository root in a source checkout (editable install)


class NativeUnavailableError(RuntimeError):
    """The native library is not built, or does not load; the message is one line naming ``make native``."""


def _lib_filename() -> str:
    if sys.platform == "darwin":
        return f"lib{LIB_STEM}.dylib"
    if sys.platform == "win32":
        return f"{LIB_STEM}.dll"
    return f"lib{LIB_STEM}.so"


def library_path() -> Path:
    """Path of the native library: ``$CG4CTR_NATIVE_LIB`` when set, else ``cg4ctr_fast/kernels/_lib/<lib>``.

    The file need not exist (see :func:`native_unavailable_reason`)."""
    env = os.environ.get(ENV_LIB)
    if env:
        return Path(env).expanduser()
    return _PACKAGE_DIR / "_lib" / _lib_filename()


def _build_info_path(lib: Path) -> Path:
    return lib.with_name(lib.name + ".build.txt")


_load_lock = threading.Lock()
_loaded: Path | None = None


def load() -> Path:
    """Load the native library once per process (thread-safe) and return its path.

    Raises :class:`NativeUnavailableError` (one line, naming ``make native``) when the file is missing or
    fails to load (e.g. built against another torch)."""
    global _loaded
    if _loaded is not None:
        return _loaded
    with _load_lock:
        if _loaded is not None:
            return _loaded
        path = library_path()
        if not path.is_file():
            named = f", named by ${ENV_LIB}" if os.environ.get(ENV_LIB) else ""
            raise NativeUnavailableError(f"native step ops are not built: run `make native` (no library at {path}{named})")
        try:
            torch.ops.load_library(str(path))
        except Exception as exc:  # OSError from dlopen, RuntimeError from a schema clash
            detail = " ".join(str(exc).split())[:300]
            raise NativeUnavailableError(
                f"native step ops at {path} do not load ({type(exc).__name__}: {detail}); rebuild with `make native`"
            ) from None
        _register_fakes()
        _loaded = path
        return path


def native_unavailable_reason() -> str | None:
    """None when the native library is loaded or loads now, else the one-line reason (loads it if it can)."""
    try:
        load()
    except NativeUnavailableError as exc:
        return str(exc)
    return None


def _register_fakes() -> None:
    """Shape-only implementations, so torch.compile / FakeTensor tracing can pass through the ops."""
    register = getattr(torch.library, "register_fake", None)
    if register is None:
        return

    def no_result(*args, **kwargs):  # the step ops write into their out tensors and return nothing
        return None

    try:
        for name in ("ddim_step", "euler_step", "dpm_solver_step", "lcm_step", "tcd_step"):
            register(f"cg4ctr::{name}")(no_result)
        register("cg4ctr::composite")(lambda original, generated, weights: torch.empty_like(original))
        register("cg4ctr::composite_float")(lambda original, generated, weights: torch.empty_like(generated))
    except RuntimeError:  # already registered (a second library copy in the process)
        pass


def _ops():
    load()
    return torch.ops.cg4ctr


def _check_no_grad(lay) -> None:
    # The ops have no backward: an output silently cut from the graph would train nothing without a word.
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in
                                       (lay.model_output, lay.sample, lay.mask, lay.image_latents, lay.noise)):
        raise RuntimeError("native step ops have no autograd: run them under torch.no_grad() or "
                           "torch.inference_mode(), or use backend='torch' to differentiate through the step")


def _opt(x: float | None) -> float | None:
    return None if x is None else float(x)


# ---------------------------------------------------------------------------------------------
# Step functions: the signatures and results of reference.<name>_ref (see there for the math).


def ddim_step_native(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    *,
    guidance_scale: float | None,
    x0_sample: float,
    x0_model: float,
    eps_sample: float,
    eps_model: float,
    prev_x0: float,
    prev_eps: float,
    clip_range: float | None = None,
    mask: torch.Tensor | None = None,
    image_latents: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    init_image: float = 1.0,
    init_noise: float = 0.0,
    out: torch.Tensor | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """:func:`~cg4ctr_fast.kernels.reference.ddim_step_ref` as one native pass; returns ``out``
    (sample's shape and dtype). Raises ValueError/TypeError for bad shapes/dtypes (as the reference),
    :class:`NativeUnavailableError` when the library is not built."""
    del block_size
    ops = _ops()
    lay = prepare(model_output, sample, guidance_scale, mask, image_latents, noise)
    _check_no_grad(lay)
    out = check_out(out, lay.sample, lay.sample.dtype)
    ops.ddim_step(lay.model_output, lay.sample, _opt(guidance_scale), float(x0_sample), float(x0_model),
                  float(eps_sample), float(eps_model), float(prev_x0), float(prev_eps), _opt(clip_range),
                  lay.mask, lay.image_latents, lay.noise, float(init_image), float(init_noise), out)
    return out


def euler_step_native(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    *,
    guidance_scale: float | None,
    x0_sample: float,
    x0_model: float,
    sigma_hat: float,
    dt: float,
    mask: torch.Tensor | None = None,
    image_latents: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    init_image: float = 1.0,
    init_noise: float = 0.0,
    out: torch.Tensor | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """:func:`~cg4ctr_fast.kernels.reference.euler_step_ref` as one native pass; returns ``out``."""
    del block_size
    ops = _ops()
    lay = prepare(model_output, sample, guidance_scale, mask, image_latents, noise)
    _check_no_grad(lay)
    out = check_out(out, lay.sample, lay.sample.dtype)
    ops.euler_step(lay.model_output, lay.sample, _opt(guidance_scale), float(x0_sample), float(x0_model),
                   float(sigma_hat), float(dt), lay.mask, lay.image_latents, lay.noise, float(init_image),
                   float(init_noise), out)
    return out


def dpm_solver_step_native(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    *,
    guidance_scale: float | None,
    x0_sample: float,
    x0_model: float,
    coef_sample: float,
    coef_x0: float,
    coef_diff: float = 0.0,
    prev_x0: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    image_latents: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    init_image: float = 1.0,
    init_noise: float = 0.0,
    out: torch.Tensor | None = None,
    x0_out: torch.Tensor | None = None,
    block_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~cg4ctr_fast.kernels.reference.dpm_solver_step_ref` as one native pass; returns
    ``(out, x0_out)`` (x0_out in model_output's dtype)."""
    del block_size
    ops = _ops()
    lay = prepare(model_output, sample, guidance_scale, mask, image_latents, noise)
    _check_no_grad(lay)
    out = check_out(out, lay.sample, lay.sample.dtype)
    x0_out = check_out(x0_out, lay.sample, lay.model_output.dtype, "x0_out")
    if prev_x0 is not None:
        if tuple(prev_x0.shape) != tuple(lay.sample.shape) or prev_x0.device != lay.sample.device:
            raise ValueError(f"prev_x0 shape {tuple(prev_x0.shape)} must equal sample shape {tuple(lay.sample.shape)}")
        prev_x0 = prev_x0.contiguous()
    ops.dpm_solver_step(lay.model_output, lay.sample, _opt(guidance_scale), float(x0_sample), float(x0_model),
                        float(coef_sample), float(coef_x0), float(coef_diff), prev_x0, lay.mask,
                        lay.image_latents, lay.noise, float(init_image), float(init_noise), out, x0_out)
    return out, x0_out


def lcm_step_native(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    *,
    guidance_scale: float | None,
    x0_sample: float,
    x0_model: float,
    c_skip: float,
    c_out: float,
    prev_denoised: float = 1.0,
    prev_noise: float = 0.0,
    step_noise: torch.Tensor | None = None,
    clip_range: float | None = None,
    mask: torch.Tensor | None = None,
    image_latents: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    init_image: float = 1.0,
    init_noise: float = 0.0,
    out: torch.Tensor | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """:func:`~cg4ctr_fast.kernels.reference.lcm_step_ref` as one native pass; returns ``out``."""
    del block_size
    ops = _ops()
    lay = prepare(model_output, sample, guidance_scale, mask, image_latents, noise)
    _check_no_grad(lay)
    out = check_out(out, lay.sample, lay.sample.dtype)
    step_noise = check_step_noise(step_noise, lay.sample)
    ops.lcm_step(lay.model_output, lay.sample, _opt(guidance_scale), float(x0_sample), float(x0_model),
                 float(c_skip), float(c_out), float(prev_denoised), float(prev_noise), step_noise,
                 _opt(clip_range), lay.mask, lay.image_latents, lay.noise, float(init_image), float(init_noise), out)
    return out


def tcd_step_native(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    *,
    guidance_scale: float | None,
    x0_sample: float,
    x0_model: float,
    eps_sample: float,
    eps_model: float,
    noised_x0: float,
    noised_eps: float,
    prev_noised: float = 1.0,
    prev_noise: float = 0.0,
    step_noise: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    image_latents: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    init_image: float = 1.0,
    init_noise: float = 0.0,
    out: torch.Tensor | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """:func:`~cg4ctr_fast.kernels.reference.tcd_step_ref` as one native pass; returns ``out``."""
    del block_size
    ops = _ops()
    lay = prepare(model_output, sample, guidance_scale, mask, image_latents, noise)
    _check_no_grad(lay)
    out = check_out(out, lay.sample, lay.sample.dtype)
    step_noise = check_step_noise(step_noise, lay.sample)
    ops.tcd_step(lay.model_output, lay.sample, _opt(guidance_scale), float(x0_sample), float(x0_model),
                 float(eps_sample), float(eps_model), float(noised_x0), float(noised_eps), float(prev_noised),
                 float(prev_noise), step_noise, lay.mask, lay.image_latents, lay.noise, float(init_image),
                 float(init_noise), out)
    return out


# ---------------------------------------------------------------------------------------------
# Composite (the arithmetic of cg4ctr_fast.imaging.composite / composite_float).


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    arr = np.asarray(x)
    if not arr.flags.writeable:  # e.g. np.asarray(PIL image): torch wants a writable buffer to share
        arr = arr.copy()
    return torch.from_numpy(np.ascontiguousarray(arr))


def _composite_inputs(original, generated, weights, generated_dtype: torch.dtype, name: str):
    original, generated, weights = _as_tensor(original), _as_tensor(generated), _as_tensor(weights)
    if original.dtype != torch.uint8 or weights.dtype != torch.uint8:
        raise TypeError(f"{name}: original and weights must be uint8, got {original.dtype} and {weights.dtype}")
    if generated.dtype != generated_dtype:
        raise TypeError(f"{name}: generated must be {generated_dtype}, got {generated.dtype}")
    if original.dim() < 3 or original.shape[-1] != 3:
        raise ValueError(f"{name}: original must be [..., H, W, 3], got {list(original.shape)}")
    if generated.shape != original.shape or weights.shape != original.shape[:-1]:
        raise ValueError(f"{name}: generated {list(generated.shape)} and weights {list(weights.shape)} must be "
                         f"{list(original.shape)} and {list(original.shape[:-1])}")
    return original.contiguous(), generated.contiguous(), weights.contiguous()


def composite_native(original, generated, weights) -> torch.Tensor:
    """8-bit product composite: (C·a + G·(255 − a) + 127) // 255 per channel, bit for bit
    :func:`cg4ctr_fast.imaging.composite`'s arithmetic.

    original, generated: uint8 [..., H, W, 3] (tensors or numpy arrays); weights: uint8 [..., H, W], the
    paste weights of ``imaging._paste_weights`` (alpha, or 255, where the product is kept; 0 on the
    background). Returns a new uint8 tensor shaped like ``original``. Raises TypeError/ValueError for other
    dtypes/shapes, :class:`NativeUnavailableError` when the library is not built."""
    original, generated, weights = _composite_inputs(original, generated, weights, torch.uint8, "composite")
    return _ops().composite(original, generated, weights)


def composite_float_native(original, generated, weights) -> torch.Tensor:
    """Float product composite: c·α + G·(1 − α) in float32 with c = C / 255, α = a / 255, as
    :func:`cg4ctr_fast.imaging.composite_float` computes it.

    original: uint8 [..., H, W, 3]; generated: float32 [..., H, W, 3] in [0, 1]; weights: uint8 [..., H, W]
    (as :func:`composite_native`). Returns a new float32 tensor shaped like ``generated``."""
    original, generated, weights = _composite_inputs(original, generated, weights, torch.float32, "composite_float")
    return _ops().composite_float(original, generated, weights)


# ---------------------------------------------------------------------------------------------
# Build driver.


def _say(msg: str) -> None:
    print(f"[cg4ctr-native] {msg}", file=sys.stderr, flush=True)


def _tool(name: str) -> str | None:
    # the venv's own tools first (the [native] extra installs cmake and ninja there)
    here = Path(sys.executable).parent / name
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which(name)


def _cuda_architectures() -> str | None:
    env = os.environ.get("CG4CTR_CUDA_ARCHITECTURES")
    if env:
        return env
    if torch.version.cuda is not None and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}{minor}"
    return None  # CMake's default for the toolkit


CPU_TARGETS = ("auto", "avx2", "portable")
_AVX2_FLAGS = frozenset({"avx2", "fma", "f16c"})


def host_has_avx2() -> bool:
    """Whether this machine's CPU has AVX2, FMA and F16C (Linux x86-64: the ``flags`` line of /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return _AVX2_FLAGS <= set(line.partition(":")[2].split())
    except OSError:
        pass
    return False


def build(jobs: int | None = None, build_dir: str | os.PathLike[str] | None = None, cpu: str = "auto") -> Path:
    """Configure and build the native library with CMake, then install it at :func:`library_path`.

    Needs a source checkout (the root ``CMakeLists.txt``), cmake >= 3.18 and a C++20 compiler; uses Ninja
    when found. ``jobs``: parallel build jobs (default: CMake's). ``build_dir``: default ``build/native``
    in the checkout. ``cpu``: "avx2" compiles the CPU kernels for AVX2+FMA+F16C (the library then runs only
    on such CPUs), "portable" for the compiler's baseline ISA, "auto" (default) picks avx2 when this machine
    has it, since the library is built where it runs (a DDIM step at 2x4x96x96, fp32, 1 thread: 93 µs AVX2
    against 153 µs portable). Progress goes to stderr. Returns the installed path; raises ValueError for an
    unknown ``cpu``, RuntimeError (one line) when a tool is missing or a step fails."""
    if cpu not in CPU_TARGETS:
        raise ValueError(f"cpu must be one of {CPU_TARGETS}, got {cpu!r}")
    avx2 = cpu == "avx2" or (cpu == "auto" and host_has_avx2())
    source = _SOURCE_ROOT
    if not (source / "CMakeLists.txt").is_file() or not (source / "kernels").is_dir():
        raise RuntimeError(f"no CMakeLists.txt and kernels/ at {source}: building needs a source checkout "
                           "(pip install -e .)")
    cmake = _tool("cmake")
    if cmake is None:
        raise RuntimeError("cmake not found: pip install -e '.[native]' (or install cmake >= 3.18)")
    build_dir = Path(build_dir) if build_dir is not None else source / "build" / "native"
    torch_cuda = torch.version.cuda is not None
    args = [cmake, "-S", str(source), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DCG4CTR_TORCH_CUDA={'ON' if torch_cuda else 'OFF'}",
            f"-DCG4CTR_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-DCG4CTR_CPU_AVX2={'ON' if avx2 else 'OFF'}"]
    ninja = _tool("ninja")
    cache = build_dir / "CMakeCache.txt"
    generator = "Ninja" if ninja else "default generator"
    if cache.is_file():  # the generator of an existing build folder cannot change: say which one it has
        for line in cache.read_text(errors="replace").splitlines():
            if line.startswith("CMAKE_GENERATOR:"):
                generator = line.partition("=")[2] or generator
                break
    elif ninja is not None:
        args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
    arch = _cuda_architectures() if torch_cuda else None
    if arch is not None:
        args.append(f"-DCMAKE_CUDA_ARCHITECTURES={arch}")
    start = time.monotonic()
    _say(f"configuring in {build_dir} (torch {torch.__version__}, "
         f"{'CUDA ' + torch.version.cuda if torch_cuda else 'CPU-only'}; {generator}; CPU kernels for {'AVX2' if avx2 else 'the baseline ISA'})")
    _run(args, "configure")
    cmd = [cmake, "--build", str(build_dir), "--config", "Release"]
    if jobs:
        cmd += ["--parallel", str(int(jobs))]
    _say("building libcg4ctr_ops")
    _run(cmd, "build")
    built = next((p for p in (build_dir / _lib_filename(), build_dir / "Release" / _lib_filename()) if p.is_file()),
                 None)
    if built is None:
        raise RuntimeError(f"the build finished but {_lib_filename()} is not in {build_dir}")
    dest = library_path()
    dest.parent.mkdir(parents=True, exist_ok=True)
    # copy then rename: a process that has the old library mapped keeps its copy intact
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    shutil.copy2(built, tmp)
    os.replace(tmp, dest)
    info = build_dir / "cg4ctr_ops_build.txt"
    if info.is_file():
        tmp = _build_info_path(dest).with_name(f".{_build_info_path(dest).name}.{os.getpid()}.tmp")
        shutil.copy2(info, tmp)
        os.replace(tmp, _build_info_path(dest))
    _say(f"installed {dest} ({time.monotonic() - start:.1f} s)")
    return dest


def _run(cmd: list[str], what: str) -> None:
    try:
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
    except OSError as exc:
        raise RuntimeError(f"cannot run {cmd[0]}: {exc}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"cmake {what} failed (exit {proc.returncode}); see the output above")


def _info() -> int:
    path = library_path()
    print(f"library: {path}{'' if path.is_file() else ' (missing)'}")
    if os.environ.get(ENV_LIB):
        print(f"  (from ${ENV_LIB})")
    print(f"torch: {torch.__version__} ({'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU-only'})")
    facts = {}
    info = _build_info_path(path)
    if info.is_file():
        for line in info.read_text().splitlines():
            key, _, value = line.partition("=")
            facts[key.strip()] = value.strip()
        print("build: " + ", ".join(f"{k}={v}" for k, v in facts.items()))
    reason = native_unavailable_reason()
    print(f"loadable: {'yes' if reason is None else 'no: ' + reason}")
    if reason is None:
        cuda = facts.get("cuda")
        print("CUDA kernels: " + {"ON": "built", "OFF": "not built"}.get(cuda, "unknown (no build record next to the library)"))
    return 0 if reason is None else 1


def main(argv: list[str] | None = None) -> int:
    """``cg4ctr-native build [--jobs N] [--build-dir D]`` | ``cg4ctr-native info``."""
    parser = argparse.ArgumentParser(prog="cg4ctr-native", description="Build and inspect the native step ops.")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="configure + build with CMake and install the library")
    b.add_argument("--jobs", "-j", type=int, default=None, help="parallel build jobs")
    b.add_argument("--build-dir", default=None, help="CMake build folder (default: build/native)")
    b.add_argument("--cpu", choices=CPU_TARGETS, default="auto",
                   help="CPU kernels for AVX2+FMA+F16C or the baseline ISA (default auto: avx2 when this CPU has it; "
                        "use portable for a library other machines load)")
    sub.add_parser("info", help="library path, build flags, whether it loads, CUDA kernels built or not")
    args = parser.parse_args(argv)
    if args.command == "info":
        return _info()
    if args.jobs is not None and args.jobs < 1:
        print("cg4ctr-native: --jobs must be >= 1", file=sys.stderr)
        return 2
    try:
        build(jobs=args.jobs, build_dir=args.build_dir, cpu=args.cpu)
    except RuntimeError as exc:
        print(f"cg4ctr-native: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
