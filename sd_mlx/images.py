"""Images: arrays to PIL, A1111-style PNG parameters, and atomic, non-clobbering saves."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, PngImagePlugin

from .errors import OutputError


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Convert float images in ``[0, 1]``, shape ``(B, H, W, 3)``, to ``uint8`` as diffusers does.

    diffusers' ``numpy_to_pil`` multiplies by 255 and rounds half to even (``np.round``); values are clipped first.
    """
    return np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """``(B, H, W, 3)`` float images in ``[0, 1]`` -> list of RGB ``PIL.Image``."""
    return [Image.fromarray(im, mode="RGB") for im in to_uint8(images)]


def from_pil(image: Image.Image) -> np.ndarray:
    """RGB ``PIL.Image`` -> ``(H, W, 3)`` float32 array in ``[-1, 1]`` (the VAE's input range)."""
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0


@dataclass(frozen=True)
class GenerationParameters:
    """What made one image, written into its PNG as the A1111 ``parameters`` text chunk.

    Attributes:
        prompt, negative_prompt: the text as given.
        steps: ``num_inference_steps``.
        sampler: A1111 sampler name (e.g. ``"Euler a"``, ``"DPM++ 2M Karras"``).
        cfg_scale: ``guidance_scale``.
        seed: the seed of this image (``seed + k`` for image ``k`` of a batch).
        width, height: pixels.
        model: the model name or folder given by the user.
    """

    prompt: str
    negative_prompt: str
    steps: int
    sampler: str
    cfg_scale: float
    seed: int
    width: int
    height: int
    model: str

    def to_a1111(self) -> str:
        """The text of the ``parameters`` chunk, in the layout AUTOMATIC1111's web UI writes and reads back."""
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        lines.append(f"Steps: {self.steps}, Sampler: {self.sampler}, CFG scale: {self.cfg_scale:g}, "
                     f"Seed: {self.seed}, Size: {self.width}x{self.height}, Model: {self.model}")
        return "\n".join(lines)


def check_output_dir(path: Path | str) -> Path:
    """Check that files can be created in folder ``path`` (before any long work starts).

    Raises:
        OutputError: the folder does not exist, is not a folder, or is not writable.
    """
    folder = Path(path)
    if not folder.exists():
        raise OutputError(f"{folder}: output folder does not exist; create it first (mkdir -p {folder})")
    if not folder.is_dir():
        raise OutputError(f"{folder}: not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{folder}: output folder is not writable; choose another with --output")
    return folder


def save_png(image: Image.Image, path: Path | str, *, parameters: str | None = None,
             overwrite: bool = False) -> Path:
    """Write ``image`` as a PNG atomically, with an optional ``parameters`` text chunk.

    The PNG is written to a temporary file in the same folder, then moved into place: without ``overwrite`` by a
    hard link that fails if ``path`` exists (so a file appearing meanwhile is never replaced), with ``overwrite`` by
    ``os.replace``. An interrupted save (error, Ctrl-C) leaves no partial file.

    Raises:
        OutputError: ``path`` exists and ``overwrite`` is false; or the folder is missing or not writable.
    """
    path = Path(path)
    check_output_dir(path.parent if str(path.parent) else Path("."))
    if path.exists() and not overwrite:
        raise OutputError(f"{path}: file exists; pass --overwrite (overwrite=True) to replace it, or choose "
                          f"another name")
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OutputError(f"{path.parent}: cannot create files there ({e.strerror}); choose another --output") \
            from None
    try:
        with os.fdopen(fd, "wb") as fh:
            image.save(fh, format="PNG", pnginfo=info)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise OutputError(f"{path}: file exists; pass --overwrite to replace it") from None
            except OSError:  # file systems without hard links: exclusive create is not atomic there
                if path.exists():
                    raise OutputError(f"{path}: file exists; pass --overwrite to replace it") from None
                os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if os.path.exists(tmp):
        os.unlink(tmp)
    return path


def next_free_paths(folder: Path | str, stem: str, count: int) -> list[Path]:
    """``count`` file names ``{stem}-{NNNNN}.png`` in ``folder`` that do not exist yet, numbered after the highest
    existing one, so default names never collide with earlier outputs."""
    folder = Path(folder)
    highest = -1
    for p in folder.glob(f"{stem}-*.png"):
        tail = p.stem[len(stem) + 1:]
        if tail.isdigit():
            highest = max(highest, int(tail))
    return [folder / f"{stem}-{highest + 1 + k:05d}.png" for k in range(count)]


def read_parameters(path: Path | str) -> str | None:
    """The ``parameters`` text chunk of a PNG, or ``None``."""
    with Image.open(path) as im:
        return im.info.get("parameters")


def expand_output_paths(output: str | None, count: int, default_stem: str = "sd_mlx") -> list[Path]:
    """Paths for ``count`` images from the CLI's ``--output`` value.

    ``None`` -> ``./{default_stem}-NNNNN.png``; an existing folder -> numbered names inside it; a file name with
    one image -> that name; with several images -> ``name-1.png``, ``name-2.png``... Names gain ``.png`` if missing.

    Raises:
        OutputError: see :func:`check_output_dir`.
    """
    if output is None:
        return next_free_paths(check_output_dir("."), default_stem, count)
    p = Path(output)
    if p.is_dir():
        return next_free_paths(check_output_dir(p), default_stem, count)
    if p.suffix.lower() != ".png":
        p = p.with_name(p.name + ".png")
    check_output_dir(p.parent if str(p.parent) else Path("."))
    if count == 1:
        return [p]
    return [p.with_name(f"{p.stem}-{k + 1}{p.suffix}") for k in range(count)]


def make_grid(images: Sequence[Image.Image], rows: int, cols: int) -> Image.Image:
    """Paste equally sized ``images`` row by row into a ``rows`` x ``cols`` grid image."""
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid
