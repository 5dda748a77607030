"""Bad input to the CPU optimizers fails early with a message that says what to write instead."""

import pytest
import torch

from optim_cpu import Bucket, CPUAdamW, CPULion


def test_grad_of_the_wrong_shape_is_refused():
    p = torch.zeros(4, 5)
    opt = CPUAdamW([p])
    with pytest.raises(ValueError, match=r"grad has shape \[20\] but its param has \[4, 5\]"):
        opt.step_bucket(Bucket([p], grads=[torch.zeros(20)]))


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64])
def test_grad_of_an_unsupported_dtype_is_refused(dtype):
    p = torch.zeros(4)
    opt = CPUAdamW([p])
    with pytest.raises(ValueError, match="write float32, bfloat16 or float16"):
        opt.step_bucket(Bucket([p], grads=[torch.zeros(4, dtype=dtype)]))


def test_param_not_on_the_cpu_is_refused():
    with pytest.raises(ValueError, match="is on meta.*pass CPU tensors"):
        CPUAdamW([torch.empty(4, device="meta")])


def test_half_precision_master_param_is_refused():
    with pytest.raises(ValueError, match="master params must be float32"):
        CPUAdamW([torch.zeros(4, dtype=torch.bfloat16)])


def test_negative_lr_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"lr = -0.1 must be in \[0.0, inf\]; write e.g. lr=0.001"):
        CPUAdamW([torch.zeros(4)], lr=-0.1)


def test_negative_lr_set_later_is_refused_at_step():
    p = torch.zeros(4)
    opt = CPULion([p])
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="param group 0: lr = -1.0"):
        opt.step_bucket(Bucket([p], grads=[torch.zeros(4)]))


def test_bad_betas_in_one_group_are_refused():
    with pytest.raises(ValueError, match=r"param group 1: betas = \(0.9, 1.5\)"):
        CPUAdamW([{"params": [torch.zeros(1)]}, {"params": [torch.zeros(1)], "betas": (0.9, 1.5)}])


def test_output_buffer_must_be_half_precision_and_sized():
    p = torch.zeros(4)
    opt = CPUAdamW([p])
    with pytest.raises(ValueError, match="write a bfloat16 or float16 tensor"):
        opt.bind_buffers(p, out=torch.zeros(4))
    with pytest.raises(ValueError, match="of 4 elements"):
        opt.bind_buffers(p, out=torch.zeros(3, dtype=torch.bfloat16))


def test_a_tensor_that_is_not_a_param_is_refused():
    opt = CPUAdamW([torch.zeros(4)])
    with pytest.raises(ValueError, match="is not a param of this optimizer"):
        opt.step_bucket(Bucket([torch.zeros(4)], grads=[torch.zeros(4)]))


def test_bucket_with_fewer_grads_than_params_is_refused():
    with pytest.raises(ValueError, match="2 params but 1 grads"):
        Bucket([torch.zeros(1), torch.zeros(1)], grads=[torch.zeros(1)])


def test_state_allocator_returning_something_else_is_refused():
    with pytest.raises(TypeError, match=r"state_allocator\(16, 'optimizer_state'\) returned list"):
        CPUAdamW([torch.zeros(4)], state_allocator=lambda nbytes, cls: [0] * nbytes)


def test_state_allocator_returning_too_few_bytes_is_refused():
    with pytest.raises(ValueError, match="returned 8 bytes; it must give at least 16"):
        CPUAdamW([torch.zeros(4)], state_allocator=lambda n, c: torch.empty(8, dtype=torch.uint8))
