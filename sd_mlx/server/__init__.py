"""An HTTP server speaking AUTOMATIC1111's ``/sdapi/v1`` API, with a small web page, on the sd_mlx pipeline.

``python -m sd_mlx.server --model PATH`` (see :mod:`sd_mlx.server.__main__`); in Python::

    from sd_mlx.server import ServerConfig, create_app
    app = create_app(ServerConfig(model="path/to/model"))   # any ASGI server can serve it

Needs the ``server`` extra (``pip install -e ".[server]"``: FastAPI and uvicorn).

Layout: :mod:`.config` (settings, listening rule), :mod:`.app` (routes), :mod:`.worker` (the one generation thread
and its bounded queue), :mod:`.progress` (A1111's progress state), :mod:`.schemas` (request bodies),
:mod:`.samplers` (A1111 sampler names), :mod:`.registry` (models a client may pick), :mod:`.codec` (base64 images,
infotext), :mod:`.preview` (live previews), :mod:`.middleware` (body limit, basic auth), ``static/`` (the page).
"""

from .config import ServerConfig, check_listen, parse_api_auth

__all__ = ["ServerConfig", "check_listen", "parse_api_auth", "create_app"]


def __getattr__(name: str):
    # FastAPI is imported on first use, so `import sd_mlx.server.config` works without the extra.
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module 'sd_mlx.server' has no attribute {name!r}")
