"""Generate a few images with the Python API: load the model once, call it several times.

    python examples/generate.py "a watercolor fox" --model stable-diffusion-v1-5/stable-diffusion-v1-5 --seed 1

The PNGs carry the AUTOMATIC1111 ``parameters`` chunk, like the CLI's.
"""

from __future__ import annotations

import argparse

import sd_mlx  # import before mlx: on Linux this loads the fast BLAS
from sd_mlx.images import save_png


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("prompt")
    ap.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5",
                    help="diffusers folder or Hugging Face repo id (default: %(default)s)")
    ap.add_argument("--negative-prompt", default="blurry, low quality", help="(default: %(default)s)")
    ap.add_argument("--steps", type=int, default=20, help="(default: %(default)s)")
    ap.add_argument("--size", type=int, default=512, help="width and height in pixels (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    ap.add_argument("--output", default="generate.png", help="(default: %(default)s)")
    args = ap.parse_args()

    pipe = sd_mlx.load_pipeline(args.model)          # reads configs; weights load on the first call
    result = pipe(args.prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                  height=args.size, width=args.size, seed=args.seed, scheduler="dpmpp_2m_karras",
                  show_progress=True)
    save_png(result.images[0], args.output, parameters=result.parameters[0].to_a1111(), overwrite=True)
    print(f"saved {args.output}")
    print(result.profile.summary())

    # The models stay loaded: a second call with another seed reuses them.
    again = pipe(args.prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                 height=args.size, width=args.size, seed=args.seed + 1, scheduler="dpmpp_2m_karras")
    print(f"second image (seed {again.seeds[0]}) took {again.profile.total_seconds:.2f} s, no loading")


if __name__ == "__main__":
    main()
