import pytest
import torch

from kiln.engine.errors import KilnError
from kiln.model.text_encoder import OpenCLIPTextEncoder, build_text_encoder


@pytest.fixture(scope="module")
def encoder():
    return build_text_encoder("open_clip", "kiln-tiny-text", None, 16)


def test_shapes_and_mask(encoder):
    out = encoder.encode(["a red circle", "a large blue square on the left, white background", ""])
    assert out.tokens.shape == (3, 16, encoder.width)
    assert out.pooled.shape == (3, encoder.pooled_dim)
    # start token + 3 words + end-of-text = 5 real tokens; "" is start + end-of-text
    assert out.mask[0].sum() == 5 and out.mask[2].sum() == 2
    assert out.mask[:, 0].all()


def test_frozen_and_deterministic(encoder):
    assert not any(p.requires_grad for p in encoder.parameters())
    a = encoder.encode(["a green diamond"]).pooled
    encoder._cache.clear()
    b = encoder.encode(["a green diamond"]).pooled
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, encoder.encode(["a green circle"]).pooled)


def test_cache_reuses_encodings(encoder):
    encoder._cache.clear()
    encoder.encode(["one", "two", "one"])
    assert len(encoder._cache) == 2


def test_truncated_context_equals_full_context_prefix():
    torch.manual_seed(1)
    short = OpenCLIPTextEncoder("kiln-tiny-text", max_length=16)
    full = OpenCLIPTextEncoder("kiln-tiny-text", max_length=77)
    full.load_state_dict(short.state_dict())
    cap = ["two small red triangles in a row, black background"]
    # causal attention: the first 16 positions do not see the rest
    torch.testing.assert_close(short.encode(cap).tokens[0], full.encode(cap).tokens[0, :16], atol=1e-5, rtol=1e-5)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(KilnError, match="text.weights: file .*does not exist"):
        OpenCLIPTextEncoder("kiln-tiny-text", weights=str(tmp_path / "nope.bin"))


def test_unknown_model_and_family_are_clear_errors():
    with pytest.raises(KilnError, match="text.name"):
        OpenCLIPTextEncoder("not-a-model")
    with pytest.raises(KilnError, match="text.family"):
        build_text_encoder("t5", "x", None, 8)


def test_weights_file_is_loaded(tmp_path):
    from kiln.model.text_encoder import open_clip_module

    open_clip = open_clip_module()
    torch.manual_seed(3)
    clip = open_clip.create_model("kiln-tiny-text")
    path = tmp_path / "tiny.pt"
    torch.save(clip.state_dict(), path)
    enc = OpenCLIPTextEncoder("kiln-tiny-text", weights=str(path))
    torch.testing.assert_close(enc.token_embedding.weight, clip.token_embedding.weight)
