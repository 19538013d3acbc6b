"""CLIP loading (local only) and prompt embeddings vs the naive Algorithm-1 loop, on a tiny random model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from training.clip.bench import naive_prompt_embeddings, write_bench_images
from training.clip.encode import ClipWeightsNotFoundError, load_clip, resolve_weights
from training.clip.similarities import PromptEmbedder, image_batches

pytestmark = pytest.mark.timeout(120)

GRID, RADIUS = (7, 7), 16


def _fast(paths, encoder, batch_images: int, path: str) -> torch.Tensor:
    embedder = PromptEmbedder(encoder, GRID, RADIUS, path=path)
    batches = [list(range(s, min(s + batch_images, len(paths)))) for s in range(0, len(paths), batch_images)]
    return torch.cat([embedder.encode(x, dtype=torch.float32) for x in
                      image_batches(paths, encoder.image_size, batches, 0, False)])


@pytest.mark.parametrize("path", ["full", "patch-reuse"])
def test_prompt_embeddings_match_naive_pil_loop(tiny_clip, tmp_path, path):
    """On-device circles + batches of 3 images (147 prompts) vs per-image Pillow copies in fp32 batches of 49.

    Tolerance: the same fp32 arithmetic in different batch shapes (oneDNN may block differently):
    |diff| <= 1e-5 on unit vectors; the fp16 cache rounding adds at most half an fp16 ulp (<= 2.5e-4 here).
    """
    paths = write_bench_images(tmp_path, 4, tiny_clip.image_size, seed=3)
    naive = naive_prompt_embeddings(paths, tiny_clip, GRID, RADIUS)
    fast = _fast(paths, tiny_clip, batch_images=3, path=path)
    assert naive.shape == fast.shape == (4, 49, tiny_clip.embed_dim)
    torch.testing.assert_close(fast, naive, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fast.norm(dim=-1), torch.ones(4, 49), atol=1e-5, rtol=0)
    cached = PromptEmbedder(tiny_clip, GRID, RADIUS, path=path).encode(
        next(iter(image_batches(paths, tiny_clip.image_size, [[0, 1, 2, 3]], 0, False))))
    assert cached.dtype == torch.float16
    torch.testing.assert_close(cached.float(), naive, atol=2.5e-4, rtol=0)
    # The circles matter: prompts of one image differ from each other.
    assert float((naive[0, 0] - naive[0, 24]).abs().max()) > 1e-4


def test_random_init_is_reproducible_and_local_weights_load(tiny_clip, tmp_path):
    from safetensors.torch import save_file

    again = load_clip("salf-tiny-clip-112", None, device="cpu", seed=0)
    for (name, a), b in zip(tiny_clip.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), name
    other = load_clip("salf-tiny-clip-112", None, device="cpu", seed=1)
    assert not torch.equal(other.model.visual.conv1.weight, tiny_clip.model.visual.conv1.weight)

    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in other.model.state_dict().items()}, str(weights))
    loaded = load_clip("salf-tiny-clip-112", str(weights), device="cpu")
    assert loaded.weights_sha256 is not None and loaded.init_seed is None
    assert torch.equal(loaded.model.visual.conv1.weight, other.model.visual.conv1.weight)
    text = ["red fur", "a long tail"]
    torch.testing.assert_close(loaded.encode_text(text), other.encode_text(text))


def test_missing_weights_fail_clearly_and_never_download(tmp_path):
    missing = tmp_path / "nope" / "ViT-B-16.pt"
    with pytest.raises(ClipWeightsNotFoundError, match=str(missing).replace(".", r"\.")):
        resolve_weights("ViT-B-16", str(missing))
    # A real open_clip tag that is not in the (empty) local cache: refused, naming the tag.
    with pytest.raises(ClipWeightsNotFoundError, match="'openai'.*not cached locally"):
        resolve_weights("ViT-B-16", "openai", cache_dir=str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="unknown open_clip model"):
        load_clip("ViT-Nonexistent-99", None, device="cpu")


def test_text_embeddings_are_unit_vectors_and_tokenizer_is_local(tiny_clip):
    emb = tiny_clip.encode_text(["red", "green", "a striped circle"])
    assert emb.shape == (3, tiny_clip.embed_dim) and emb.dtype == torch.float32
    np.testing.assert_allclose(emb.norm(dim=1).numpy(), 1.0, atol=1e-5)
    assert type(tiny_clip.tokenizer).__name__ == "SimpleTokenizer"  # vocab ships with open_clip


def test_flop_count_matches_the_published_vit_b16_figure():
    """The benchmark's TFLOP/s rests on this count: ViT-B/16 at 224 is 35.1 GFLOP per prompt."""
    from training.clip.bench import flops_per_prompt

    vit_b16 = load_clip("ViT-B-16", None, device="cpu")
    assert flops_per_prompt(vit_b16) / 1e9 == pytest.approx(35.1, rel=0.005)
    assert torch.backends.mha.get_fastpath_enabled()  # restored after counting


def test_patch_reuse_redoes_only_the_ring_patches(tiny_clip):
    """The reuse tables: a patch is re-embedded for a prompt exactly when its ring has a pixel in it."""
    from training.clip.patch_reuse import PatchReuse, supports_patch_reuse
    from training.clip.prompts import ring_stencil

    assert supports_patch_reuse(tiny_clip.model.visual)
    stencil = ring_stencil((112, 112), GRID, RADIUS)
    reuse = PatchReuse(tiny_clip.model.visual, stencil)
    assert (reuse.gh, reuse.gw, reuse.ph) == (7, 7, 16)
    for g, i, j in reuse.pairs.tolist():
        assert stencil[g, i * 16:(i + 1) * 16, j * 16:(j + 1) * 16].any()
    touched = {(g, i, j) for g, i, j in reuse.pairs.tolist()}
    for g in range(49):
        for i in range(7):
            for j in range(7):
                assert ((g, i, j) in touched) == bool(stencil[g, i * 16:(i + 1) * 16, j * 16:(j + 1) * 16].any())
    # Far fewer patches than the 49 x 49 a full pass embeds.
    assert len(touched) < 0.25 * 49 * 49
