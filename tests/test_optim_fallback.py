"""Without a buildable C++ kernel the optimizers warn and step with torch's fused kernel, correctly."""

import pytest
import torch

from optim_cpu import Bucket, CPUAdamW, CPULion, native


@pytest.fixture
def broken_build(monkeypatch):
    def fail():
        raise OSError("c++: command not found")

    native.forget_kernel()
    monkeypatch.setattr(native, "_build", fail)
    yield
    native.forget_kernel()


def test_failed_build_warns_and_falls_back_to_torch_fused(broken_build):
    params = [torch.randn(300, generator=torch.Generator().manual_seed(0))]
    ref_params = [p.clone().requires_grad_() for p in params]
    opt = CPUAdamW(params, lr=1e-2, weight_decay=0.1, chunk_elems=100)
    ref = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=0.1, foreach=False)
    with pytest.warns(RuntimeWarning, match="falling back to torch's fused AdamW"):
        assert opt.kernel_name == "torch-fused"
    out = torch.empty(300, dtype=torch.bfloat16)
    for step in range(100):
        grad = torch.randn(300, generator=torch.Generator().manual_seed(step)).bfloat16()
        ref_params[0].grad = grad.float()
        ref.step()
        opt.step_bucket(Bucket(params, grads=[grad], outputs=[out])).result()
    scale = ref_params[0].abs().max().item()
    torch.testing.assert_close(params[0], ref_params[0].detach(), rtol=1e-6, atol=1e-6 * scale)
    assert torch.equal(out, params[0].bfloat16())


def test_lion_falls_back_too(broken_build):
    p = torch.zeros(3)
    opt = CPULion([p], lr=0.1)
    with pytest.warns(RuntimeWarning):
        opt.step_bucket(Bucket([p], grads=[torch.tensor([1.0, -1.0, 0.0])])).result()
    assert p.tolist() == pytest.approx([-0.1, 0.1, 0.0])
