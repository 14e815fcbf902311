"""The worker: one thread that owns the model and runs jobs one at a time from a bounded FIFO queue.

Everything MLX does in the server happens on this thread (loading, denoising, previews), and the thread calls
``mx.clear_streams()`` before it ends: MLX's per-thread streams must be cleaned up by the thread that made them, or
the process may abort at exit ("terminate called without an active exception").

Jobs are :class:`GenerationSpec` (txt2img / img2img) or model switches. A request handler submits a job and
awaits its ``future``; :meth:`Worker.submit` raises :class:`QueueFull` when ``queue_size`` jobs already wait.
Interrupts, skips and disconnected clients reach the running job through the pipeline's step ``callback``, which
returns ``False`` to stop it (the pipeline then raises ``KeyboardInterrupt``). Whatever a job raises goes into its
future; the worker goes on with the next job.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import gc
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from ..errors import SDMLXError
from ..images import GenerationParameters
from .preview import Previewer
from .progress import ProgressState
from .registry import ModelEntry
from .samplers import SamplerInfo

log = logging.getLogger("sd_mlx.server")


class QueueFull(Exception):
    """The job queue is full; ``retry_after`` is a suggested wait in seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the server is busy: its queue is full; retry in about {retry_after} s")
        self.retry_after = retry_after


class JobCancelled(Exception):
    """The job was dropped: its client disconnected, or the server is stopping."""


@dataclass
class GenerationSpec:
    """A checked generation request, ready for the pipeline.

    Attributes:
        kind: ``"txt2img"`` or ``"img2img"``.
        prompt, negative_prompt, steps, cfg_scale, width, height: as the pipeline takes them.
        seed: the first image's seed (resolved: never random here); batch ``j`` image ``k`` uses
            ``seed + j * batch_size + k``, as A1111 numbers them.
        batch_size, n_iter: images per pipeline call, and calls.
        sampler: the resolved sampler.
        clip_skip: the pipeline's ``clip_skip`` (A1111's ``CLIP_stop_at_last_layers - 1``), or ``None``.
        eta: DDIM's eta or ``None``.
        model: the model to run on.
        save_images: also write the PNGs into the output folder.
        sampling_steps: U-Net evaluations per batch (for progress).
        image, mask_image, strength: img2img / inpainting inputs (PIL images, ``denoising_strength``).
    """

    kind: str
    prompt: str
    negative_prompt: str
    steps: int
    cfg_scale: float
    width: int
    height: int
    seed: int
    batch_size: int
    n_iter: int
    sampler: SamplerInfo
    clip_skip: int | None
    eta: float | None
    model: ModelEntry
    save_images: bool = False
    sampling_steps: int = 0
    image: Image.Image | None = None
    mask_image: Image.Image | None = None
    strength: float | None = None

    def template(self) -> GenerationParameters:
        """The infotext fields of this request's first image (the pipeline's own values replace them for every
        finished image; this is used for images of an interrupted batch)."""
        return GenerationParameters(prompt=self.prompt, negative_prompt=self.negative_prompt if self.cfg_scale > 1
                                    else "", steps=self.steps, sampler=self.sampler.name,
                                    cfg_scale=float(self.cfg_scale), seed=self.seed, width=self.width,
                                    height=self.height, model=self.model.title)


@dataclass
class GenerationResult:
    """What a generation job made: ``images`` (PIL), ``parameters`` per image, ``seeds``, whether it was
    ``interrupted``, ``job_timestamp``, and the files written with ``save_images``."""

    images: list[Image.Image]
    parameters: list[GenerationParameters]
    seeds: list[int]
    interrupted: bool
    job_timestamp: str
    saved: list[Path] = field(default_factory=list)


@dataclass
class Job:
    """One queued unit of work: ``run(worker)`` executes on the worker thread; its outcome goes to ``future``."""

    kind: str
    run: Callable[["Worker"], Any]
    cancel_on_disconnect: bool = True
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Drop the job: skipped if still queued, stopped at its next step if running."""
        self.cancelled.set()


class Worker:
    """The generation thread and its queue (see the module docstring).

    Args:
        load: ``load(entry)`` returns a pipeline for a model (configs read; weights load on first use). Called on
            the worker thread for switches, and through :meth:`pipeline_for` by request handlers for checks.
        startup: the model to load (and warm) first.
        state: the shared :class:`ProgressState`.
        queue_size: jobs that may wait behind the running one.
        previewer: makes the progress previews.
        output_dir: where ``save_images`` writes.
    """

    def __init__(self, load: Callable[[ModelEntry], Any], startup: ModelEntry, state: ProgressState, *,
                 queue_size: int, previewer: Previewer, output_dir: Path) -> None:
        self._load, self.state, self.previewer, self.output_dir = load, state, previewer, Path(output_dir)
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=max(1, queue_size))
        self._pipelines: dict[str, Any] = {}
        self._pipelines_lock = threading.Lock()
        self.entry: ModelEntry | None = None
        self.pipe: Any = None
        self.startup = startup
        self.live_previews = True
        self.preview_every = 1
        self._current: Job | None = None
        self._stop = threading.Event()
        self._started = threading.Event()  # set once the start-up model is loaded (or failed to load)
        self._durations: list[float] = []
        #: ``(kind, outcome)`` of recent jobs, newest last; outcome is "done", "interrupted", "cancelled", "failed"
        self.outcomes: collections.deque[tuple[str, str]] = collections.deque(maxlen=64)
        self._thread = threading.Thread(target=self._loop, name="sd_mlx-worker", daemon=True)

    # ----- control -----------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the thread; it loads the start-up model first."""
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the running job at its next step, drop the waiting ones (their futures get
        :class:`JobCancelled`) and end the thread."""
        self._stop.set()
        current = self._current
        if current is not None:
            current.cancel()
        self._drain()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _drain(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if not job.future.done():
                job.future.set_exception(JobCancelled("the server is stopping"))
            self._queue.task_done()

    def submit(self, job: Job) -> Job:
        """Queue ``job`` (FIFO).

        Raises:
            QueueFull: ``queue_size`` jobs already wait.
            JobCancelled: the server is stopping.
        """
        if self._stop.is_set():
            raise JobCancelled("the server is stopping")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(self.retry_after()) from None
        return job

    def waiting(self) -> int:
        """Jobs in the queue (not counting the running one)."""
        return self._queue.qsize()

    def retry_after(self) -> int:
        """Seconds until a queue place is likely free: the mean duration of recent jobs (at least 1)."""
        recent = self._durations[-8:]
        return max(1, round(sum(recent) / len(recent))) if recent else 1

    def busy(self) -> bool:
        """Whether a job runs or waits."""
        return not self._started.is_set() or self._queue.unfinished_tasks > 0

    def is_running(self, job: Job) -> bool:
        """Whether ``job`` is the one running now."""
        return self._current is job

    # ----- models ------------------------------------------------------------------------------------------------
    def pipeline_for(self, entry: ModelEntry) -> Any:
        """The pipeline object of ``entry`` (made once per model; only the current model's holds weights).
        Request handlers read its configs (``scheduler_config``, ``vae_scale_factor``) for checks."""
        with self._pipelines_lock:
            pipe = self._pipelines.get(entry.title)
            if pipe is None:
                pipe = self._pipelines[entry.title] = self._load(entry)
            return pipe

    def _switch(self, entry: ModelEntry) -> Any:
        """Make ``entry`` the model in memory: the old one's weights are released first, then the new one's are
        loaded."""
        if self.entry == entry and self.pipe is not None:
            return self.pipe
        new = self.pipeline_for(entry)
        old, self.pipe, self.entry = self.pipe, None, None
        if old is not None:
            old.release()
            del old
            gc.collect()
        log.info("loading model %s", entry.title)
        for name in ("text_encoder", "unet", "vae"):
            getattr(new, name)  # loads the weights now (A1111 loads on switch too)
        self.pipe, self.entry = new, entry
        return new

    def switch_job(self, entry: ModelEntry) -> Job:
        """A job that makes ``entry`` the model in memory; its future's result is the entry."""
        def run(worker: Worker) -> ModelEntry:
            worker.state.begin("load model", 1, 0)
            worker._switch(entry)
            return entry

        return Job(kind="load model", run=run, cancel_on_disconnect=False)

    # ----- the loop ----------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        import mlx.core as mx

        try:
            try:
                self.state.begin("load model", 1, 0)
                self._switch(self.startup)
            except Exception:  # noqa: BLE001 - reported; jobs will try again and report to their clients
                log.exception("could not load the start-up model %s", self.startup.title)
            finally:
                self.state.end()
                self._started.set()
            while not self._stop.is_set():
                try:
                    job = self._queue.get(timeout=0.2)
                except queue.Empty:
                    continue
                try:
                    self._run(job)
                finally:
                    self._queue.task_done()
        finally:
            self._drain()
            self.pipe = None
            with self._pipelines_lock:
                self._pipelines.clear()
            gc.collect()
            mx.clear_streams()

    def _run(self, job: Job) -> None:
        if job.cancelled.is_set() or job.future.done():
            if not job.future.done():
                job.future.set_exception(JobCancelled("the client disconnected before the job started"))
            self.outcomes.append((job.kind, "cancelled"))
            return
        if not job.future.set_running_or_notify_cancel():
            return
        self._current = job
        t0 = time.perf_counter()
        try:
            result = job.run(self)
        except BaseException as e:  # noqa: BLE001 - KeyboardInterrupt comes from the step callback, not a signal
            if isinstance(e, (KeyboardInterrupt, JobCancelled)) or job.cancelled.is_set():
                e = JobCancelled("the job was cancelled")
                self.outcomes.append((job.kind, "cancelled"))
            else:
                if not isinstance(e, (SDMLXError, ValueError)):
                    log.exception("job %s failed", job.kind)
                self.outcomes.append((job.kind, "failed"))
            job.future.set_exception(e)
        else:
            self.outcomes.append((job.kind, "interrupted" if getattr(result, "interrupted", False) else "done"))
            job.future.set_result(result)
        finally:
            self._current = None
            self.state.end()
            self._durations.append(time.perf_counter() - t0)
            del self._durations[:-32]

    # ----- generation --------------------------------------------------------------------------------------------
    def generation_job(self, spec: GenerationSpec) -> Job:
        """A job running ``spec`` (``n_iter`` pipeline calls, see :func:`call_pipeline`); its future's result is a
        :class:`GenerationResult`."""
        def run(worker: Worker) -> GenerationResult:
            return worker._generate(spec, job)

        job = Job(kind=spec.kind, run=run, cancel_on_disconnect=not spec.save_images)
        return job

    def _generate(self, spec: GenerationSpec, job: Job) -> GenerationResult:
        import numpy as np

        from ..images import to_pil

        pipe = self._switch(spec.model)
        stamp = self.state.begin(spec.kind, spec.n_iter, spec.sampling_steps)
        images: list[Image.Image] = []
        params: list[GenerationParameters] = []
        seeds: list[int] = []
        interrupted = False
        for j in range(spec.n_iter):
            if self.state.is_interrupted():
                interrupted = True
                break
            self.state.next_batch(j)
            seed = (spec.seed + j * spec.batch_size) % 2**64
            latest: dict[str, Any] = {}

            def callback(i: int, t: float, latents: Any) -> bool:
                latest["latents"] = latents
                self.state.step(i + 1)
                if job.cancelled.is_set() or self.state.is_interrupted() or self.state.take_skip():
                    return False
                if self.live_previews and self.preview_every > 0 and (i + 1) % self.preview_every == 0 \
                        and self.state.preview_wanted():
                    from .codec import encode_png

                    self.state.set_preview(encode_png(self.previewer(pipe, latents)), i + 1)
                return True

            batch_seeds = [(seed + k) % 2**64 for k in range(spec.batch_size)]
            try:
                out = call_pipeline(pipe, spec, seed, callback)
            except KeyboardInterrupt:
                if job.cancelled.is_set():
                    raise JobCancelled("the job was cancelled") from None
                if not self.state.is_interrupted():
                    continue  # skipped: this batch yields nothing, the next one runs
                interrupted = True
                if "latents" in latest:  # A1111 returns the partly denoised images of an interrupted batch
                    decoded = pipe.decode_latents(latest["latents"], batch_size=1)
                    images += to_pil(np.array(decoded))
                    base = spec.template()
                    params += [dataclasses.replace(base, seed=s) for s in batch_seeds]
                    seeds += batch_seeds
                break
            images += list(out.images)
            params += [dataclasses.replace(p, model=spec.model.title) for p in out.parameters]
            seeds += list(out.seeds)
        result = GenerationResult(images=images, parameters=params, seeds=seeds, interrupted=interrupted,
                                  job_timestamp=stamp)
        if spec.save_images and images:
            result.saved = self._save(images, params)
        return result

    def _save(self, images: list[Image.Image], params: list[GenerationParameters]) -> list[Path]:
        from ..images import next_free_paths, save_png

        self.output_dir.mkdir(parents=True, exist_ok=True)
        paths = next_free_paths(self.output_dir, "sd_mlx", len(images))
        return [save_png(im, path, parameters=p.to_a1111()) for im, p, path in zip(images, params, paths)]


def supports_img2img(pipe: Any) -> bool:
    """Whether the pipeline's ``__call__`` takes ``image=`` (img2img / inpainting)."""
    import inspect

    try:
        return "image" in inspect.signature(type(pipe).__call__).parameters
    except (TypeError, ValueError):
        return False


def call_pipeline(pipe: Any, spec: GenerationSpec, seed: int, callback: Callable[[int, float, Any], bool]) -> Any:
    """One batch of ``spec``: ``spec.batch_size`` images from ``seed`` as ``PIL`` images (``PipelineOutput``)."""
    kwargs: dict[str, Any] = {}
    if spec.eta is not None and spec.sampler.short in ("ddim", "DDIMScheduler"):
        kwargs["eta"] = float(spec.eta)
    if spec.kind == "img2img":
        kwargs.update(image=spec.image, strength=spec.strength)
        if spec.mask_image is not None:
            kwargs["mask_image"] = spec.mask_image
    return pipe(spec.prompt, negative_prompt=spec.negative_prompt or None, num_inference_steps=spec.steps,
                guidance_scale=float(spec.cfg_scale), height=spec.height, width=spec.width,
                num_images_per_prompt=spec.batch_size, seed=seed, scheduler=spec.sampler.short,
                clip_skip=spec.clip_skip, callback=callback, output_type="pil", **kwargs)
