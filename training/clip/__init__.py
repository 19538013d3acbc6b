"""CLIP stages of SALF-CBM training (paper 3.1-3.2, Algorithm 1).

- ``concepts``: LLM concept generation (OpenAI-compatible chat endpoint) and the Label-free CBM filters.
- ``prompts``: the red-circle ring (Pillow's 2-px ellipse, rasterised once into a stencil) drawn on the device.
- ``encode``: open_clip models by name + local weights or locally cached tag (never downloads).
- ``similarities``: the resumable, checksummed prompt-embedding cache ``[N, Gh*Gw, D]`` fp16 (torchrun-aware).
- ``source``: ``ClipSimilarity``, the SimilaritySource forming ``P [B, M, Gh, Gw]`` per batch.
- ``pipeline``: ``build_clip_source(cfg, data_root, run_dir)`` for `salfctl train all`.
- ``bench``: `make bench-similarity` (ours vs the naive Algorithm-1 loop).
"""
