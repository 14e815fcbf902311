"""Images over JSON: base64 PNG out (with the ``parameters`` chunk), base64 images in (bounded), infotext parsing.

AUTOMATIC1111 sends images as plain base64 (no ``data:`` prefix) and accepts both forms; so do these functions.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import warnings
from typing import Any

from PIL import Image, PngImagePlugin

from ..errors import InvalidArgumentError


def encode_png(image: Image.Image, parameters: str | None = None) -> str:
    """``image`` as base64 PNG text, with ``parameters`` as its ``parameters`` text chunk (A1111's infotext)."""
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_image(text: Any, what: str, *, max_pixels: int) -> Image.Image:
    """Decode one base64 image (optionally a ``data:image/...;base64,`` URL) and load it.

    The size is read from the header before the pixels are decoded, so an image above ``max_pixels`` costs no
    memory. URLs are not fetched (the server reads no resource a client names).

    Args:
        text: the base64 string.
        what: the field name for messages (``"init_images[0]"``, ``"mask"``).
        max_pixels: most ``width * height``.

    Returns:
        The loaded ``PIL.Image`` (mode as stored).

    Raises:
        InvalidArgumentError: not a string, a URL, not base64, not an image Pillow reads, or too large.
    """
    if not isinstance(text, str) or not text.strip():
        raise InvalidArgumentError(f"{what} must be a base64-encoded image, got {type(text).__name__}")
    text = text.strip()
    if text.startswith(("http://", "https://")):
        raise InvalidArgumentError(f"{what}: image URLs are not fetched; send the image itself as base64")
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or ";base64" not in head:
            raise InvalidArgumentError(f"{what}: a data URL must be 'data:image/...;base64,<data>'")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgumentError(f"{what} is not valid base64") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
            w, h = image.size
            if w * h > max_pixels:
                raise InvalidArgumentError(f"{what} is {w}x{h} = {w * h} pixels, above this server's limit of "
                                           f"{max_pixels} (--max-image-pixels)")
            image.load()
    except InvalidArgumentError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidArgumentError(f"{what} is too large to decode safely") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad data
        raise InvalidArgumentError(f"{what} is not an image Pillow can read ({type(e).__name__}: {e})") from None
    return image


def png_text_chunks(image: Image.Image) -> dict[str, str]:
    """The text chunks of a decoded PNG (``{key: text}``; other formats give ``{}``)."""
    return {k: v for k, v in getattr(image, "info", {}).items() if isinstance(k, str) and isinstance(v, str)}


_PAIR = re.compile(r'\s*([\w][\w \-/+.()]*?):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> dict[str, Any]:
    """Parse an A1111 infotext (the ``parameters`` chunk) into A1111's ``png-info`` ``parameters`` dict.

    The layout: the prompt (one or more lines), optionally ``Negative prompt: ...`` (one or more lines), and a
    last line of ``Key: value`` pairs separated by commas (values with commas are JSON-quoted). Keys map to their
    text values; ``Size: WxH`` becomes ``Size-1`` and ``Size-2`` as A1111 reports it; ``Prompt`` and
    ``Negative prompt`` hold the texts.
    """
    lines = text.strip().split("\n") if text else []
    tail = ""
    if lines and len(_PAIR.findall(lines[-1])) >= 3:
        tail = lines.pop()
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out: dict[str, Any] = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PAIR.findall(tail):
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except ValueError:
                pass
        m = re.fullmatch(r"(\d+)x(\d+)", value) if isinstance(value, str) else None
        if m:
            out[f"{key}-1"], out[f"{key}-2"] = m.group(1), m.group(2)
        else:
            out[key] = value
    return out
