import numpy as np
import pytest

from kiln.engine.data.scorer import adherence, read_attributes, score
from kiln.engine.data.shapes import PALETTE, Attributes, ShapesDataset, caption, render


@pytest.mark.parametrize(
    "resolution,max_count,seed", [(32, 1, 101), (32, 3, 102), (48, 2, 103), (64, 3, 104), (128, 3, 105)]
)
def test_scorer_reads_the_datasets_own_images(resolution, max_count, seed):
    ds = ShapesDataset(resolution, max_count=max_count, seed=seed)
    items = [ds[i] for i in range(400)]
    result = adherence([it[0] for it in items], [it[2] for it in items])
    assert min(result.values()) >= 0.99, result


def test_scorer_works_on_non_square_images():
    a = Attributes("triangle", "red", "blue", "large", "left", 1)
    assert all(score(render(a, 48, 96), a).values())


def test_scorer_rejects_wrong_images():
    a = Attributes("circle", "red", "blue", "large", "left", 1)
    wrong = render(Attributes("square", "green", "blue", "small", "right", 1), 64, 64)
    s = score(wrong, a)
    assert s["background"] and not s["color"] and not s["kind"] and not s["size"] and not s["position"]
    assert not s["colors"]


def test_scorer_survives_noise_and_blank_images():
    a = Attributes("diamond", "yellow", "purple", "large", "center", 1)
    img = render(a, 64, 64).astype(np.int16) + np.random.default_rng(0).integers(-25, 25, (64, 64, 3))
    assert all(score(np.clip(img, 0, 255).astype(np.uint8), a).values())
    blank = np.full((32, 32, 3), PALETTE["purple"], dtype=np.uint8)
    assert read_attributes(blank)["count"] == 0 and not score(blank, a)["color"]


def test_dataset_is_deterministic_by_index():
    a, b = ShapesDataset(32, seed=4), ShapesDataset(32, seed=4)
    for i in (0, 17, 999_999):
        assert np.array_equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
    assert a[0][1] != ShapesDataset(32, seed=5)[0][1] or a[1][1] != ShapesDataset(32, seed=5)[1][1]


def test_captions_name_every_attribute_in_both_styles():
    a = Attributes("square", "orange", "white", "small", "bottom", 1)
    for style in ("short", "long"):
        text = caption(a, style)
        for word in ("square", "orange", "white", "small", "bottom"):
            assert word in text
    assert len(caption(a, "long")) > 2 * len(caption(a, "short"))
