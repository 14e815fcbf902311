"""Linux CPU machinery: what makes MLX's CPU backend fast on Linux, and nothing a Mac or CUDA user runs.

- :mod:`.blas`: loads an optimised CBLAS into the process before MLX (the Linux wheel links the reference BLAS).
- :mod:`.elf_aliases`: gives loaded functions new global names (scipy-openblas32's ``scipy_cblas_sgemm`` as
  ``cblas_sgemm``) through a generated ELF object, with no compiler.
- :mod:`.jit`: compiler flags for MLX's CPU JIT (``-march=native`` and vectorised ``exp``).
- :mod:`.memory`: glibc allocator thresholds that keep freed buffers mapped for reuse.
- :mod:`.native`: builds and loads the C++ kernels of ``csrc/`` at first use.
- :mod:`.attention`, :mod:`.winograd`, :mod:`.rowwise`: the fused attention, Winograd 3x3 convolutions, and
  multi-threaded LayerNorm/GEGLU kernels.

Models never import this package: :mod:`sd_mlx.ops` chooses between MLX's operations and these kernels. Importing
this package (or :mod:`.blas`) does not import MLX.
"""
