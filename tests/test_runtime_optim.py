"""The numpy optimisers, schedules and clipping against torch, step for step."""
import numpy as np
import pytest

from netdsl.errors import NetdslError
from netdsl.runtime.optim import clip_grad_norm, make_optimizer, make_schedule

torch = pytest.importorskip("torch")

SHAPES = {"conv.weight": (4, 3, 3, 3), "conv.bias": (4,), "fc.weight": (10, 36)}
STEPS = 12


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def _grads(rng, scale=1.0):
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}


def _torch_run(opt_name, kw, sched=None, clip=None, steps=STEPS, grad_scale=1.0):
    params = _params()
    tp = [torch.nn.Parameter(torch.from_numpy(v.copy())) for v in params.values()]
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[opt_name]
    opt = cls(tp, **kw)
    scheduler = sched(opt) if sched else None
    rng, lrs, norms = np.random.default_rng(1), [], []
    for _ in range(steps):
        for p, g in zip(tp, _grads(rng, grad_scale).values()):
            p.grad = torch.from_numpy(g)
        if clip is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(tp, clip)))
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        if scheduler:
            scheduler.step()
    return {k: p.detach().numpy() for k, p in zip(params, tp)}, lrs, norms


def _numpy_run(opt_name, kw, sched=None, clip=None, steps=STEPS, grad_scale=1.0):
    params = _params()
    opt = make_optimizer(opt_name, params, schedule=sched, **kw)
    rng, lrs, norms = np.random.default_rng(1), [], []
    for _ in range(steps):
        grads = _grads(rng, grad_scale)
        if clip is not None:
            norms.append(clip_grad_norm(grads, clip))
        opt.step(grads)
        lrs.append(opt.current_lr)
    assert all(p.dtype == np.float32 for p in params.values())
    return params, lrs, norms, opt


def _compare(opt_name, kw, np_sched=None, torch_sched=None, clip=None, grad_scale=1.0):
    mine, my_lrs, my_norms, _ = _numpy_run(opt_name, kw, np_sched, clip, grad_scale=grad_scale)
    ref, ref_lrs, ref_norms = _torch_run(opt_name, kw, torch_sched, clip, grad_scale=grad_scale)
    np.testing.assert_allclose(my_lrs, ref_lrs, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(my_norms, ref_norms, rtol=1e-6)
    for k in SHAPES:
        np.testing.assert_allclose(mine[k], ref[k], rtol=1e-6, atol=1e-6, err_msg=k)
    # The parameters actually moved, so agreement is not vacuous.
    assert any(not np.allclose(mine[k], _params()[k]) for k in SHAPES)


@pytest.mark.parametrize("kw", [
    dict(lr=0.1),
    dict(lr=0.1, momentum=0.9),
    dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=5e-4),
    dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
])
def test_sgd_matches_torch(kw):
    _compare("sgd", kw)


@pytest.mark.parametrize("name,kw", [
    ("adam", dict(lr=1e-2)),
    ("adam", dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2)),
    ("adamw", dict(lr=1e-2)),
    ("adamw", dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)),
])
def test_adam_matches_torch(name, kw):
    _compare(name, kw)
    # Gradients near eps make the placement of eps and the bias correction visible.
    _compare(name, dict(kw, eps=1e-6), grad_scale=1e-6)


S = torch.optim.lr_scheduler


@pytest.mark.parametrize("mine,theirs", [
    (make_schedule("constant"), None),
    (make_schedule("step", step_size=4, gamma=0.5), lambda o: S.StepLR(o, 4, 0.5)),
    (make_schedule("multistep", milestones=[7, 3], gamma=0.3), lambda o: S.MultiStepLR(o, [3, 7], 0.3)),
    (make_schedule("cosine", t_max=STEPS, eta_min=1e-3), lambda o: S.CosineAnnealingLR(o, STEPS, 1e-3)),
    (make_schedule("cosine", t_max=STEPS, warmup_steps=4, warmup_start_factor=0.1),
     lambda o: S.ChainedScheduler([S.LinearLR(o, 0.1, 1.0, 4), S.CosineAnnealingLR(o, STEPS)])),
    (make_schedule("step", step_size=5, gamma=0.1, warmup_steps=3, warmup_start_factor=0.2),
     lambda o: S.ChainedScheduler([S.LinearLR(o, 0.2, 1.0, 3), S.StepLR(o, 5, 0.1)])),
])
def test_schedules_match_torch(mine, theirs):
    _compare("sgd", dict(lr=0.1, momentum=0.9), mine, theirs)


def test_adamw_decay_uses_scheduled_lr():
    _compare("adamw", dict(lr=0.05, weight_decay=0.5), make_schedule("step", step_size=3, gamma=0.2),
             lambda o: S.StepLR(o, 3, 0.2))


@pytest.mark.parametrize("max_norm", [0.5, 18.0, 1e9])
def test_clipping_matches_torch(max_norm):
    # Gradient norms are ~22: 0.5 clips hard, 18 mildly, 1e9 never.
    _compare("adam", dict(lr=1e-2), clip=max_norm, grad_scale=1.0)
    _compare("sgd", dict(lr=0.01, momentum=0.9), clip=max_norm)


def test_clip_returns_preclip_norm_and_scales():
    g = {"a": np.array([3.0, 0.0], np.float32), "b": np.array([[4.0]], np.float32)}
    assert clip_grad_norm(g, 1.0) == pytest.approx(5.0)
    assert np.sqrt(sum((v.astype(np.float64) ** 2).sum() for v in g.values())) == pytest.approx(1.0, rel=1e-5)
    assert g["a"].dtype == np.float32


def test_state_dict_resume_is_exact():
    # 12 steps straight == 5 steps, save state, fresh optimiser, load, 7 more steps.
    kw = dict(lr=1e-2, weight_decay=0.05)
    straight, *_ = _numpy_run("adamw", kw, make_schedule("cosine", t_max=STEPS))
    params = _params()
    sched = make_schedule("cosine", t_max=STEPS)
    opt = make_optimizer("adamw", params, schedule=sched, **kw)
    rng = np.random.default_rng(1)
    for _ in range(5):
        opt.step(_grads(rng))
    state = {k: v.copy() for k, v in opt.state_dict().items()}
    opt2 = make_optimizer("adamw", params, schedule=sched, **kw)
    opt2.load_state_dict(state)
    for _ in range(7):
        opt2.step(_grads(rng))
    for k in SHAPES:
        np.testing.assert_array_equal(params[k], straight[k])


def test_load_state_dict_rejects_mismatch():
    opt = make_optimizer("sgd", _params(), lr=0.1, momentum=0.9)
    opt.step(_grads(np.random.default_rng(0)))
    state = opt.state_dict()
    state["momentum/fc.weight"] = np.zeros((3, 3), np.float32)
    state["momentum/gone.weight"] = np.zeros(3, np.float32)
    with pytest.raises(NetdslError) as e:
        make_optimizer("sgd", _params(), lr=0.1, momentum=0.9).load_state_dict(state)
    text = e.value.render()
    assert "fc.weight" in text and "gone.weight" in text


def test_unknown_names_and_options():
    with pytest.raises(NetdslError) as e:
        make_optimizer("adamm", _params())
    assert "adam" in e.value.hint
    with pytest.raises(NetdslError) as e:
        make_optimizer("sgd", _params(), lr=0.1, momentun=0.9)
    assert "momentum" in e.value.hint
    with pytest.raises(NetdslError):
        make_schedule("cosine")  # t_max missing
    with pytest.raises(NetdslError):
        make_optimizer("sgd", _params(), lr=0.1, nesterov=True)
