"""The Stable Diffusion pipeline, split by concern.

- :mod:`.core`: :class:`StableDiffusionPipeline` (components, loading, release, the phases of a call),
  :func:`load_pipeline`, :func:`resolve_taesd`.
- :mod:`.plan`: checking a call's arguments and building its :class:`~.plan.Plan` before anything loads.
- :mod:`.checks`: argument checks shared by the pipeline and the command line (sizes, seeds, counts).
- :mod:`.memory`: the memory estimate and what the machine has.
- :mod:`.noise`: seeds and noise (image ``k`` of seed ``s`` uses ``s + k``).
- :mod:`.text`: prompts to conditioning (SD 1.x/2.x).
- :mod:`.loop`: the one denoising loop every family and mode uses.
- :mod:`.decode`: latents to images.
"""

from .checks import MAX_SEED, MAX_SIDE, check_finite, validate_seed, validate_size
from .core import COMPONENTS, PipelineOutput, StableDiffusionPipeline, load_pipeline, resolve_taesd
from .loop import Conditioning, LoopInputs, StepCallback, denoise, guided_output
from .memory import MemoryEstimate, available_memory_bytes, estimate_memory, format_bytes
from .noise import StepNoise, image_seeds, initial_noise
from .plan import LONG_PROMPT_MODES, OUTPUT_TYPES, Plan

__all__ = [
    "COMPONENTS", "Conditioning", "LONG_PROMPT_MODES", "LoopInputs", "MAX_SEED", "MAX_SIDE", "MemoryEstimate",
    "OUTPUT_TYPES", "PipelineOutput", "Plan", "StableDiffusionPipeline", "StepCallback", "StepNoise",
    "available_memory_bytes", "check_finite", "denoise", "estimate_memory", "format_bytes", "guided_output",
    "image_seeds", "initial_noise", "load_pipeline", "resolve_taesd", "validate_seed", "validate_size",
]
