"""The FastAPI application: AUTOMATIC1111's ``/sdapi/v1`` routes and the web page, on one :class:`Worker`.

Build it with :func:`create_app`; ``python -m sd_mlx.server`` serves it with uvicorn. Every request is checked
completely (:func:`sd_mlx.validation.check_generation`, the CLI's checks) before it is queued, and refused with
422 naming the field; then it waits in the FIFO queue (503 with ``Retry-After`` when full) for the one worker.

Status codes: 200 done (also for an interrupted job, which returns what it made, as A1111 does); 401 missing or
wrong credentials (``--api-auth``); 404 unknown model; 413 body too large; 422 invalid request; 501 img2img with a
pipeline that has no img2img; 503 queue full or server stopping; 500 a failure of the job itself (the message
says what failed; the server goes on with the next job).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from PIL import Image, ImageFilter, ImageOps
from starlette.concurrency import run_in_threadpool

from ..errors import InvalidArgumentError, ModelNotFoundError, SDMLXError
from ..validation import API_NAMES, check_generation
from .codec import decode_image, encode_png, parse_infotext, png_text_chunks
from .config import ServerConfig
from .middleware import BasicAuth, BodyLimit
from .preview import Previewer
from .progress import ProgressState
from .registry import ModelEntry, ModelRegistry
from .samplers import SCHEDULES, resolve_sampler, samplers
from .schemas import Img2ImgRequest, PngInfoRequest, ProgressQuery, Txt2ImgRequest
from .worker import GenerationResult, GenerationSpec, Job, JobCancelled, QueueFull, Worker, supports_img2img

log = logging.getLogger("sd_mlx.server")

STATIC = Path(__file__).resolve().parent / "static"
_PAGE_FILES = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript"),
               "/style.css": ("style.css", "text/css")}
_READ_ONLY_OPTIONS = ("outdir_samples", "outdir_txt2img_samples", "outdir_img2img_samples", "outdir_save")


class HTTPError(Exception):
    """An error answered with ``status`` and ``{"error": kind, "detail": detail}``."""

    def __init__(self, status: int, detail: str, kind: str = "HTTPError", headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.kind, self.headers = status, detail, kind, headers or {}


def _status_of(e: SDMLXError) -> int:
    if isinstance(e, InvalidArgumentError):
        return 422
    if isinstance(e, ModelNotFoundError):
        return 404
    return 500


class Server:
    """The state behind the routes: models, options, progress and the worker.

    Args:
        config: the settings.
        load: ``load(entry)`` returns a pipeline (default: :func:`sd_mlx.load_pipeline` with ``config.dtype``
            and ``config.vae``); tests may wrap it.

    Raises:
        ModelNotFoundError, ConfigError, WeightLoadError: the start-up model cannot be opened (configs and weight
            headers are read here; weights load on the worker thread).
    """

    def __init__(self, config: ServerConfig, load: Callable[[ModelEntry], Any] | None = None) -> None:
        self.config = config
        self.registry = ModelRegistry(config.model, config.models_dir)
        self.output_dir = Path(config.output_dir).expanduser().resolve()
        if load is None:
            from ..pipeline import load_pipeline

            def load(entry: ModelEntry) -> Any:
                return load_pipeline(entry.source, dtype=config.dtype, vae=config.vae)

        self.state = ProgressState()
        self.worker = Worker(load, self.registry.startup, self.state, queue_size=config.queue_size,
                             previewer=Previewer(config.preview_vae, config.dtype), output_dir=self.output_dir)
        self.worker.pipeline_for(self.registry.startup)  # a bad start-up model fails here, before listening
        self.model: ModelEntry = self.registry.startup
        self.clip_stop = 1

    # ----- options -----------------------------------------------------------------------------------------------
    def options(self) -> dict[str, Any]:
        """``GET /sdapi/v1/options``: the settings sd_mlx honours, with A1111's keys."""
        out = str(self.output_dir)
        return {"sd_model_checkpoint": self.model.title, "sd_checkpoint_hash": None,
                "CLIP_stop_at_last_layers": self.clip_stop, "live_previews_enable": self.worker.live_previews,
                "show_progress_every_n_steps": self.worker.preview_every, "samples_format": "png",
                "outdir_samples": out, "outdir_txt2img_samples": out, "outdir_img2img_samples": out,
                "outdir_save": out}

    def check_options(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Check ``POST /sdapi/v1/options`` changes; returns them with ``sd_model_checkpoint`` as a
        :class:`ModelEntry`. Keys sd_mlx does not know are ignored (as A1111 ignores unknown keys).

        Raises:
            InvalidArgumentError: a bad value, or a read-only option (the output folders).
            ModelNotFoundError: an unknown model title.
        """
        out: dict[str, Any] = {}
        for key, value in changes.items():
            if key in _READ_ONLY_OPTIONS:
                raise InvalidArgumentError(f"{key} cannot be changed through the API; start the server with "
                                           f"--output-dir DIR")
            if key == "sd_model_checkpoint":
                if not isinstance(value, str):
                    raise InvalidArgumentError(f"sd_model_checkpoint must be a model title, got {value!r}")
                out[key] = self.registry.find(value)
            elif key == "CLIP_stop_at_last_layers":
                out[key] = _clip_stop(value)
            elif key == "live_previews_enable":
                if not isinstance(value, bool):
                    raise InvalidArgumentError(f"live_previews_enable must be true or false, got {value!r}")
                out[key] = value
            elif key == "show_progress_every_n_steps":
                if isinstance(value, bool) or not isinstance(value, int) or value < -1:
                    raise InvalidArgumentError(f"show_progress_every_n_steps must be an integer >= -1 (-1 or 0: "
                                               f"no previews), got {value!r}")
                out[key] = value
            elif key == "samples_format":
                if str(value).lower() != "png":
                    raise InvalidArgumentError(f"samples_format {value!r} is not supported; sd_mlx writes png")
            else:
                log.info("option %s ignored (not used by sd_mlx)", key)
        return out

    def apply_options(self, checked: dict[str, Any]) -> None:
        """Apply checked options other than the model (switched by a job first)."""
        if "CLIP_stop_at_last_layers" in checked:
            self.clip_stop = checked["CLIP_stop_at_last_layers"]
        if "live_previews_enable" in checked:
            self.worker.live_previews = checked["live_previews_enable"]
        if "show_progress_every_n_steps" in checked:
            self.worker.preview_every = max(0, checked["show_progress_every_n_steps"])

    # ----- requests ----------------------------------------------------------------------------------------------
    def make_spec(self, req: Txt2ImgRequest | Img2ImgRequest, kind: str) -> GenerationSpec:
        """Check a generation request completely and build its :class:`GenerationSpec` (runs in a thread pool:
        it reads configs and decodes images, but does no MLX work).

        Raises:
            InvalidArgumentError: any invalid field (the CLI's checks and messages, with A1111's field names).
            ModelNotFoundError: ``override_settings.sd_model_checkpoint`` names no model.
            HTTPError: 501 for img2img when the pipeline has no img2img.
        """
        from ..schedulers import get_scheduler

        if getattr(req, "enable_hr", False):
            raise InvalidArgumentError("enable_hr (hires fix) is not supported by sd_mlx; generate at the final "
                                       "size instead")
        if req.script_name:
            raise InvalidArgumentError(f"script_name {req.script_name!r}: scripts are not supported by sd_mlx")
        if req.alwayson_scripts:
            raise InvalidArgumentError(f"alwayson_scripts ({', '.join(map(str, req.alwayson_scripts))}) are not "
                                       f"supported by sd_mlx")
        if req.subseed_strength:
            raise InvalidArgumentError("subseed_strength (variation seeds) is not supported by sd_mlx; send 0")
        overrides = req.override_settings or {}
        model = self.model
        if "sd_model_checkpoint" in overrides:
            value = overrides["sd_model_checkpoint"]
            if not isinstance(value, str):
                raise InvalidArgumentError(f"override_settings.sd_model_checkpoint must be a model title, got "
                                           f"{value!r}")
            model = self.registry.find(value)
        clip_stop = _clip_stop(overrides.get("CLIP_stop_at_last_layers", self.clip_stop))
        pipe = self.worker.pipeline_for(model)
        sampler = resolve_sampler(req.sampler_name or req.sampler_index, req.scheduler)
        if isinstance(req.n_iter, bool) or req.n_iter < 1:
            raise InvalidArgumentError(f"n_iter must be >= 1, got {req.n_iter}")
        seed = check_generation(steps=req.steps, num_images=req.batch_size, width=req.width, height=req.height,
                                seed=None if req.seed == -1 else req.seed, guidance_scale=req.cfg_scale,
                                scheduler=sampler.short, scheduler_config=pipe.scheduler_config,
                                vae_scale_factor=pipe.vae_scale_factor, total_images=req.batch_size * req.n_iter,
                                limits=self.config.limits, names=API_NAMES)
        layers = getattr(getattr(pipe, "text_config", None), "num_hidden_layers", None)
        if layers is not None and clip_stop > layers:
            raise InvalidArgumentError(f"CLIP_stop_at_last_layers={clip_stop} is more than the text encoder's "
                                       f"{layers} layers")
        sched = get_scheduler(sampler.short, pipe.scheduler_config)
        sched.set_timesteps(req.steps)
        spec = GenerationSpec(kind=kind, prompt=req.prompt or "", negative_prompt=req.negative_prompt or "",
                              steps=req.steps, cfg_scale=req.cfg_scale, width=req.width, height=req.height,
                              seed=seed, batch_size=req.batch_size, n_iter=req.n_iter, sampler=sampler,
                              clip_skip=clip_stop - 1 or None, eta=req.eta, model=model,
                              save_images=req.save_images, sampling_steps=len(sched.timesteps))
        if kind == "img2img":
            self._img2img_inputs(req, spec)
            if not supports_img2img(pipe):
                raise HTTPError(501, "img2img is not available in this build: the pipeline has no image input "
                                     "yet (sd_mlx txt2img only)", kind="NotImplemented")
        return spec

    def _img2img_inputs(self, req: Img2ImgRequest, spec: GenerationSpec) -> None:
        """Decode and check ``init_images``, ``mask`` and the img2img options into ``spec``."""
        if not req.init_images:
            raise InvalidArgumentError("init_images is required for img2img: a list with one base64 image")
        if len(req.init_images) > 1:
            raise InvalidArgumentError(f"init_images has {len(req.init_images)} images; sd_mlx takes one per "
                                       f"request")
        strength = req.denoising_strength
        if not 0.0 <= strength <= 1.0:
            raise InvalidArgumentError(f"denoising_strength must be between 0 and 1, got {strength}")
        if req.resize_mode not in (0, 1):
            raise InvalidArgumentError(f"resize_mode {req.resize_mode} is not supported; use 0 (just resize) or 1 "
                                       f"(crop and resize)")
        if req.inpainting_fill not in (0, 1, 2, 3):
            raise InvalidArgumentError(f"inpainting_fill must be 0, 1, 2 or 3, got {req.inpainting_fill}")
        if req.inpainting_mask_invert not in (0, 1):
            raise InvalidArgumentError(f"inpainting_mask_invert must be 0 or 1, got {req.inpainting_mask_invert}")
        size = (spec.width, spec.height)
        image = decode_image(req.init_images[0], "init_images[0]", max_pixels=self.config.max_image_pixels)
        spec.image = _fit(image.convert("RGB"), size, req.resize_mode)
        spec.strength = float(strength)
        if req.mask:
            mask = _fit(decode_image(req.mask, "mask", max_pixels=self.config.max_image_pixels).convert("L"), size,
                        req.resize_mode)
            if req.inpainting_mask_invert:
                mask = ImageOps.invert(mask)
            blur = req.mask_blur if req.mask_blur is not None else max(req.mask_blur_x, req.mask_blur_y)
            if blur < 0:
                raise InvalidArgumentError(f"mask_blur must be >= 0, got {blur}")
            if blur:
                mask = mask.filter(ImageFilter.GaussianBlur(blur))
            spec.mask_image = mask

    def response(self, req: Txt2ImgRequest | Img2ImgRequest, spec: GenerationSpec,
                 result: GenerationResult) -> dict[str, Any]:
        """The A1111 response: ``images`` (base64 PNGs with their ``parameters`` chunk; empty without
        ``send_images``), ``parameters`` (the request's fields) and ``info`` (A1111's ``Processed.js()`` JSON)."""
        infotexts = [p.to_a1111() for p in result.parameters]
        images = [encode_png(im, text) for im, text in zip(result.images, infotexts)] if req.send_images else []
        parameters = req.model_dump()
        if isinstance(req, Img2ImgRequest) and not req.include_init_images:
            parameters["init_images"], parameters["mask"] = None, None
        n = len(result.seeds)
        first = result.parameters[0] if result.parameters else spec.template()
        info = {
            "prompt": spec.prompt, "all_prompts": [spec.prompt] * n,
            "negative_prompt": spec.negative_prompt, "all_negative_prompts": [spec.negative_prompt] * n,
            "seed": result.seeds[0] if result.seeds else spec.seed, "all_seeds": result.seeds,
            "subseed": -1, "all_subseeds": [-1] * n, "subseed_strength": 0.0,
            "width": spec.width, "height": spec.height, "sampler_name": first.sampler,
            "cfg_scale": spec.cfg_scale, "steps": spec.steps, "batch_size": spec.batch_size,
            "restore_faces": False, "face_restoration_model": None,
            "sd_model_name": spec.model.title, "sd_model_hash": None, "sd_vae_name": None, "sd_vae_hash": None,
            "seed_resize_from_w": -1, "seed_resize_from_h": -1,
            "denoising_strength": spec.strength, "extra_generation_params": {},
            "index_of_first_image": 0, "infotexts": infotexts, "styles": req.styles or [],
            "job_timestamp": result.job_timestamp, "clip_skip": (spec.clip_skip or 0) + 1,
            "is_using_inpainting_conditioning": spec.mask_image is not None, "version": _version(),
        }
        return {"images": images, "parameters": parameters, "info": json.dumps(info)}

    async def run_job(self, job: Job, request: Request) -> Any:
        """Queue ``job`` and wait for it; a client that disconnects meanwhile has its job cancelled (unless the
        job has an effect of its own: ``save_images``, a model switch).

        Raises:
            HTTPError: 503 when the queue is full or the server stops.
        """
        try:
            self.worker.submit(job)
        except QueueFull as e:
            raise HTTPError(503, str(e), kind="QueueFull", headers={"Retry-After": str(e.retry_after)}) from None
        except JobCancelled as e:
            raise HTTPError(503, str(e), kind="Unavailable") from None
        waiter = asyncio.wrap_future(job.future)
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=0.25)
            if done:
                break
            if job.cancel_on_disconnect and await request.is_disconnected():
                log.info("client disconnected: %s job cancelled", job.kind)
                job.cancel()
                with contextlib.suppress(BaseException):
                    await waiter
                raise HTTPError(503, "client disconnected", kind="Disconnected")
        try:
            return waiter.result()
        except JobCancelled as e:
            raise HTTPError(503, str(e), kind="Cancelled") from None


def _clip_stop(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(f"CLIP_stop_at_last_layers must be an integer >= 1 (1: the last layer), got "
                                   f"{value!r}")
    return value


def _fit(image: Image.Image, size: tuple[int, int], resize_mode: int) -> Image.Image:
    if image.size == size:
        return image
    if resize_mode == 1:
        return ImageOps.fit(image, size, Image.LANCZOS)
    return image.resize(size, Image.LANCZOS)


def _version() -> str:
    from .. import __version__

    return f"sd_mlx {__version__}"


def _safe_error(err: dict[str, Any]) -> dict[str, Any]:
    """A pydantic error as JSON: the offending input kept only when short and JSON-safe (no NaN, no echo of a
    megabyte body)."""
    from fastapi.encoders import jsonable_encoder

    out = {k: v for k, v in err.items() if k not in ("input", "ctx", "url")}
    try:
        text = json.dumps(jsonable_encoder(err.get("input")), allow_nan=False)
        if len(text) <= 200:
            out["input"] = json.loads(text)
    except (TypeError, ValueError):
        pass
    return jsonable_encoder(out)


def _error(status: int, kind: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": kind, "detail": detail}, headers=headers)


def create_app(config: ServerConfig, *, load: Callable[[ModelEntry], Any] | None = None) -> FastAPI:
    """Build the application (routes, middleware, worker started and stopped with its lifespan).

    Raises:
        ModelNotFoundError, ConfigError, WeightLoadError: the start-up model cannot be opened.
    """
    server = Server(config, load)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.worker.start()
        try:
            yield
        finally:
            await run_in_threadpool(server.worker.stop)

    app = FastAPI(title="sd_mlx", version=_version(), lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.server = server
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    if config.api_auth:
        app.add_middleware(BasicAuth, credentials=config.api_auth)

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, e: HTTPError) -> JSONResponse:
        return _error(e.status, e.kind, e.detail, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(request: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": [_safe_error(err) for err in e.errors()]})

    @app.exception_handler(SDMLXError)
    async def _sdmlx_error(request: Request, e: SDMLXError) -> JSONResponse:
        return _error(_status_of(e), type(e).__name__, str(e))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error in %s", request.url.path)
        return _error(500, type(e).__name__, f"internal error: {e}")

    # ----- page --------------------------------------------------------------------------------------------------
    for route, (name, media) in _PAGE_FILES.items():
        def page(name: str = name, media: str = media) -> FileResponse:
            return FileResponse(STATIC / name, media_type=media, headers={"Cache-Control": "no-cache"})

        app.add_api_route(route, page, methods=["GET"], include_in_schema=False)

    # ----- generation --------------------------------------------------------------------------------------------
    async def generate(req: Txt2ImgRequest | Img2ImgRequest, kind: str, request: Request) -> dict[str, Any]:
        spec = await run_in_threadpool(server.make_spec, req, kind)
        result = await server.run_job(server.worker.generation_job(spec), request)
        return await run_in_threadpool(server.response, req, spec, result)

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(req: Txt2ImgRequest, request: Request) -> dict[str, Any]:
        """Text to image (A1111 ``StableDiffusionProcessingTxt2Img`` fields)."""
        return await generate(req, "txt2img", request)

    @app.post("/sdapi/v1/img2img")
    async def img2img(req: Img2ImgRequest, request: Request) -> dict[str, Any]:
        """Image to image and inpainting (``init_images``, ``denoising_strength``, ``mask``)."""
        return await generate(req, "img2img", request)

    # ----- progress and control ----------------------------------------------------------------------------------
    @app.get("/sdapi/v1/progress")
    async def progress(query: ProgressQuery = Depends()) -> dict[str, Any]:
        """Progress of the running job; ``current_image`` is a preview of its latents (made at its next step)."""
        if not query.skip_current_image:
            server.state.want_preview()
        return server.state.snapshot(query.skip_current_image)

    @app.post("/sdapi/v1/interrupt")
    async def interrupt() -> dict[str, Any]:
        """Stop the running job at its next step (it answers with what it made so far)."""
        server.state.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    async def skip() -> dict[str, Any]:
        """Drop the running batch of the running job and go on with its next batch."""
        server.state.skip()
        return {}

    # ----- lists and options -------------------------------------------------------------------------------------
    @app.get("/sdapi/v1/samplers")
    async def get_samplers() -> list[dict[str, Any]]:
        return [s.as_json() for s in samplers()]

    @app.get("/sdapi/v1/schedulers")
    async def get_schedulers() -> list[dict[str, Any]]:
        return [dict(s) for s in SCHEDULES]

    @app.get("/sdapi/v1/sd-models")
    async def get_models() -> list[dict[str, Any]]:
        return [e.as_json() for e in await run_in_threadpool(server.registry.entries)]

    @app.post("/sdapi/v1/refresh-checkpoints")
    async def refresh() -> dict[str, Any]:
        return {}  # the models folder is listed afresh on every look-up

    @app.get("/sdapi/v1/options")
    async def get_options() -> dict[str, Any]:
        return server.options()

    @app.post("/sdapi/v1/options")
    async def set_options(changes: dict[str, Any], request: Request) -> Response:
        """Change options; ``sd_model_checkpoint`` loads that model (the old one is released) before answering."""
        checked = await run_in_threadpool(server.check_options, changes)
        entry = checked.get("sd_model_checkpoint")
        if entry is not None:
            await run_in_threadpool(server.worker.pipeline_for, entry)  # configs checked before queueing
            await server.run_job(server.worker.switch_job(entry), request)
            server.model = entry
        server.apply_options(checked)
        return JSONResponse(None)

    @app.post("/sdapi/v1/png-info")
    async def png_info(req: PngInfoRequest) -> dict[str, Any]:
        """The generation parameters in a PNG (``info`` text, parsed ``parameters``, other text ``items``)."""
        image = await run_in_threadpool(decode_image, req.image, "image", max_pixels=config.max_image_pixels)
        items = png_text_chunks(image)
        info = items.pop("parameters", "")
        return {"info": info, "items": items, "parameters": parse_infotext(info) if info else {}}

    return app
