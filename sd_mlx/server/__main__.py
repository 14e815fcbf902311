"""Command line: ``python -m sd_mlx.server --model PATH [--models-dir DIR] [--host 127.0.0.1] [--port 7860]``.

Serves the AUTOMATIC1111-compatible API and the web page (``http://127.0.0.1:7860/``) with uvicorn. Listening on
anything but loopback needs ``--api-auth user:password`` (HTTP basic, as A1111's flag) or ``--insecure-listen``.
Bad options and a model that cannot be opened are reported as one line with exit status 2, before listening.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

# sd_mlx must be imported before mlx (it loads a fast BLAS on Linux first).
import sd_mlx

from ..txt2img import DEFAULT_MODEL, MODEL_HELP, _HelpFormatter
from ..validation import Limits
from .config import DEFAULT_PORT, ServerConfig, check_listen, parse_api_auth


def build_parser() -> argparse.ArgumentParser:
    """The server's argument parser (every option's help states its default)."""
    p = argparse.ArgumentParser(prog="python -m sd_mlx.server", formatter_class=_HelpFormatter,
                                description="Serve Stable Diffusion over AUTOMATIC1111's HTTP API, with a web page.")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"the model loaded at start: {MODEL_HELP}, or the name "
                   f"of a folder in --models-dir")
    p.add_argument("--models-dir", type=Path, default=None, help="folder of models clients may switch to "
                   "(sd_model_checkpoint): diffusers folders and single .safetensors/.ckpt files; nothing outside "
                   "it is ever read for a client (default: none, only --model)")
    p.add_argument("--output-dir", type=Path, default=Path("outputs"), help="where requests with save_images "
                   "write their PNGs")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; anything but loopback needs "
                   "--api-auth or --insecure-listen")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on")
    p.add_argument("--api-auth", default=None, metavar="USER:PASSWORD[,...]",
                   help="require HTTP basic authentication on every route (default: none)")
    p.add_argument("--insecure-listen", action="store_true",
                   help="allow a non-loopback --host without --api-auth (prints a warning)")
    p.add_argument("--queue-size", type=int, default=32, help="jobs that may wait behind the running one; more "
                   "are answered 503 with Retry-After")
    p.add_argument("--max-steps", type=int, default=150, help="most sampling steps one request may ask for")
    p.add_argument("--max-side", type=int, default=2048, help="largest width or height in pixels")
    p.add_argument("--max-images", type=int, default=16, help="most images per request (batch_size * n_iter)")
    p.add_argument("--max-body-mb", type=float, default=32, help="largest request body in MiB (413 above)")
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096,
                   help="largest decoded input image, width * height")
    p.add_argument("--preview-vae", type=Path, default=None, metavar="PATH",
                   help="TAESD for live previews (a folder with taesd_decoder.safetensors, or the file) (default: a "
                        "cheap linear colour approximation)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="weights dtype")
    p.add_argument("--vae", default=None, metavar="taesd|PATH", help="decode with a TAESD instead of each "
                   "model's VAE (default: the model's VAE)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's and the server's log level")
    return p


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Check the options and build the :class:`ServerConfig`.

    Raises:
        InvalidArgumentError: a bad limit, a bad --api-auth, or a non-loopback --host without --api-auth or
            --insecure-listen.
    """
    for name in ("port", "queue_size", "max_steps", "max_side", "max_images", "max_image_pixels"):
        value = getattr(args, name)
        if value < (0 if name == "port" else 1):
            raise sd_mlx.InvalidArgumentError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.max_body_mb <= 0:
        raise sd_mlx.InvalidArgumentError(f"--max-body-mb must be > 0, got {args.max_body_mb}")
    auth = parse_api_auth(args.api_auth) if args.api_auth else None
    warning = check_listen(args.host, auth, args.insecure_listen)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return ServerConfig(model=args.model, models_dir=args.models_dir, output_dir=args.output_dir, host=args.host,
                        port=args.port, api_auth=auth, insecure_listen=args.insecure_listen,
                        queue_size=args.queue_size,
                        limits=Limits(max_steps=args.max_steps, max_side=args.max_side, max_images=args.max_images),
                        max_body_bytes=int(args.max_body_mb * 2**20), max_image_pixels=args.max_image_pixels,
                        preview_vae=args.preview_vae, dtype=args.dtype, vae=args.vae)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until Ctrl-C / SIGTERM; returns the exit status (0 after a clean stop, 2 bad options or
    model).

    Raises:
        SystemExit: from argparse for unparseable options (status 2) and ``--help`` (status 0).
    """
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        import uvicorn

        from .app import create_app

        logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
        app = create_app(config)
    except sd_mlx.SDMLXError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"error: {e.name or e}: the server needs its extra: pip install -e \".[server]\"", file=sys.stderr)
        return 2
    print(f"sd_mlx server: http://{config.host}:{config.port}/ (API under /sdapi/v1, model "
          f"{app.state.server.model.title})", file=sys.stderr)
    uvicorn.run(app, host=config.host, port=config.port, log_level=args.log_level, timeout_graceful_shutdown=3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
