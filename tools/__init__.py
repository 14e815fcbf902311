"""Developer tools for sd_mlx (checkpoint generation, benchmarks); not part of the installed package."""
