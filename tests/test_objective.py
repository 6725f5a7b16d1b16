import torch

from kiln.engine.config import ObjectiveConfig
from kiln.engine.ema import EMA
from kiln.engine.objective import (
    caption_drop_mask,
    drop_captions,
    interpolate,
    resolution_shift,
    sample_timesteps,
    shift_timesteps,
)
from kiln.engine.sampler import euler_sample
from kiln.model.text_encoder import TextBatch


def test_interpolation_endpoints_and_velocity():
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    xt, v = interpolate(x0, noise, torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[2], noise[2])
    torch.testing.assert_close(xt[1], 0.5 * (x0[1] + noise[1]))
    torch.testing.assert_close(v, noise - x0)


def test_logit_normal_timesteps_are_centred_and_inside_unit_interval():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(ObjectiveConfig(), 20000, 64, g, torch.device("cpu"))
    assert 0 < t.min() and t.max() < 1
    assert abs(t.mean() - 0.5) < 0.01
    assert abs((t < 0.1).float().mean() - 0.0192) < 0.005  # P(sigmoid(N(0,1)) < 0.1) = 1.92%
    u = sample_timesteps(ObjectiveConfig(timesteps="uniform"), 20000, 64, g, torch.device("cpu"))
    assert abs((u < 0.1).float().mean() - 0.1) < 0.01


def test_resolution_shift_moves_timesteps_toward_noise():
    cfg = ObjectiveConfig(shift_base_tokens=256)
    assert resolution_shift(cfg, 256) == 1.0 and resolution_shift(cfg, 4096) == 4.0
    t = torch.linspace(0.01, 0.99, 50)
    shifted = shift_timesteps(t, 3.0)
    assert (shifted > t).all() and shifted[0] > 0 and shifted[-1] < 1
    torch.testing.assert_close(shift_timesteps(t, 1.0), t)


def test_caption_dropout_rate_and_determinism():
    caps = [f"c{i}" for i in range(10000)]
    a = drop_captions(caps, caption_drop_mask(len(caps), 0.1, torch.Generator().manual_seed(5)))
    b = drop_captions(caps, caption_drop_mask(len(caps), 0.1, torch.Generator().manual_seed(5)))
    assert a == b
    assert abs(sum(c == "" for c in a) / len(a) - 0.1) < 0.01
    assert drop_captions(caps[:5], caption_drop_mask(5, 0.0, torch.Generator())) == caps[:5]


def _text(b):
    return TextBatch(torch.zeros(b, 2, 4), torch.zeros(b, 4), torch.ones(b, 2, dtype=torch.bool))


def test_euler_recovers_x0_for_the_exact_velocity_field():
    x0 = torch.randn(2, 3, 8, 8)

    def oracle(x, t, *args):  # on the straight path x_t = (1-t)x0 + t·eps, v = (x_t - x0) / t
        return (x - x0.repeat(x.shape[0] // 2, 1, 1, 1)) / t.view(-1, 1, 1, 1)

    noise = torch.randn_like(x0)
    for shift in (1.0, 3.0):
        out = euler_sample(oracle, noise, _text(2), _text(2), torch.zeros(2, 6), steps=7, cfg_scale=1.0, shift=shift)
        torch.testing.assert_close(out, x0, atol=1e-5, rtol=1e-5)


def test_cfg_combines_conditional_and_unconditional():
    def model(x, t, tokens, mask, pooled, micro):  # cond rows see pooled=1, uncond rows pooled=0
        return pooled[:, :1].view(-1, 1, 1, 1).expand_as(x) * 2.0 + 1.0

    cond = TextBatch(torch.zeros(1, 2, 4), torch.ones(1, 4), torch.ones(1, 2, dtype=torch.bool))
    noise = torch.zeros(1, 1, 2, 2)
    out = euler_sample(model, noise, cond, _text(1), torch.zeros(1, 6), steps=1, cfg_scale=4.0)
    # v = vu + 4·(vc - vu) = 1 + 4·2 = 9; one Euler step from t=1 to 0 gives x = -9
    torch.testing.assert_close(out, torch.full_like(noise, -9.0))


def _ema_behind_its_model():
    """A fresh EMA (decay 0.9) of a model whose weights then moved by +1: (model, ema, start)."""
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    return model, ema, start


def test_ema_update_is_exponential_average_with_warmup():
    model, ema, start = _ema_behind_its_model()
    ema.update(model)  # first update: decay min(0.9, 1/10) = 0.1
    torch.testing.assert_close(ema.params["weight"], start + 0.9)
    ema.updates = 1000  # warm: decay 0.9
    ema.update(model)
    torch.testing.assert_close(ema.params["weight"], start + 0.9 + 0.1 * 0.1)
    assert not ema.params["weight"].requires_grad
    restored = EMA(torch.nn.Linear(3, 2), decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 1001
    torch.testing.assert_close(restored.params["weight"], ema.params["weight"])


def test_a_skipped_fp16_step_neither_moves_the_average_nor_warms_it_up():
    model, ema, start = _ema_behind_its_model()
    ema.update(model, skip=torch.tensor(1.0))  # the optimizer skipped: nothing moves
    torch.testing.assert_close(ema.params["weight"], start)
    ema.update(model, skip=torch.tensor(0.0))  # still the first applied update: decay 0.1
    torch.testing.assert_close(ema.params["weight"], start + 0.9)
    assert ema.updates == 2 and ema.applied() == 1 and ema.state_dict()["updates"] == 1


def test_lr_schedule_warmup_then_constant_or_cosine():
    from kiln.engine.config import RunConfig
    from kiln.engine.optim import lr_lambda

    cfg = RunConfig()
    cfg.train.steps, cfg.optim.warmup_steps = 100, 10
    f = lr_lambda(cfg)
    assert f(0) == 0.1 and f(9) == 1.0 and f(50) == 1.0 and f(99) == 1.0
    cfg.optim.schedule, cfg.optim.min_lr_ratio = "cosine", 0.1
    f = lr_lambda(cfg)
    assert f(10) == 1.0 and abs(f(55) - 0.55) < 1e-9 and abs(f(100) - 0.1) < 1e-9
    assert all(f(s) >= f(s + 1) for s in range(10, 100))
