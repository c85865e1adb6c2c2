"""The exact integer building blocks: gamma quantisation and the bit stack."""

import math

import pytest
import torch

from fxmomentum.engine.exact import BitStack, floor_divmod, quantize_gamma


@pytest.mark.parametrize("gamma", [-0.1, 1.5, math.nan, math.inf])
def test_quantize_gamma_rejects_values_outside_unit_interval(gamma):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        quantize_gamma(gamma)


def test_quantize_gamma_is_nearest_multiple():
    for gamma in (0.0, 0.5, 0.9, 0.99, 1.0):
        n = quantize_gamma(gamma)
        assert abs(n / 2**16 - gamma) <= 2**-17


def test_floor_divmod_matches_python_semantics():
    a = torch.randint(-(2**50), 2**50, (1000,), dtype=torch.int64)
    q, r = floor_divmod(a, 58982)
    for ai, qi, ri in zip(a.tolist()[:200], q.tolist()[:200], r.tolist()[:200], strict=True):
        assert (qi, ri) == divmod(ai, 58982)


@pytest.mark.parametrize(
    "like",
    [
        torch.zeros(257),
        # Unspilled in chunks, in memory order.
        torch.zeros(3, 40, 20, 20).to(memory_format=torch.channels_last),
    ],
    ids=["small", "chunked-channels-last"],
)
def test_bit_stack_round_trip_with_spills(like):
    torch.manual_seed(0)
    stack = BitStack(like)
    ops = []
    for i in range(300 if like.numel() < 1000 else 60):
        base = [2, 3, 2**16, 58982, 7, 2**5][i % 6]
        if i % 3 == 2 and base < 64:
            ops.append(("pop", base, stack.pop(base)))
        else:
            r = torch.randint(0, base, like.shape, dtype=torch.int64)
            stack.push(r, base)
            ops.append(("push", base, r))
    assert stack.words, "300 digits must have spilled words"
    wide = torch.randint(0, 2**42, like.shape, dtype=torch.int64)
    stack.push(wide, 2**42)  # split into 16-bit digits
    stack.freeze()
    assert stack.head.numel() == 0
    # 16-bit words; the last one a byte where the head's last digits fit one.
    assert all(w.dtype == torch.int16 for w in stack.words[:-1])
    assert stack.words[-1].dtype in (torch.int16, torch.uint8)
    stack.thaw(like)
    assert torch.equal(stack.undo_push(2**42), wide)
    for kind, base, r in reversed(ops):
        if kind == "push":
            assert torch.equal(stack.undo_push(base), r)
        else:
            stack.undo_pop(r, base)
    assert stack.bound == 1 and not stack.words
    assert torch.equal(stack.head, torch.zeros_like(stack.head))


def test_bit_stack_stores_close_to_the_information_minimum():
    # 1000 multiplications by 0.5 lose 1000 bits per element: about 125 bytes.
    like = torch.zeros(64)
    stack = BitStack(like)
    for _ in range(1000):
        stack.push(torch.randint(0, 2**16, like.shape), 2**16)
        stack.pop(2**15)
    stack.freeze()
    per_element = sum(w.nbytes for w in stack.words) / like.numel()
    assert 125 <= per_element <= 125 + 8


def test_a_few_digits_freeze_into_a_byte_per_element():
    # A short chain's stack holds a few bits per element: frozen, one uint8 word.
    like = torch.zeros(3, 100)
    stack = BitStack(like)
    digits = [torch.randint(0, 5, like.shape) for _ in range(3)]
    for r in digits:
        stack.push(r, 5)  # 125 values: under 2**8
    stack.freeze()
    assert [w.dtype for w in stack.words] == [torch.uint8]
    stack.thaw(like)
    for r in reversed(digits):
        assert torch.equal(stack.undo_push(5), r.to(torch.int32))
    assert stack.bound == 1 and not stack.words
