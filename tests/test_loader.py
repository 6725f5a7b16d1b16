from kiln.engine.config import DataConfig
from kiln.engine.data.loader import ShapesLoader, eval_prompts


def test_order_is_deterministic_and_covers_an_epoch_without_repeats():
    cfg = DataConfig(num_samples=50)
    a, b = ShapesLoader(cfg, 8), ShapesLoader(cfg, 8)
    seen = []
    for _ in range(7):  # 56 > 50 samples: crosses into epoch 1
        ia, ib = a.next_indices(), b.next_indices()
        assert ia == ib
        seen += ia
    assert sorted(seen[:50]) == list(range(50))
    assert a.epoch == 1 and a.offset == 6


def test_state_dict_resumes_the_exact_sequence():
    cfg = DataConfig(num_samples=30)
    a = ShapesLoader(cfg, 8)
    for _ in range(5):
        a.next_indices()
    state = a.state_dict()
    expected = [a.next_indices() for _ in range(4)]
    b = ShapesLoader(cfg, 8)
    b.load_state_dict(state)
    assert [b.next_indices() for _ in range(4)] == expected


def test_ranks_split_every_batch_without_overlap():
    cfg = DataConfig(num_samples=64)
    ranks = [ShapesLoader(cfg, 8, rank=r, world_size=2) for r in range(2)]
    seen = [[], []]
    for _ in range(8):
        for r, loader in enumerate(ranks):
            seen[r] += loader.next_indices()
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(64))


def test_batch_contents():
    batch = ShapesLoader(DataConfig(resolution=40), 4).next_batch()
    assert batch.images.shape == (4, 3, 40, 40) and len(batch.captions) == 4
    assert batch.micro[0].tolist() == [40, 40, 0, 0, 40, 40]


def test_eval_prompts_are_fixed_and_not_training_samples():
    cfg = DataConfig()
    a, b = eval_prompts(cfg, 8), eval_prompts(cfg, 8)
    assert a.captions == b.captions
    train = ShapesLoader(cfg, 8).dataset
    assert [train[i][1] for i in range(8)] != a.captions
