"""The HTTP server (``sd_mlx.server``): AUTOMATIC1111 API fields and types, queue, interrupts, disconnects, limits,
validation shared with the CLI, path safety, auth, and a load test. All on 127.0.0.1, on the tiny checkpoints
(64x64 images, 2-3 steps), bounded in time: every wait has a deadline.

One server (a real uvicorn on a free loopback port, in a thread) serves most tests; the queue-limit and auth tests
start their own. Long jobs (1000 steps) are only ever run to be interrupted or cancelled.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the server extra is not installed (pip install -e '.[server]')")
pytest.importorskip("uvicorn", reason="the server extra is not installed (pip install -e '.[server]')")

import sd_mlx  # noqa: E402
from PIL import Image  # noqa: E402

from _live_server import LiveServer, decode_png, free_port, png_b64  # noqa: E402
from sd_mlx import txt2img  # noqa: E402
from sd_mlx.pipeline import load_pipeline  # noqa: E402
from sd_mlx.server import ServerConfig, check_listen, parse_api_auth  # noqa: E402
from sd_mlx.server import worker as worker_module  # noqa: E402
from sd_mlx.server.codec import parse_infotext  # noqa: E402
from sd_mlx.validation import Limits  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / ".cache" / "test-artifacts"
SMALL = {"width": 64, "height": 64, "steps": 2}
LONG = {"width": 64, "height": 64, "steps": 1000}  # only run to be interrupted / cancelled

INFO_KEYS = {"prompt": str, "all_prompts": list, "negative_prompt": str, "all_negative_prompts": list, "seed": int,
             "all_seeds": list, "subseed": int, "all_subseeds": list, "subseed_strength": float, "width": int,
             "height": int, "sampler_name": str, "cfg_scale": float, "steps": int, "batch_size": int,
             "restore_faces": bool, "sd_model_name": str, "seed_resize_from_w": int, "seed_resize_from_h": int,
             "extra_generation_params": dict, "index_of_first_image": int, "infotexts": list, "styles": list,
             "job_timestamp": str, "clip_skip": int, "is_using_inpainting_conditioning": bool, "version": str}
STATE_KEYS = {"skipped": bool, "interrupted": bool, "stopping_generation": bool, "job": str, "job_count": int,
              "job_timestamp": str, "job_no": int, "sampling_step": int, "sampling_steps": int}


def _link_copy(src: Path, dst: Path) -> Path:
    """A copy of a checkpoint folder made of hard links (no extra disk), falling back to copies."""
    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link)
    return dst


@pytest.fixture(scope="module")
def models_dir(tiny_sd1, tiny_sd2, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    _link_copy(tiny_sd1, root / "tiny-sd1")
    _link_copy(tiny_sd2, root / "tiny-sd2")
    return root


def _config(models_dir: Path, tmp: Path, assets: Path, **kw) -> ServerConfig:
    base = dict(model="tiny-sd1", models_dir=models_dir, output_dir=tmp / "outputs", preview_vae=assets / "taesd",
                limits=Limits(max_steps=1000, max_side=512, max_images=16), max_body_bytes=2**20,
                max_image_pixels=256 * 256, queue_size=32)
    base.update(kw)
    return ServerConfig(**base)


@pytest.fixture(scope="module")
def srv(models_dir, assets, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    with LiveServer(_config(models_dir, tmp, assets)) as s:
        yield s


@pytest.fixture(scope="module")
def ref_pipe(models_dir):
    """The same model, called directly (the reference for the server's images)."""
    return load_pipeline(models_dir / "tiny-sd1")


def _txt2img(srv, **fields):
    return srv.call("POST", "/sdapi/v1/txt2img", {"prompt": "a red fox", **SMALL, **fields})


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(decode_png(b64).convert("RGB"))


def _check_types(obj: dict, spec: dict) -> None:
    for key, typ in spec.items():
        assert key in obj, key
        if typ is float:
            assert isinstance(obj[key], (int, float)) and not isinstance(obj[key], bool), (key, obj[key])
        else:
            assert isinstance(obj[key], typ), (key, obj[key])


def _idle(srv) -> None:
    srv.wait_for(lambda p: not srv.server.worker.busy(), what="an idle server")


# ------------------------------------------------------------------------------------------------- txt2img
def test_txt2img_fields_types_and_images_equal_the_pipeline(srv, ref_pipe):
    status, _, r = _txt2img(srv, negative_prompt="blurry", seed=11, batch_size=2, n_iter=2, cfg_scale=6.5,
                            sampler_name="Euler a")
    assert status == 200, r
    assert set(r) == {"images", "parameters", "info"}
    assert isinstance(r["images"], list) and len(r["images"]) == 4 and all(isinstance(i, str) for i in r["images"])
    params = r["parameters"]
    for key, value in {"prompt": "a red fox", "negative_prompt": "blurry", "seed": 11, "batch_size": 2, "n_iter": 2,
                       "steps": 2, "cfg_scale": 6.5, "width": 64, "height": 64, "sampler_name": "Euler a",
                       "send_images": True, "save_images": False, "sampler_index": "Euler",
                       "override_settings": None}.items():
        assert params[key] == value, key
    assert isinstance(r["info"], str)
    info = json.loads(r["info"])
    _check_types(info, INFO_KEYS)
    assert info["all_seeds"] == [11, 12, 13, 14] and info["seed"] == 11 and info["sampler_name"] == "Euler a"
    assert info["all_prompts"] == ["a red fox"] * 4 and info["sd_model_name"] == "tiny-sd1"
    # each image: a PNG carrying its infotext, pixel-equal to the pipeline's image for that seed
    for k, b64 in enumerate(r["images"]):
        im = decode_png(b64)
        assert im.format == "PNG" and im.size == (64, 64)
        assert im.info["parameters"] == info["infotexts"][k]
        assert info["infotexts"][k] == ("a red fox\nNegative prompt: blurry\nSteps: 2, Sampler: Euler a, CFG scale: "
                                        f"6.5, Seed: {11 + k}, Size: 64x64, Model: tiny-sd1")
    direct = ref_pipe("a red fox", negative_prompt="blurry", num_inference_steps=2, guidance_scale=6.5, height=64,
                      width=64, num_images_per_prompt=2, seed=13, scheduler="euler_a")
    for k in range(2):
        np.testing.assert_array_equal(_pixels(r["images"][2 + k]), np.asarray(direct.images[k]))
        # the infotext the server writes is the pipeline's (model name: the title clients use)
        assert info["infotexts"][2 + k] == direct.parameters[k].to_a1111().replace(
            f"Model: {ref_pipe.model_name}", "Model: tiny-sd1")


def test_txt2img_defaults_random_seed_send_images_and_karras_schedule(srv):
    r = srv.ok("POST", "/sdapi/v1/txt2img", {"prompt": "x", **SMALL, "send_images": False})
    info = json.loads(r["info"])
    assert r["images"] == [] and r["parameters"]["seed"] == -1
    assert 0 <= info["seed"] < 2**64 and info["sampler_name"] == "Euler"  # A1111's default sampler
    r = srv.ok("POST", "/sdapi/v1/txt2img", {"prompt": "x", **SMALL, "seed": 1, "sampler_name": "DPM++ 2M",
                                             "scheduler": "Karras"})
    assert json.loads(r["info"])["sampler_name"] == "DPM++ 2M Karras"
    assert "Sampler: DPM++ 2M Karras," in decode_png(r["images"][0]).info["parameters"]


def test_samplers_and_schedulers_lists(srv):
    items = srv.ok("GET", "/sdapi/v1/samplers")
    names = [s["name"] for s in items]
    for name in ("Euler", "Euler a", "DDIM", "DPM++ 2M", "DPM++ 2M Karras", "DPM++ 2M SDE", "LMS", "Heun", "PLMS",
                 "LCM"):
        assert name in names
    for s in items:
        assert set(s) == {"name", "aliases", "options"} and isinstance(s["aliases"], list)
        assert isinstance(s["options"], dict)
    assert next(s for s in items if s["name"] == "Euler a")["aliases"][:2] == ["euler_a", "k_euler_a"]
    for name in ("DDIM", "DPM++ 2M Karras", "LMS"):  # every listed name works, and is what the infotext says
        r = srv.ok("POST", "/sdapi/v1/txt2img", {"prompt": "x", **SMALL, "seed": 0, "sampler_name": name})
        assert json.loads(r["info"])["sampler_name"] == name
    scheds = srv.ok("GET", "/sdapi/v1/schedulers")
    assert [s["label"] for s in scheds] == ["Automatic", "Karras"] and set(scheds[0]) == {
        "name", "label", "aliases", "default_rho", "need_inner_model"}


# ------------------------------------------------------------------------------------------------- progress
def test_progress_preview_interrupt_and_next_job(srv):
    _idle(srv)
    idle = srv.ok("GET", "/sdapi/v1/progress")
    assert idle["progress"] == 0 and idle["eta_relative"] == 0 and idle["current_image"] is None
    _check_types(idle["state"], STATE_KEYS)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("r", _txt2img(srv, **LONG, seed=5)))
    t.start()
    try:
        srv.wait_for(lambda p: p["state"]["sampling_step"] >= 2, what="the long job to run")
        preview = None
        deadline = time.monotonic() + 60
        while preview is None and time.monotonic() < deadline:  # asking for it makes the worker decode one
            p = srv.ok("GET", "/sdapi/v1/progress")
            preview = p["current_image"]
            time.sleep(0.05)
        assert preview is not None
        assert set(p) == {"progress", "eta_relative", "state", "current_image", "textinfo"}
        _check_types(p["state"], STATE_KEYS)
        assert 0 < p["progress"] < 1 and p["eta_relative"] > 0 and p["state"]["job"] == "txt2img"
        assert p["state"]["job_count"] == 1 and p["state"]["sampling_steps"] == 1000
        assert decode_png(preview).size == (64, 64)  # TAESD decodes the 8x8 latents to full size
        assert srv.ok("GET", "/sdapi/v1/progress?skip_current_image=true")["current_image"] is None
        assert srv.ok("POST", "/sdapi/v1/interrupt") == {}
        t.join(60)
    finally:
        srv.server.state.interrupt()
        t.join(60)
    status, _, r = result["r"]
    assert status == 200 and len(r["images"]) == 1  # A1111 answers an interrupt with the image as it stands
    assert srv.server.worker.outcomes[-1] == ("txt2img", "interrupted")
    assert srv.ok("GET", "/sdapi/v1/progress")["state"]["job_count"] == 0
    assert len(_txt2img(srv, seed=1)[2]["images"]) == 1  # the next job runs normally


def test_interrupt_and_skip_when_idle(srv):
    _idle(srv)
    assert srv.ok("POST", "/sdapi/v1/interrupt") == {}
    assert srv.ok("POST", "/sdapi/v1/skip") == {}
    r = _txt2img(srv, seed=3)[2]  # an interrupt asked while idle does not hit the next job
    assert len(r["images"]) == 1 and srv.server.worker.outcomes[-1] == ("txt2img", "done")


def test_disconnect_mid_job_and_while_queued_cancels_them(srv):
    _idle(srv)
    body = json.dumps({"prompt": "gone", **LONG, "seed": 1}).encode()
    request = (b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    before = len(srv.server.worker.outcomes)
    running = socket.create_connection(("127.0.0.1", srv.port))
    running.sendall(request)
    srv.wait_for(lambda p: p["state"]["sampling_step"] >= 1, what="the job to start")
    queued = socket.create_connection(("127.0.0.1", srv.port))
    queued.sendall(request)
    deadline = time.monotonic() + 30
    while srv.server.worker.waiting() < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    queued.close()
    running.close()
    _idle(srv)
    assert list(srv.server.worker.outcomes)[before:] == [("txt2img", "cancelled")] * 2
    assert len(_txt2img(srv, seed=2)[2]["images"]) == 1  # and the server serves the next client


def test_failed_job_leaves_the_server_ready(srv, monkeypatch):
    original = worker_module.call_pipeline

    def flaky(pipe, spec, seed, callback):
        if spec.prompt == "explode":
            raise RuntimeError("simulated failure in the job")
        if spec.prompt == "nan":
            raise sd_mlx.NonFiniteError("NaN or Inf appeared during denoising (step 1 of 2)")
        return original(pipe, spec, seed, callback)

    monkeypatch.setattr(worker_module, "call_pipeline", flaky)
    status, _, r = _txt2img(srv, prompt="explode")
    assert status == 500 and r["error"] == "RuntimeError" and "simulated failure" in r["detail"]
    status, _, r = _txt2img(srv, prompt="nan")
    assert status == 500 and r["error"] == "NonFiniteError" and "step 1 of 2" in r["detail"]
    assert srv.ok("GET", "/sdapi/v1/progress")["state"]["job_count"] == 0
    assert len(_txt2img(srv, prompt="fine")[2]["images"]) == 1


# ------------------------------------------------------------------------------------------------- models
def test_sd_models_options_and_model_switch(srv, models_dir):
    _idle(srv)
    models = srv.ok("GET", "/sdapi/v1/sd-models")
    assert [m["title"] for m in models] == ["tiny-sd1", "tiny-sd2"]
    for m in models:
        assert set(m) == {"title", "model_name", "hash", "sha256", "filename", "config"}
    opts = srv.ok("GET", "/sdapi/v1/options")
    assert opts["sd_model_checkpoint"] == "tiny-sd1" and opts["CLIP_stop_at_last_layers"] == 1
    old = srv.server.worker.pipe
    assert set(old.loaded_models) == {"text_encoder", "unet", "vae"}
    try:
        assert srv.call("POST", "/sdapi/v1/options", {"sd_model_checkpoint": "tiny-sd2"})[0] == 200
        assert srv.ok("GET", "/sdapi/v1/options")["sd_model_checkpoint"] == "tiny-sd2"
        new = srv.server.worker.pipe
        assert new is not old and old.loaded_models == () and set(new.loaded_models) == {"text_encoder", "unet",
                                                                                          "vae"}
        assert srv.server.worker.entry.title == "tiny-sd2"
        r = _txt2img(srv, seed=4)[2]
        assert json.loads(r["info"])["sd_model_name"] == "tiny-sd2"
        assert decode_png(r["images"][0]).info["parameters"].endswith("Model: tiny-sd2")
        # a per-request override runs on that model, and the option stays (A1111's restore-afterwards default)
        r = _txt2img(srv, seed=4, override_settings={"sd_model_checkpoint": "tiny-sd1"})[2]
        assert json.loads(r["info"])["sd_model_name"] == "tiny-sd1"
        assert srv.ok("GET", "/sdapi/v1/options")["sd_model_checkpoint"] == "tiny-sd2"
    finally:
        srv.ok("POST", "/sdapi/v1/options", {"sd_model_checkpoint": "tiny-sd1"})
    assert srv.server.worker.entry.title == "tiny-sd1"


def test_clip_skip_option_and_override(srv):
    try:
        srv.ok("POST", "/sdapi/v1/options", {"CLIP_stop_at_last_layers": 2})
        info = json.loads(_txt2img(srv, seed=1)[2]["info"])
        assert info["clip_skip"] == 2
    finally:
        srv.ok("POST", "/sdapi/v1/options", {"CLIP_stop_at_last_layers": 1})
    info = json.loads(_txt2img(srv, seed=1, override_settings={"CLIP_stop_at_last_layers": 2})[2]["info"])
    assert info["clip_skip"] == 2
    assert srv.ok("GET", "/sdapi/v1/options")["CLIP_stop_at_last_layers"] == 1


def test_no_path_outside_models_dir_or_output_dir(srv, models_dir, tiny_sd1, tmp_path):
    outside = tmp_path / "outside-model"
    _link_copy(tiny_sd1, outside)
    link = models_dir / "linked-out"
    link.symlink_to(outside, target_is_directory=True)
    try:
        titles = [m["title"] for m in srv.ok("GET", "/sdapi/v1/sd-models")]
        assert "linked-out" not in titles  # a link leading outside the models folder is not listed
        for name in ("../outside-model", str(outside), "/etc", "..", "tiny-sd1/../tiny-sd2", "linked-out",
                     str(models_dir / "tiny-sd2"), "~"):
            status, _, r = srv.call("POST", "/sdapi/v1/options", {"sd_model_checkpoint": name})
            assert status == 404 and "not found" in r["detail"], (name, r)
            status, _, r = _txt2img(srv, override_settings={"sd_model_checkpoint": name})
            assert status == 404 and "not found" in r["detail"], (name, r)
    finally:
        link.unlink()
    for key in ("outdir_samples", "outdir_txt2img_samples", "outdir_img2img_samples"):
        status, _, r = srv.call("POST", "/sdapi/v1/options", {key: "/tmp/elsewhere"})
        assert status == 422 and "cannot be changed" in r["detail"]
    for path in ("/../../etc/passwd", "/static/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/app.js/../x"):
        assert srv.call("GET", path)[0] == 404, path
    # save_images writes numbered PNGs (with their parameters) into the output folder only
    out = srv.server.output_dir
    r = _txt2img(srv, seed=9, save_images=True, batch_size=2)[2]
    saved = sorted(out.glob("sd_mlx-*.png"))
    assert len(saved) == 2 and all(p.parent == out for p in saved)
    with Image.open(saved[0]) as im:
        assert im.info["parameters"] == json.loads(r["info"])["infotexts"][0]
    assert srv.ok("GET", "/sdapi/v1/options")["outdir_samples"] == str(out)


# ------------------------------------------------------------------------------------------------- png-info
def test_png_info_round_trip(srv):
    r = _txt2img(srv, negative_prompt="ugly, blurry", seed=21)[2]
    info = srv.ok("POST", "/sdapi/v1/png-info", {"image": r["images"][0]})
    assert set(info) == {"info", "items", "parameters"}
    assert info["info"] == json.loads(r["info"])["infotexts"][0] and info["items"] == {}
    assert info["parameters"] == {"Prompt": "a red fox", "Negative prompt": "ugly, blurry", "Steps": "2",
                                  "Sampler": "Euler", "CFG scale": "7", "Seed": "21", "Size-1": "64", "Size-2": "64",
                                  "Model": "tiny-sd1"}
    info = srv.ok("POST", "/sdapi/v1/png-info", {"image": "data:image/png;base64," + r["images"][0]})
    assert info["parameters"]["Seed"] == "21"
    jpeg = srv.ok("POST", "/sdapi/v1/png-info", {"image": png_b64(Image.new("RGB", (8, 8)), "JPEG")})
    assert jpeg == {"info": "", "items": {}, "parameters": {}}


def test_parse_infotext_multiline_and_quoted():
    text = 'line one\nline two\nNegative prompt: bad\nworse\nSteps: 5, Sampler: DPM++ 2M, Note: "a, b", Size: 8x16'
    assert parse_infotext(text) == {"Prompt": "line one\nline two", "Negative prompt": "bad\nworse", "Steps": "5",
                                    "Sampler": "DPM++ 2M", "Note": "a, b", "Size-1": "8", "Size-2": "16"}


# ------------------------------------------------------------------------------------------------- img2img
def test_img2img_parsing_then_501_without_pipeline_support(srv):
    image = png_b64(Image.new("RGB", (64, 64), (200, 10, 10)))
    mask = png_b64(Image.new("L", (64, 64), 255))
    base = {"prompt": "x", **SMALL, "init_images": [image]}
    cases = [({}, 422, "init_images is required"),
             ({"init_images": ["###"]}, 422, "init_images[0] is not valid base64"),
             ({"init_images": [base64.b64encode(b"not an image").decode()]}, 422, "not an image Pillow can read"),
             ({"init_images": [png_b64(Image.new("RGB", (300, 300)))]}, 422, "above this server's limit"),
             ({"init_images": ["http://127.0.0.1/x.png"]}, 422, "URLs are not fetched"),
             ({"denoising_strength": 1.5}, 422, "denoising_strength must be between 0 and 1"),
             ({"mask": "@@"}, 422, "mask is not valid base64"),
             ({"inpainting_fill": 7}, 422, "inpainting_fill must be 0, 1, 2 or 3"),
             ({"resize_mode": 3}, 422, "resize_mode 3 is not supported"),
             ({"width": 65}, 422, "width=65 is not a multiple of 8")]
    for extra, status, text in cases:
        body = {**base, **extra}
        if not extra:
            body.pop("init_images")
        got, _, r = srv.call("POST", "/sdapi/v1/img2img", body)
        assert got == status and text in r["detail"], (extra, got, r)
    got, _, r = srv.call("POST", "/sdapi/v1/img2img", {**base, "mask": mask, "denoising_strength": 0.5})
    if worker_module.supports_img2img(srv.server.worker.pipe):
        assert got == 200 and len(r["images"]) == 1
    else:
        assert got == 501 and "img2img is not available in this build" in r["detail"]


# ------------------------------------------------------------------------------------------------- validation
def _cli_error(capsys, args) -> str:
    code = txt2img.main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 2, err
    return err.strip().splitlines()[-1].removeprefix("error: ")


def test_validation_messages_are_the_clis(srv, models_dir, capsys, tmp_path):
    """The same bad value gets the same message from the CLI and the server (field names aside)."""
    model = models_dir / "tiny-sd1"
    cases = [(["--width", 427], {"width": 427}), (["--height", 12], {"height": 12}), (["--steps", 0], {"steps": 0}),
             (["--num-images", 0], {"batch_size": 0}), (["--seed", 2**64], {"seed": 2**64}),
             (["--seed", -5], {"seed": -5}), (["--scheduler", "nope"], {"sampler_name": "nope"}),
             (["--steps", 1001, "--scheduler", "euler"], {"steps": 1001, "sampler_name": "euler"})]
    names = {"--steps": "steps", "--num-images": "batch_size"}
    for cli_args, fields in cases:
        cli = _cli_error(capsys, ["a cat", "--model", model, "--output", tmp_path / "x.png", *cli_args])
        for a, b in names.items():
            cli = cli.replace(a, b)
        status, _, r = _txt2img(srv, **fields)
        assert status == 422, (fields, r)
        if fields.get("steps") == 1001:
            assert r["detail"] == "steps=1001 is above this server's limit of 1000 steps (--max-steps)"
            assert cli.startswith("num_inference_steps must be between 1 and 1000")
        else:
            assert r["detail"] == cli, (fields, r["detail"], cli)


def test_fifty_malformed_requests_answered_and_server_still_serving(srv):
    _idle(srv)
    before = len(srv.server.worker.outcomes)
    good = {"prompt": "x", **SMALL}
    huge = "A" * (2 * 2**20)  # a 2 MiB base64 field: over the 1 MiB body limit
    bad_json = [b"{", b"{\"prompt\": }", b"not json", b"[1, 2", b"\xff\xfe", b"{\"prompt\": \"x\",}", b"null",
                b"{\"steps\": NaN}"]
    cases: list[tuple[str, object, int, str]] = []
    cases += [("txt2img", raw, 422, "") for raw in bad_json]
    for field, value in [("steps", "x"), ("steps", [1]), ("width", "wide"), ("height", {"a": 1}), ("seed", 1.5),
                         ("seed", "s"), ("cfg_scale", "high"), ("batch_size", "two"), ("n_iter", [2]),
                         ("prompt", 5), ("negative_prompt", ["a"]), ("send_images", "maybe"),
                         ("override_settings", "x"), ("sampler_name", 3)]:
        cases.append(("txt2img", {**good, field: value}, 422, field))
    for w, h in [(63, 64), (64, 100), (1, 64), (64, 7), (513, 512), (0, 64), (-64, 64)]:
        cases.append(("txt2img", {**good, "width": w, "height": h}, 422, "width" if w not in (64, 512) else "height"))
    cases += [("txt2img", {**good, "steps": 10000}, 422, "steps=10000 is above this server's limit of 1000"),
              ("txt2img", {**good, "steps": 0}, 422, "steps must be >= 1, got 0"),
              ("txt2img", {**good, "steps": -3}, 422, "steps must be >= 1, got -3"),
              ("txt2img", {**good, "width": 1024}, 422, "width=1024 is above this server's limit of 512"),
              ("txt2img", {**good, "batch_size": 0}, 422, "batch_size must be >= 1, got 0"),
              ("txt2img", {**good, "n_iter": 0}, 422, "n_iter must be >= 1, got 0"),
              ("txt2img", {**good, "batch_size": 5, "n_iter": 4}, 422, "20 images in one request is above"),
              ("txt2img", {**good, "seed": -2}, 422, "seed must be between 0 and 2**64-1"),
              ("txt2img", {**good, "seed": 2**64}, 422, "seed must be between 0 and 2**64-1"),
              ("txt2img", {**good, "sampler_name": "Euler z"}, 422, "unknown scheduler 'Euler z'"),
              ("txt2img", {**good, "scheduler": "exponential"}, 422, "scheduler 'exponential' is not supported"),
              ("txt2img", {**good, "sampler_name": "DDIM", "scheduler": "Karras"}, 422, "has no Karras variant"),
              ("txt2img", {**good, "sampler_name": "LCM", "steps": 60}, 422, "num_inference_steps must be between"),
              ("txt2img", {**good, "enable_hr": True}, 422, "enable_hr (hires fix) is not supported"),
              ("txt2img", {**good, "subseed_strength": 0.5}, 422, "subseed_strength"),
              ("txt2img", {**good, "override_settings": {"sd_model_checkpoint": "nope"}}, 404, "model 'nope' not"),
              ("txt2img", {**good, "override_settings": {"CLIP_stop_at_last_layers": 0}}, 422,
               "CLIP_stop_at_last_layers must be"),
              ("txt2img", {**good, "prompt": huge}, 413, "request body is larger"),
              ("img2img", {**good, "init_images": [huge]}, 413, "request body is larger"),
              ("options", {"sd_model_checkpoint": "missing-model"}, 404, "model 'missing-model' not found"),
              ("options", {"CLIP_stop_at_last_layers": "two"}, 422, "CLIP_stop_at_last_layers must be"),
              ("options", {"samples_format": "jpg"}, 422, "samples_format 'jpg' is not supported"),
              ("options", [1, 2], 422, ""),
              ("png-info", {"image": "%%%"}, 422, "image is not valid base64"),
              ("png-info", {}, 422, "image")]
    assert len(cases) >= 50, len(cases)
    for route, body, status, text in cases:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        got, headers, r = srv.call("POST", f"/sdapi/v1/{route}", raw=raw)
        assert got == status, (route, body if not isinstance(body, dict) or "prompt" not in body
                               or len(str(body)) < 300 else "(huge)", got, r)
        detail = r["detail"] if isinstance(r["detail"], str) else json.dumps(r["detail"])
        assert text in detail, (route, text, detail)
    assert len(srv.server.worker.outcomes) == before  # none of them reached the worker
    assert len(_txt2img(srv, seed=1)[2]["images"]) == 1


# ------------------------------------------------------------------------------------------------- load
def test_load_sixteen_concurrent_clients(srv):
    """16 clients at once, different seeds: all answered, none lost, each image equal to the same request alone."""
    _idle(srv)
    n = 16

    def one(seed: int) -> tuple[int, float, dict]:
        t0 = time.perf_counter()
        status, _, r = _txt2img(srv, seed=1000 + seed, prompt=f"client {seed}")
        return status, time.perf_counter() - t0, r

    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    assert [s for s, _, _ in results] == [200] * n
    seeds = [json.loads(r["info"])["all_seeds"][0] for _, _, r in results]
    assert seeds == [1000 + k for k in range(n)]
    for k, (_, _, r) in enumerate(results):  # the same request alone gives the same pixels
        alone = srv.ok("POST", "/sdapi/v1/txt2img", {"prompt": f"client {k}", **SMALL, "seed": 1000 + k})
        np.testing.assert_array_equal(_pixels(r["images"][0]), _pixels(alone["images"][0]))
    lat = np.array([t for _, t, _ in results])
    figures = {"requests": n, "concurrency": n, "errors": 0, "wall_s": round(wall, 3),
               "latency_s": {f"p{q}": round(float(np.percentile(lat, q)), 3) for q in (50, 90, 99)} |
               {"max": round(float(lat.max()), 3)}, "image": "64x64, 2 steps, tiny checkpoint"}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "server-load.json").write_text(json.dumps(figures, indent=2))
    print("load test:", figures)


def test_queue_limit_answers_503_with_retry_after(models_dir, assets, tmp_path):
    with LiveServer(_config(models_dir, tmp_path, assets, queue_size=1)) as s:
        results: dict[str, tuple] = {}
        long_job = threading.Thread(target=lambda: results.setdefault("long", s.call(
            "POST", "/sdapi/v1/txt2img", {"prompt": "long", **LONG, "seed": 1})))
        long_job.start()
        try:
            s.wait_for(lambda p: p["state"]["sampling_step"] >= 1, what="the long job to start")
            queued = threading.Thread(target=lambda: results.setdefault("queued", s.call(
                "POST", "/sdapi/v1/txt2img", {"prompt": "queued", **SMALL, "seed": 2})))
            queued.start()
            deadline = time.monotonic() + 30
            while s.server.worker.waiting() < 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            status, headers, r = s.call("POST", "/sdapi/v1/txt2img", {"prompt": "one too many", **SMALL})
            assert status == 503 and r["error"] == "QueueFull" and "queue is full" in r["detail"]
            assert int(headers["retry-after"]) >= 1
            s.ok("POST", "/sdapi/v1/interrupt")
            long_job.join(60)
            queued.join(60)
        finally:
            s.server.state.interrupt()
            long_job.join(60)
        assert results["long"][0] == 200 and results["queued"][0] == 200  # FIFO: the queued job ran after
        assert [k for k, _ in s.server.worker.outcomes][-2:] == ["txt2img", "txt2img"]
        assert list(s.server.worker.outcomes)[-2:] == [("txt2img", "interrupted"), ("txt2img", "done")]


# ------------------------------------------------------------------------------------------------- auth, listening
def test_api_auth_required_on_every_route(models_dir, assets, tmp_path):
    config = _config(models_dir, tmp_path, assets, api_auth=parse_api_auth("alice:s3cret,bob:pw"))
    with LiveServer(config) as s:
        wrong = base64.b64encode(b"alice:nope").decode()
        for path, method in (("/sdapi/v1/options", "GET"), ("/sdapi/v1/progress", "GET"), ("/", "GET"),
                             ("/sdapi/v1/txt2img", "POST"), ("/sdapi/v1/interrupt", "POST")):
            for headers in ({}, {"Authorization": f"Basic {wrong}"}, {"Authorization": "Bearer x"},
                            {"Authorization": "Basic %%%"}):
                status, hdrs, r = s.call(method, path, {"prompt": "x"} if method == "POST" else None,
                                         headers=headers)
                assert status == 401 and hdrs["www-authenticate"].startswith("Basic"), (path, headers, status)
                assert r["detail"] == "Incorrect username or password"
        right = base64.b64encode(b"bob:pw").decode()
        assert s.call("GET", "/sdapi/v1/options", headers={"Authorization": f"Basic {right}"})[0] == 200
        s.auth = ("alice", "s3cret")
        assert s.ok("GET", "/sdapi/v1/options")["sd_model_checkpoint"] == "tiny-sd1"
        assert len(s.ok("POST", "/sdapi/v1/txt2img", {"prompt": "x", **SMALL})["images"]) == 1


def test_listening_rule_and_auth_parsing():
    assert check_listen("127.0.0.1", None, False) is None and check_listen("::1", None, False) is None
    assert check_listen("localhost", None, False) is None and check_listen("127.0.0.5", None, False) is None
    for host in ("0.0.0.0", "192.168.1.5", "::", "example.org"):
        with pytest.raises(sd_mlx.InvalidArgumentError, match="--api-auth user:password"):
            check_listen(host, None, False)
        assert check_listen(host, {"u": "p"}, False) is None
        assert "anyone who can reach this address" in check_listen(host, None, True)
    assert parse_api_auth("a:b,c:d:e") == {"a": "b", "c": "d:e"}
    for bad in ("nouser", ":pw", "user:", "a:b,"):
        with pytest.raises(sd_mlx.InvalidArgumentError, match="--api-auth expects user:password"):
            parse_api_auth(bad)


def test_cli_refuses_open_host_and_serves_then_stops_cleanly(models_dir, assets, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "sd_mlx.server", "--model", "tiny-sd1", "--models-dir", str(models_dir)]
    refused = subprocess.run([*cmd, "--host", "0.0.0.0"], capture_output=True, text=True, env=env, timeout=120)
    assert refused.returncode == 2 and "--api-auth user:password" in refused.stderr, refused.stderr
    bad = subprocess.run([*cmd, "--model", "no-such-model-folder"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
    port = free_port()
    proc = subprocess.Popen([*cmd, "--port", str(port), "--output-dir", str(tmp_path / "out"), "--preview-vae",
                             str(assets / "taesd"), "--log-level", "warning"], env=env, stderr=subprocess.PIPE,
                            text=True)
    try:
        import http.client

        deadline = time.monotonic() + 120
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.request("POST", "/sdapi/v1/txt2img", json.dumps({"prompt": "x", **SMALL}),
                             {"Content-Type": "application/json"})
                resp = conn.getresponse()
                assert resp.status == 200 and len(json.loads(resp.read())["images"]) == 1
                conn.close()
                break
            except ConnectionRefusedError:
                assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # a clean exit: the worker thread cleaned up MLX's streams (no "terminate called ..." abort, status 134)
    assert proc.returncode == 0, err
    assert "terminate called" not in err


def test_single_file_listed_and_a_model_that_fails_to_load_leaves_the_server_ready(srv, models_dir, tiny_sd1):
    from tools.convert import diffusers_to_single

    # the tiny file needs its folder's configs (config=), which the server does not pass: its weights do not fit
    # sd_mlx's built-in SD 1.x config, so loading it fails; a real SD 1.x/2.x file loads with the built-in ones
    single = diffusers_to_single(tiny_sd1, models_dir / "tiny-single.safetensors")
    try:
        models = srv.ok("GET", "/sdapi/v1/sd-models")
        entry = next(m for m in models if m["title"] == "tiny-single.safetensors")
        assert entry["filename"] == str(single.resolve())
        status, _, r = srv.call("POST", "/sdapi/v1/options", {"sd_model_checkpoint": "tiny-single.safetensors"})
        assert status == 500 and r["error"] == "WeightLoadError" and "tiny-single.safetensors" in r["detail"], r
        assert srv.ok("GET", "/sdapi/v1/options")["sd_model_checkpoint"] == "tiny-sd1"
        assert len(_txt2img(srv, seed=1)[2]["images"]) == 1  # the old model is loaded again for the next job
        assert srv.server.worker.entry.title == "tiny-sd1"
    finally:
        single.unlink()
