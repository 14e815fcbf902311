"""The server's settings (one dataclass, filled from the command line or by tests) and the listening rule."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidArgumentError
from ..validation import Limits

DEFAULT_PORT = 7860
"""AUTOMATIC1111's port, so its clients find us where they expect the web UI."""


@dataclass
class ServerConfig:
    """Everything a server instance needs.

    Attributes:
        model: the model loaded at start: a diffusers folder, a Hugging Face repo id, or the name of a folder in
            ``models_dir``.
        models_dir: folder whose sub-folders (diffusers Stable Diffusion folders) are the models clients may
            switch to (``GET /sdapi/v1/sd-models``); ``None``: only ``model``.
        output_dir: where ``save_images`` requests write their PNGs (created on first save).
        host, port: where to listen; loopback by default.
        api_auth: ``{user: password}`` for HTTP basic authentication of every route, or ``None``.
        insecure_listen: allow a non-loopback ``host`` without ``api_auth``.
        queue_size: jobs that may wait behind the running one; one more is answered 503.
        limits: request bounds (see :class:`sd_mlx.validation.Limits`).
        max_body_bytes: largest request body (413 above).
        max_image_pixels: largest decoded input image, ``width * height`` (422 above).
        preview_vae: TAESD used for progress previews (a folder with ``taesd_decoder.safetensors``, the file, or a
            diffusers ``AutoencoderTiny`` folder); ``None``: a linear approximation of the latents' colours.
        dtype: weights dtype of the pipelines (``"float32"``, ``"float16"``, ``"bfloat16"``).
        vae: a TAESD decoder instead of each model's VAE (as the CLI's ``--vae``), or ``None``.
    """

    model: str
    models_dir: Path | None = None
    output_dir: Path = Path("outputs")
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_auth: dict[str, str] | None = None
    insecure_listen: bool = False
    queue_size: int = 32
    limits: Limits = field(default_factory=lambda: Limits(max_steps=150, max_side=2048, max_images=16))
    max_body_bytes: int = 32 * 2**20
    max_image_pixels: int = 4096 * 4096
    preview_vae: Path | None = None
    dtype: str = "float32"
    vae: str | None = None


def parse_api_auth(text: str) -> dict[str, str]:
    """``"user:password[,user2:password2]"`` (AUTOMATIC1111's ``--api-auth`` format) -> ``{user: password}``.

    Raises:
        InvalidArgumentError: an entry without ``:``, or an empty user name or password.
    """
    creds: dict[str, str] = {}
    for entry in text.split(","):
        user, sep, password = entry.strip().partition(":")
        if not sep or not user or not password:
            raise InvalidArgumentError(f"--api-auth expects user:password[,user2:password2], got an entry "
                                       f"{entry.strip()!r}")
        creds[user] = password
    return creds


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is a loopback address only this machine can reach."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_listen(host: str, api_auth: dict[str, str] | None, insecure_listen: bool) -> str | None:
    """Apply the listening rule: a non-loopback ``host`` needs ``api_auth`` or ``insecure_listen``.

    Returns:
        A warning to print (listening beyond loopback without authentication), or ``None``.

    Raises:
        InvalidArgumentError: a non-loopback ``host`` with neither.
    """
    if is_loopback(host) or api_auth:
        return None
    if not insecure_listen:
        raise InvalidArgumentError(f"--host {host} makes the server reachable from other machines; pass "
                                   f"--api-auth user:password to require a login, or --insecure-listen to accept "
                                   f"that anyone who can reach it may use it")
    return (f"listening on {host} without --api-auth: anyone who can reach this address can generate images, "
            f"switch models and interrupt jobs")
