"""sd_mlx: Stable Diffusion inference in MLX, numerically matching diffusers.

Public API::

    import sd_mlx
    pipe = sd_mlx.load_pipeline("path/or/repo-id", dtype="float32")
    result = pipe("a prompt", num_inference_steps=20, seed=0)
    result.images[0].save("out.png")

Importing sd_mlx first loads an optimised BLAS for MLX's Linux CPU backend when one is installed (see
:mod:`sd_mlx.cpu.blas`; that has to happen before ``mlx`` is imported, hence the order below) and lets MLX's CPU JIT
build its fused kernels for the host CPU (:mod:`sd_mlx.cpu.jit`); on glibc Linux it keeps freed buffers mapped for
reuse (:mod:`sd_mlx.cpu.memory`). With ``SD_MLX_CPU_KERNELS=0`` (the portable path, see :mod:`sd_mlx.ops`) only the
BLAS is loaded: the JIT flags and the allocator are left as a Mac or CUDA user has them.
"""

from .cpu.blas import enable_fast_blas as _enable_fast_blas
from .cpu.jit import enable_native_cpu_jit as _enable_native_cpu_jit
from .cpu.memory import keep_freed_buffers as _keep_freed_buffers
from .cpu.native import turned_off as _turned_off

BLAS_STATUS = _enable_fast_blas()
_PORTABLE = _turned_off("SD_MLX_CPU_KERNELS")
NATIVE_CPU_JIT = None if _PORTABLE else _enable_native_cpu_jit()
KEEP_FREED_MEMORY = None if _PORTABLE else _keep_freed_buffers()

from .errors import (  # noqa: E402
    ConfigError,
    InvalidArgumentError,
    ModelNotFoundError,
    NonFiniteError,
    OutputError,
    SDMLXError,
    WeightLoadError,
)

__version__ = "0.1.0"

__all__ = [
    "BLAS_STATUS", "NATIVE_CPU_JIT", "KEEP_FREED_MEMORY", "ConfigError", "InvalidArgumentError", "ModelNotFoundError",
    "NonFiniteError", "OutputError",
    "SDMLXError", "WeightLoadError", "load_pipeline", "StableDiffusionPipeline", "PipelineOutput",
]


def __getattr__(name: str):
    # The pipeline pulls in every model; import it on first use so `import sd_mlx.cpu.blas` stays light.
    if name in ("load_pipeline", "StableDiffusionPipeline", "PipelineOutput"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'sd_mlx' has no attribute {name!r}")
