"""Compare samplers: one image per (seed, scheduler), pasted into a single grid PNG.

    python examples/seed_scheduler_grid.py "a lighthouse at dusk" --seeds 0 1 2 \
        --schedulers euler euler_a dpmpp_2m_karras ddim --output grid.png

Rows are schedulers, columns are seeds. Each image of a row shares the scheduler; each column shares the seed
(and so the initial noise). The models are loaded once for the whole grid.
"""

from __future__ import annotations

import argparse

import sd_mlx  # import before mlx: on Linux this loads the fast BLAS
from sd_mlx.images import make_grid, save_png
from sd_mlx.schedulers import SCHEDULER_NAMES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("prompt")
    ap.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5",
                    help="diffusers folder or Hugging Face repo id (default: %(default)s)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="(default: %(default)s)")
    ap.add_argument("--schedulers", nargs="+", default=["euler", "euler_a", "dpmpp_2m_karras", "ddim"],
                    choices=SCHEDULER_NAMES, metavar="NAME", help=f"from {', '.join(SCHEDULER_NAMES)} "
                    f"(default: %(default)s)")
    ap.add_argument("--steps", type=int, default=20, help="(default: %(default)s)")
    ap.add_argument("--guidance-scale", type=float, default=7.5, help="(default: %(default)s)")
    ap.add_argument("--size", type=int, default=512, help="width and height of each cell (default: %(default)s)")
    ap.add_argument("--output", default="grid.png", help="(default: %(default)s)")
    args = ap.parse_args()

    pipe = sd_mlx.load_pipeline(args.model)
    cells = []
    for name in args.schedulers:
        for seed in args.seeds:
            result = pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                          height=args.size, width=args.size, seed=seed, scheduler=name)
            cells.append(result.images[0])
            print(f"{name:>18} seed {seed}: {result.profile.total_seconds:.2f} s")
    grid = make_grid(cells, rows=len(args.schedulers), cols=len(args.seeds))
    legend = (f"{args.prompt}\nSteps: {args.steps}, CFG scale: {args.guidance_scale:g}, "
              f"Rows (samplers): {', '.join(args.schedulers)}, Columns (seeds): {', '.join(map(str, args.seeds))}, "
              f"Model: {args.model}")
    save_png(grid, args.output, parameters=legend, overwrite=True)
    print(f"saved {args.output} ({len(args.schedulers)} x {len(args.seeds)})")


if __name__ == "__main__":
    main()
