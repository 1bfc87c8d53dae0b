"""The chunked CE + KL equals the plain log-softmax form, in value and gradient."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from permsparse.train.loss import IGNORE_INDEX, lm_ce_kl
from permsparse.train.loss import task_loss


def _plain(logits, targets, teacher):
    z = logits.float()
    logp = F.log_softmax(z, -1)
    valid = targets != IGNORE_INDEX
    ce = F.nll_loss(logp.reshape(-1, z.shape[-1]), targets.reshape(-1))
    if teacher is None:
        return ce, torch.zeros(())
    t = F.log_softmax(teacher.float(), -1)
    kl_tok = (t.exp() * (t - logp)).sum(-1)
    return ce, kl_tok[valid].mean()


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 9),
    v=st.integers(2, 40),
    chunk=st.integers(1, 5),
    seed=st.integers(0, 10_000),
    with_teacher=st.booleans(),
    ignore=st.booleans(),
)
def test_matches_plain_form(n, v, chunk, seed, with_teacher, ignore):
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(2, n, v, generator=gen, dtype=torch.float64)).requires_grad_(True)
    targets = torch.randint(v, (2, n), generator=gen)
    if ignore:
        targets[:, -1] = IGNORE_INDEX
        if n == 1:
            targets[0, 0] = 0  # keep at least one target
    teacher = 3 * torch.randn(2, n, v, generator=gen, dtype=torch.float64) if with_teacher else None
    w_ce, w_kl = 0.7, 1.3
    ce, kl = lm_ce_kl(logits, targets, teacher, chunk=chunk)
    (w_ce * ce + w_kl * kl).backward()
    g = logits.grad.clone()
    logits.grad = None
    ce0, kl0 = _plain(logits, targets, teacher)
    (w_ce * ce0 + w_kl * kl0).backward()
    torch.testing.assert_close(ce.double(), ce0.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kl.double(), kl0.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, logits.grad, rtol=1e-4, atol=1e-6)


def test_bfloat16_student_and_float16_teacher_on_a_real_vocabulary_size():
    gen = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(2, 33, 4099, generator=gen)).bfloat16().requires_grad_(True)
    teacher = (4 * torch.randn(2, 33, 4099, generator=gen)).half()
    ids = torch.randint(4099, (2, 33), generator=gen)
    loss, ce, kl = task_loss(logits, {"input_ids": ids}, teacher, 1.0)
    loss.backward()
    assert logits.grad.dtype == torch.bfloat16
    ref = logits.detach().float().requires_grad_(True)
    z, t = ref[:, :-1], teacher[:, :-1].float()
    ce0 = F.cross_entropy(z.reshape(-1, 4099), ids[:, 1:].reshape(-1))
    tl = F.log_softmax(t, -1)
    kl0 = (tl.exp() * (tl - F.log_softmax(z, -1))).sum(-1).mean()
    (ce0 + kl0).backward()
    torch.testing.assert_close(ce, ce0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(kl, kl0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits.grad.float(), ref.grad, rtol=2e-2, atol=1e-6)


def test_no_teacher_gives_zero_kl_and_shapes_are_checked():
    logits = torch.randn(3, 5, requires_grad=True)
    ce, kl = lm_ce_kl(logits, torch.tensor([0, 1, 2]))
    assert float(kl.detach()) == 0.0
    torch.testing.assert_close(ce, F.cross_entropy(logits, torch.tensor([0, 1, 2])))
    with pytest.raises(ValueError, match="targets"):
        lm_ce_kl(logits, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="teacher"):
        lm_ce_kl(logits, torch.tensor([0, 1, 2]), torch.randn(3, 4))
