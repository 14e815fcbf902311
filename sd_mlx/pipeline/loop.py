"""The denoising loop, one for every family (SD, SDXL) and mode (txt2img, img2img, inpainting).

What differs between them is passed in, never copied:

- the conditioning (:class:`Conditioning`: the text embeddings of each image, their unconditional counterparts for
  classifier-free guidance, and any extra U-Net inputs such as SDXL's pooled embeddings and time ids);
- the initial latents and the part of the schedule that runs (``start``/``end`` step indices: img2img skips the
  first steps, a base model handing over to a refiner stops early);
- ``model_input``: how the U-Net's input is built from the scheduled latents (a 9-channel inpainting U-Net gets the
  mask and the masked-image latents concatenated);
- ``after_step``: what happens to the latents after each scheduler step (inpainting with an ordinary U-Net blends the
  known region back in).

Each step builds one lazily evaluated graph and evaluates it once (``mx.eval`` of the new latents and a finiteness
flag), as diffusers' loop runs one step at a time. With ``unet_batch`` images per U-Net evaluation smaller than the
batch, each group is evaluated before the next (bounded memory, and images bit-identical to single runs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import mlx.core as mx
import numpy as np

from ..errors import NonFiniteError
from ..profiling import Profile
from ..schedulers import Scheduler
from .checks import non_finite_message
from .noise import StepNoise

StepCallback = Callable[[int, float, mx.array], Any]
"""``callback(step_index, timestep, latents)`` after each U-Net evaluation (``step_index`` counts the steps that run,
from the first one run; ``timestep`` is the value the U-Net saw; ``latents`` ``(B, h, w, C)`` float32 are the
latents after that step). Return ``False`` to cancel the generation: the call then raises ``KeyboardInterrupt`` like
Ctrl-C, so no output is produced. Raising inside the callback propagates."""

ModelInput = Callable[[mx.array, int, int], mx.array]
"""``model_input(x, start, stop)``: the U-Net's input for the scheduled latents ``x`` ``(b, h, w, C)`` of images
``start:stop`` (e.g. the mask and masked-image latents concatenated for a 9-channel inpainting U-Net)."""

AfterStep = Callable[[int, mx.array], mx.array]
"""``after_step(i, latents)``: the latents ``(B, h, w, C)`` after step ``i``, changed (e.g. inpainting's blending of
the known region) or returned as they are."""


@dataclass
class Conditioning:
    """What the U-Net is conditioned on, one row per image.

    Attributes:
        cond: text embeddings ``(B, T, D)`` in the compute dtype.
        uncond: the unconditional (negative prompt) embeddings ``(B, T, D)``, or ``None`` without classifier-free
            guidance.
        added: extra U-Net keyword inputs (SDXL: ``text_embeds`` ``(B, D_pooled)``, ``time_ids`` ``(B, n)``), each
            a pair ``(cond_rows, uncond_rows)`` (``uncond_rows`` ``None`` without guidance).
    """

    cond: mx.array
    uncond: mx.array | None = None
    added: dict[str, tuple[mx.array, mx.array | None]] = field(default_factory=dict)

    @property
    def guided(self) -> bool:
        """True with classifier-free guidance (an unconditional batch exists)."""
        return self.uncond is not None

    def rows(self, start: int, stop: int) -> tuple[mx.array, dict[str, mx.array]]:
        """The U-Net's context ``(n, T, D)`` and extra inputs for images ``start:stop``: with guidance
        ``[uncond, cond]`` stacked (``n = 2 (stop - start)``, diffusers' order), else ``cond`` alone."""
        def pick(c: mx.array, u: mx.array | None) -> mx.array:
            return c[start:stop] if u is None else mx.concatenate([u[start:stop], c[start:stop]], axis=0)

        context = pick(self.cond, self.uncond)
        return context, {name: pick(c, u if self.guided else None) for name, (c, u) in self.added.items()}


def guided_output(unet: Callable[..., mx.array], x: mx.array, t: float, context: mx.array,
                  added: dict[str, mx.array], guidance_scale: float, compute_dtype: mx.Dtype) -> mx.array:
    """Guided model output for the U-Net input ``x`` ``(b, h, w, C_in)``; float32 ``(b, h, w, C_out)``.

    With guidance (``context`` has ``2b`` rows ``[uncond, cond]``) this is ``uncond + guidance_scale * (cond -
    uncond)`` of one U-Net evaluation, the ``b`` latents going in once, shared by both contexts (the U-Net repeats
    them at its first cross-attention, see ``UNet2DConditionModel.__call__``): the result of diffusers' ``[x, x]``
    up to float32 rounding, with less work. Without guidance (``b`` rows) it is the conditional output.
    """
    t_in = mx.full((x.shape[0],), t, dtype=mx.float32)
    out = unet(x.astype(compute_dtype), t_in, context, **added).astype(mx.float32)
    if context.shape[0] == x.shape[0]:
        return out
    out_uncond, out_text = mx.split(out, 2, axis=0)
    return out_uncond + guidance_scale * (out_text - out_uncond)


@dataclass
class LoopInputs:
    """One run of :func:`denoise`.

    Attributes:
        latents: the starting latents ``(B, h, w, C)`` float32, already scaled/noised for step ``start`` (txt2img:
            noise times ``init_noise_sigma``; img2img: the noised image latents).
        scheduler: a scheduler whose ``set_timesteps`` was called.
        seeds: one seed per image (the per-step noise of ancestral/SDE schedulers comes from them).
        conditioning: see :class:`Conditioning`.
        guidance_scale: classifier-free guidance weight (used when ``conditioning.guided``).
        compute_dtype: dtype the U-Net computes in.
        start, end: step indices ``[start, end)`` of ``scheduler.timesteps`` that run (``end=None``: to the last).
        unet_batch: images per U-Net evaluation.
        model_input: see :data:`ModelInput` (``None``: the scheduled latents themselves).
        after_step: see :data:`AfterStep`.
    """

    latents: mx.array
    scheduler: Scheduler
    seeds: list[int]
    conditioning: Conditioning
    guidance_scale: float
    compute_dtype: mx.Dtype
    start: int = 0
    end: int | None = None
    unet_batch: int = 1
    model_input: ModelInput | None = None
    after_step: AfterStep | None = None


def denoise(unet: Callable[..., mx.array], run: LoopInputs, profile: Profile, *,
            callback: StepCallback | None = None, show_progress: bool = False) -> mx.array:
    """Run the sampling steps ``run.start .. run.end - 1`` and return the final latents ``(B, h, w, C)`` float32.

    Args:
        unet: ``unet(x, t, context, **added) -> model output`` (a ``UNet2DConditionModel``, or any callable with
            that signature, e.g. one adding ControlNet residuals).
        run: see :class:`LoopInputs`.
        profile: the ``"denoising"`` phase is recorded in it (with the step count).
        callback: see :data:`StepCallback`.
        show_progress: a tqdm bar over the steps (on stderr).

    Raises:
        NonFiniteError: NaN or Inf in the latents after a step (names the step).
        KeyboardInterrupt: Ctrl-C, or the callback returned ``False``.
    """
    sched = run.scheduler
    timesteps = [float(t) for t in np.asarray(sched.timesteps)]
    end = len(timesteps) if run.end is None else run.end
    latents = run.latents
    batch = latents.shape[0]
    shape = tuple(latents.shape[1:])
    step_noise = StepNoise(run.seeds, shape, len(timesteps), mx.float32) if sched.needs_noise else None
    groups = [(s, min(s + run.unet_batch, batch)) for s in range(0, batch, run.unet_batch)]
    bar = None
    if show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=end - run.start, desc="denoising", unit="step")
    try:
        with profile.phase("denoising", steps=end - run.start):
            for i in range(run.start, end):
                t = timesteps[i]
                x = sched.scale_model_input(latents, i)
                parts = []
                for s, e in groups:
                    context, added = run.conditioning.rows(s, e)
                    x_in = x[s:e] if run.model_input is None else run.model_input(x[s:e], s, e)
                    part = guided_output(unet, x_in, t, context, added, run.guidance_scale, run.compute_dtype)
                    if len(groups) > 1:
                        mx.eval(part)  # bound memory: one group's activations at a time
                    parts.append(part)
                model_output = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)
                latents = sched.step(model_output, i, latents, noise=step_noise(i) if step_noise else None)
                if run.after_step is not None:
                    latents = run.after_step(i, latents)
                finite = mx.all(mx.isfinite(latents))
                mx.eval(latents, finite)
                if not finite.item():
                    raise NonFiniteError(non_finite_message(f"denoising (step {i + 1} of {len(timesteps)})"))
                if bar is not None:
                    bar.update(1)
                if callback is not None and callback(i - run.start, t, latents) is False:
                    raise KeyboardInterrupt("generation cancelled by the callback")
    finally:
        if bar is not None:
            bar.close()
    return latents
