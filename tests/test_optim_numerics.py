"""CPUAdamW, CPUAdam and CPULion against torch.optim after many steps, with half-precision I/O."""

import copy
import shutil

import pytest
import torch

from optim_cpu import Bucket, CPUAdam, CPUAdamW, CPULion, load_kernel
from optim_cpu.state_alloc import OPTIMIZER_STATE

# Odd sizes: tails that are not a multiple of the 16-lane vector, and more than one chunk.
SHAPES = [(37, 29), (4097,), (3,)]
CHUNK = 1000


@pytest.fixture(scope="session", autouse=True)
def native_kernel():
    """Build the C++ kernel once per session (cached on disk, so reruns load it instantly)."""
    kernel = load_kernel()
    if kernel is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler: the kernel tests need one (the fallback is tested apart)")
    assert kernel is not None, "the C++ kernel failed to build; see the RuntimeWarning"
    return kernel


def make_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for shape in SHAPES]


def grads_for(step, params, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=gen).to(dtype) for p in params]


def assert_rel_close(actual, expected, rel=1e-6):
    """Within ``rel`` of the largest magnitude in ``expected`` (elementwise relative error is
    meaningless for elements near zero)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


def groups_of(params, per_group):
    return [{"params": [p], **hp} for p, hp in zip(params, per_group, strict=True)]


PER_GROUP = [
    {"lr": 1e-2, "weight_decay": 0.1},
    {"lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.0},
    {"lr": 5e-2, "weight_decay": 0.3},
]


def run_pair(ours_cls, torch_cls, grad_dtype, steps=100):
    ours_params = make_params()
    ref_params = [p.clone().requires_grad_() for p in ours_params]
    ours = ours_cls(groups_of(ours_params, PER_GROUP), chunk_elems=CHUNK, threads=2)
    ref = torch_cls(groups_of(ref_params, PER_GROUP), foreach=False)
    for step in range(steps):
        grads = grads_for(step, ours_params, grad_dtype)
        for p, g in zip(ref_params, grads, strict=True):
            p.grad = g.float()
        ref.step()
        ours.step_bucket(Bucket(ours_params, grads=grads)).result()
    ours.close()
    return ours_params, [p.detach() for p in ref_params]


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_adamw_matches_torch_adamw_after_100_steps(grad_dtype):
    ours, ref = run_pair(CPUAdamW, torch.optim.AdamW, grad_dtype)
    for a, b in zip(ours, ref, strict=True):
        assert_rel_close(a, b)


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_adam_with_l2_decay_matches_torch_adam_after_100_steps(grad_dtype):
    ours, ref = run_pair(CPUAdam, torch.optim.Adam, grad_dtype)
    for a, b in zip(ours, ref, strict=True):
        assert_rel_close(a, b)


def test_adamw_and_adam_differ_when_weight_decay_is_set():
    adamw, _ = run_pair(CPUAdamW, torch.optim.AdamW, torch.float32, steps=5)
    adam, _ = run_pair(CPUAdam, torch.optim.Adam, torch.float32, steps=5)
    assert not torch.equal(adamw[0], adam[0])


def lion_reference(params, grads, moms, lr, betas, wd):
    """Lion as in the paper's pseudo-code and lucidrains/lion-pytorch."""
    b1, b2 = betas
    for p, g, m in zip(params, grads, moms, strict=True):
        p.mul_(1 - lr * wd)
        p.add_(torch.sign(m * b1 + g * (1 - b1)), alpha=-lr)
        m.mul_(b2).add_(g, alpha=1 - b2)


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_lion_matches_reference_after_100_steps(grad_dtype):
    ours_params = make_params()
    ref_params = [p.clone() for p in ours_params]
    moms = [torch.zeros_like(p) for p in ours_params]
    opt = CPULion(ours_params, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, chunk_elems=CHUNK)
    for step in range(100):
        grads = grads_for(step, ours_params, grad_dtype)
        lion_reference(ref_params, [g.float() for g in grads], moms, 1e-3, (0.9, 0.99), 0.1)
        opt.step_bucket(Bucket(ours_params, grads=grads)).result()
    for a, b in zip(ours_params, ref_params, strict=True):
        assert_rel_close(a, b)
    assert_rel_close(opt.state[ours_params[0]]["exp_avg"], moms[0])


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("opt_cls", [CPUAdamW, CPULion])
def test_half_output_equals_rounded_fp32_master(out_dtype, opt_cls):
    params = make_params()
    opt = opt_cls(params, lr=1e-2, chunk_elems=CHUNK)
    outs = [torch.empty(p.shape, dtype=out_dtype) for p in params]
    grads = [torch.empty(p.shape, dtype=torch.bfloat16) for p in params]
    for p, g, o in zip(params, grads, outs, strict=True):
        opt.bind_buffers(p, grad=g, out=o)
    for step in range(3):
        for g, new in zip(grads, grads_for(step, params, torch.bfloat16), strict=True):
            g.copy_(new)
        opt.step()
        for p, o in zip(params, outs, strict=True):
            assert torch.equal(o, p.to(out_dtype))


def test_per_group_hyper_parameters_are_used_per_group():
    params = [torch.zeros(8), torch.zeros(8)]
    opt = CPUAdamW([{"params": [params[0]], "lr": 0.1}, {"params": [params[1]], "lr": 0.01}])
    opt.step_bucket(Bucket(params, grads=[torch.ones(8), torch.ones(8)])).result()
    assert params[0][0].item() == pytest.approx(-0.1, rel=1e-6)
    assert params[1][0].item() == pytest.approx(-0.01, rel=1e-6)


def test_lr_scheduler_changes_the_lr_the_step_uses():
    ours_params = make_params()
    ref_params = [p.clone().requires_grad_() for p in ours_params]
    ours = CPUAdamW(ours_params, lr=1e-2)
    ref = torch.optim.AdamW(ref_params, lr=1e-2, foreach=False)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5) for o in (ours, ref)]
    for step in range(10):
        for p, q, g in zip(ours_params, ref_params, grads_for(step, ours_params), strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        for s in scheds:
            s.step()
    assert ours.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**3)
    for a, b in zip(ours_params, ref_params, strict=True):
        assert_rel_close(a, b.detach())


def test_state_dict_round_trip_continues_bitwise():
    params = make_params()
    opt = CPUAdamW(params, lr=1e-2, weight_decay=0.1, chunk_elems=CHUNK)
    for step in range(5):
        opt.step_bucket(Bucket(params, grads=grads_for(step, params))).result()
    saved = copy.deepcopy(opt.state_dict())
    resumed_params = [p.clone() for p in params]
    resumed = CPUAdamW(resumed_params, lr=999.0, chunk_elems=CHUNK)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["lr"] == 1e-2
    for step in range(5, 10):
        opt.step_bucket(Bucket(params, grads=grads_for(step, params))).result()
        resumed.step_bucket(Bucket(resumed_params, grads=grads_for(step, params))).result()
    for a, b in zip(params, resumed_params, strict=True):
        assert torch.equal(a, b)


def test_loads_a_torch_adamw_state_dict_and_continues_like_torch():
    ref_params = [p.requires_grad_() for p in make_params()]
    ref = torch.optim.AdamW(ref_params, lr=1e-2, foreach=False)
    for step in range(3):
        for p, g in zip(ref_params, grads_for(step, ref_params), strict=True):
            p.grad = g
        ref.step()
    ours_params = [p.detach().clone() for p in ref_params]
    ours = CPUAdamW(ours_params)
    ours.load_state_dict(copy.deepcopy(ref.state_dict()))
    for step in range(3, 6):
        grads = grads_for(step, ref_params)
        for p, g in zip(ref_params, grads, strict=True):
            p.grad = g
        ref.step()
        ours.step_bucket(Bucket(ours_params, grads=grads)).result()
    for a, b in zip(ours_params, ref_params, strict=True):
        assert_rel_close(a, b.detach())


def test_zero_grad_clears_param_grads():
    p = torch.zeros(4, requires_grad=True)
    opt = CPUAdamW([p])
    p.sum().backward()
    opt.zero_grad()
    assert p.grad is None
    before = p.detach().clone()
    opt.step()
    assert torch.equal(p.detach(), before)


def test_two_runs_are_bitwise_equal_whatever_threads_and_chunking():
    results = []
    for threads, chunk in ((1, 1 << 18), (2, 1000), (2, 17)):
        params = make_params()
        opt = CPUAdamW(params, lr=1e-2, threads=threads, chunk_elems=chunk)
        for step in range(10):
            opt.step_bucket(Bucket(params, grads=grads_for(step, params, torch.bfloat16))).result()
        opt.close()
        results.append(params)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


def test_state_is_allocated_through_the_hook_in_param_order():
    calls = []

    def allocate(nbytes, tensor_class):
        calls.append((nbytes, tensor_class))
        return torch.empty(nbytes, dtype=torch.uint8)

    params = make_params()
    opt = CPUAdamW(params, state_allocator=allocate)
    expected = [(p.numel() * 4, OPTIMIZER_STATE) for p in params for _ in range(2)]
    assert calls == expected
    assert float(opt.state[params[0]]["exp_avg_sq"].abs().sum()) == 0.0


def test_state_lands_in_host_buffers_and_steps_like_plain_memory():
    from allocators.host_buffer import HostBuffer

    placed_params, plain_params = make_params(), make_params()
    placed = CPUAdamW(placed_params, state_allocator=lambda n, _: HostBuffer(n, 0, pin=False))
    plain = CPUAdamW(plain_params)
    for step in range(3):
        grads = grads_for(step, placed_params)
        placed.step_bucket(Bucket(placed_params, grads=grads)).result()
        plain.step_bucket(Bucket(plain_params, grads=grads)).result()
    for a, b in zip(placed_params, plain_params, strict=True):
        assert torch.equal(a, b)
