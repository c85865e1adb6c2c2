"""Exact integer arithmetic for reversible momentum chains.

Floating point addition and multiplication by ``gamma`` lose bits, so a chain run in floats
cannot be run backwards exactly. The reversible engine therefore keeps the chain's state as
fixed-point integers and does every step exactly:

* ``x`` and ``v`` are ``int64`` tensors on a per-chain power-of-two grid (``v`` on a grid
  ``2**GAMMA_BITS`` times finer than ``x``, so that multiplying by ``gamma`` costs no precision);
* multiplication by ``gamma = n / 2**GAMMA_BITS`` is done exactly in the manner of Maclaurin,
  Duvenaud & Adams (2015): the bits it destroys go into a per-element :class:`BitStack`, which
  grows by ``log2(1 / gamma)`` bits per block, the information-theoretic minimum;
* when values grow, the grid is coarsened and the shifted-out bits also go on the stack.

Nothing here knows about autograd or torch.fx; :mod:`fxmomentum.engine.run` drives it.
:func:`validate_gamma` is the one check of a momentum term, wherever one is given (the API, the
command line, a chain's ``gamma`` attribute).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "GAMMA_BITS",
    "GAMMA_DENOM",
    "BitStack",
    "floor_divmod",
    "quantize_gamma",
    "validate_gamma",
]

#: ``gamma`` is used as the nearest multiple of ``2**-GAMMA_BITS`` (0.9 becomes 0.89999390).
GAMMA_BITS = 16
GAMMA_DENOM = 1 << GAMMA_BITS

# The head is int32: it is as large as the chain's activation and read and written by every
# step, so its width counts in both memory and time. Its values stay below _HEAD_LIMIT; words of
# _WORD_BITS spill off it, and larger pushes are split into digits of at most _MAX_DIGIT_BITS.
_HEAD_LIMIT = 1 << 31
_WORD_BITS = 16
_WORD_MASK = (1 << _WORD_BITS) - 1
_MAX_DIGIT_BITS = 16
_MAX_BASE = 1 << _MAX_DIGIT_BITS


def quantize_gamma(gamma: float) -> int:
    """Return the integer numerator ``n`` with ``n / 2**GAMMA_BITS`` closest to ``gamma``.

    Parameters
    ----------
    gamma : float
        Momentum term in ``[0, 1]``.

    Returns
    -------
    int
        ``n`` in ``[0, 2**GAMMA_BITS]``.

    Raises
    ------
    ValueError
        If ``gamma`` is not a finite number in ``[0, 1]``.

    Examples
    --------
    >>> quantize_gamma(0.5)
    32768
    >>> quantize_gamma(0.9) / 2**16
    0.899993896484375
    """
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise TypeError(f"gamma must be a float in [0, 1], got {type(gamma).__name__}")
    if not math.isfinite(gamma) or not 0.0 <= gamma <= 1.0:
        raise ValueError(
            f"gamma must lie in [0, 1] (0 is the original ResNet, 0.9 the usual momentum), "
            f"got {gamma!r}"
        )
    return round(gamma * GAMMA_DENOM)


def validate_gamma(gamma: object, *, reversible: bool, where: str = "") -> int:
    """Check a momentum term and return its numerator (see :func:`quantize_gamma`).

    The one check of ``gamma``: :func:`fxmomentum.convert`, :func:`fxmomentum.set_gamma`,
    ``MomentumChain.gamma``, ``transform_to_momentumnet`` and the command line all call it.

    Parameters
    ----------
    gamma : float
        The momentum term.
    reversible : bool
        Whether a reversible chain will run with it: its inverse divides by gamma, so it
        must not round to 0.
    where : str
        Which gamma, for the message (``" for chain 0 (layer1.0)"``).

    Returns
    -------
    int
        The numerator ``n`` of ``gamma = n / 2**16``.

    Raises
    ------
    TypeError
        If ``gamma`` is not a number.
    ValueError
        If it is outside ``[0, 1)``, rounds to 1 (the velocity would never change: no block
        would have an effect, nor its parameters a gradient), or rounds to 0 where a chain is
        reversible.

    Examples
    --------
    >>> validate_gamma(0.9, reversible=True)
    58982
    >>> validate_gamma(0.0, reversible=True)
    Traceback (most recent call last):
    ...
    ValueError: gamma is 0.0: a reversible chain (use_backprop=False) cannot be run backwards...
    """
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise TypeError(f"gamma{where} must be a number in [0, 1), got {gamma!r}")
    if not math.isfinite(gamma) or not 0.0 <= gamma <= 1.0:
        raise ValueError(
            f"gamma{where} must lie in [0, 1) (0 is the original model, 0.9 the usual "
            f"momentum), got {gamma!r}"
        )
    n = quantize_gamma(float(gamma))
    if n == GAMMA_DENOM:
        raise ValueError(
            f"gamma{where} is {gamma!r}: at gamma = 1 the velocity never changes, so no block "
            f"has an effect and no block's parameters get a gradient. Use a gamma below 1 (0.9 "
            f"is the usual momentum; the largest is {(GAMMA_DENOM - 1) / GAMMA_DENOM:.6f})."
        )
    if n == 0 and reversible:
        raise ValueError(
            f"gamma{where} is {gamma!r}: a reversible chain (use_backprop=False) cannot be run "
            f"backwards at gamma = 0, since the inverse divides by gamma. Use use_backprop=True "
            f"(gamma = 0 is the original model), or a gamma of at least {1 / GAMMA_DENOM:.1e}."
        )
    return n


def floor_divmod(a: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Floor division and modulo of an integer tensor by ``1 <= n <= 2**16``, exactly.

    Valid for ``|a| < 2**62``. Computed without an integer divide, which does not vectorise (on
    a chain's state it cost more than the rest of a step together): the float64 quotient is
    within ``2**11`` of the true one; a second round on the remainder, exact in float64, leaves
    it off by at most one, which the comparisons correct. The result has ``a``'s dtype. The
    fused kernels (:mod:`fxmomentum.engine.kernels`) compile this same function.

    Examples
    --------
    >>> q, r = floor_divmod(torch.tensor([-7, 7]), 3)
    >>> q.tolist(), r.tolist()
    ([-3, 2], [2, 1])
    """
    inv = 1.0 / n
    q = torch.floor(a.to(torch.float64) * inv).to(torch.int64)
    r = a - q * n
    q2 = torch.floor(r.to(torch.float64) * inv).to(torch.int64)
    q = q + q2
    r = r - q2 * n
    below = (r < 0).to(torch.int64)
    r = r + below * n
    above = (r >= n).to(torch.int64)
    q, r = q - below + above, r - above * n
    return q.to(a.dtype), r.to(a.dtype)


#: Elements per chunk of :func:`_chunks`, at least (int32 temporaries of 64 KiB).
_CHUNK = 1 << 14


def _chunks(t: torch.Tensor, like: torch.Tensor) -> list[torch.Tensor]:
    """``t`` as views of about a sixteenth each (at least :data:`_CHUNK` elements), in
    memory order; ``[t]`` unless ``t`` is laid out densely and as ``like`` (same shape and
    strides), so that the chunks of the two hold the same elements."""
    if t.shape != like.shape or t.stride() != like.stride() or t.numel() <= _CHUNK:
        return [t]
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    try:
        flat = t.permute(order).view(-1)
    except RuntimeError:  # not dense (a view with gaps)
        return [t]
    return list(flat.split(max(_CHUNK, -(-flat.numel() // 16))))


def _widen(word: torch.Tensor) -> torch.Tensor:
    """A spilled word's 16 bits as a non-negative int32 (it holds the int16 they wrap to, or
    the uint8 of a frozen head's last few bits)."""
    if word.dtype == torch.uint8:
        return word.to(torch.int32)
    if word.device.type == "cpu":  # one pass: the bits read as unsigned
        return word.view(torch.uint16).to(torch.int32)
    low = word.to(torch.int32)
    low &= _WORD_MASK
    return low


def _power_of_two_bits(base: int) -> int:
    if base & (base - 1):
        raise ValueError(f"a bit-stack base above 2**16 must be a power of two, got {base}")
    return base.bit_length() - 1


class BitStack:
    """A per-element arbitrary-precision integer used as a stack of digits.

    ``push(r, base)`` makes the integer ``B * base + r``; ``pop(base)`` takes ``B mod base`` off.
    Each element's integer is held as a 31-bit int32 ``head`` plus a list of spilled 16-bit
    words.
    A single Python bound on the head (the same for every element) decides when to spill, so
    every element spills at the same time and the words are plain tensors.

    Every operation is recorded, and :meth:`undo_push` / :meth:`undo_pop` reverse the most
    recent operation exactly, restoring the head, the words and the bound.

    Parameters
    ----------
    like : torch.Tensor
        Tensor whose shape and device the stack takes.
    zeroed : bool
        Whether to zero the head. A caller that writes the head first without reading it (a
        reversible chain's first step) passes False: a pass less.

    Examples
    --------
    >>> s = BitStack(torch.zeros(3))
    >>> s.push(torch.tensor([0, 1, 2]), 3)
    >>> s.pop(2).tolist()
    [0, 1, 0]
    >>> s.undo_pop(torch.tensor([0, 1, 0]), 2)
    >>> s.undo_push(3).tolist()
    [0, 1, 2]
    """

    def __init__(self, like: torch.Tensor, zeroed: bool = True) -> None:
        make = torch.zeros_like if zeroed else torch.empty_like
        self.head = make(like, dtype=torch.int32)
        self.bound = 1  # every element of head lies in [0, bound)
        self.words: list[torch.Tensor] = []
        self._log: list[tuple[int, int]] = []  # (bound before the op, spills the op made)

    # -- bookkeeping -------------------------------------------------------------------------
    # In-place operations throughout: the stack works on tensors as large as the chain's
    # activation, and every temporary counts in the step's peak memory.
    def _spill(self) -> None:
        # The low word as the int16 it wraps to (the conversion keeps the low 16 bits); undone
        # by masking after widening.
        self.words.append(self.head.to(torch.int16))
        self.head >>= _WORD_BITS
        self.bound = -(-self.bound >> _WORD_BITS)

    def _unspill(self) -> None:
        word = self.words.pop()
        if self.head is None:  # thawed: the head was all zeros
            self.head = _widen(word)
            return
        # Chunk by chunk: the word widened whole would be a temporary of the head's size, at
        # the peak of backward (a deep chain unspills while a block's recomputation is alive).
        for head, low in zip(_chunks(self.head, word), _chunks(word, self.head), strict=True):
            low = _widen(low)
            head <<= _WORD_BITS
            head |= low

    def _make_room(self, base: int) -> int:
        spills = 0
        while self.bound * base > _HEAD_LIMIT:
            self._spill()
            spills += 1
        return spills

    def _undo(self) -> None:
        bound, spills = self._log.pop()
        for _ in range(spills):
            self._unspill()
        self.bound = bound

    @property
    def nbytes(self) -> int:
        """Bytes held by the stack (spilled words and head)."""
        return sum(w.nbytes for w in self.words) + self.head.nbytes

    # -- bookkeeping for callers that update ``head`` themselves (fused kernels) ---------------
    def note_push(self, base: int) -> None:
        """Record a push of ``base``: spill if needed; the caller then sets ``head``."""
        bound = self.bound
        spills = self._make_room(base)
        self._log.append((bound, spills))
        self.bound *= base

    def note_pop(self, base: int) -> None:
        """Record a pop of ``base``; the caller then sets ``head``."""
        self._log.append((self.bound, 0))
        self.bound = -(-self.bound // base)

    def undo_note(self) -> None:
        """Reverse the latest :meth:`note_push` or :meth:`note_pop`, after ``head`` was restored."""
        self._undo()

    # -- digits ------------------------------------------------------------------------------
    def push(self, r: torch.Tensor, base: int) -> None:
        """Push digits ``r`` in ``[0, base)`` (a base above ``2**16``: a power of two)."""
        if base <= 1:
            return
        if base > _MAX_BASE:
            self._push_bits(r, _power_of_two_bits(base))
            return
        self.note_push(base)
        # Digits below 2**16 fit the head's int32: an int64 operand would make the in-place
        # update compute in int64, through temporaries twice the head's size.
        r = r.to(self.head.dtype)
        if base & (base - 1) == 0:
            self.head <<= base.bit_length() - 1
            self.head |= r
        else:
            self.head.mul_(base).add_(r)

    def undo_push(self, base: int) -> torch.Tensor:
        """Reverse the latest :meth:`push` with this ``base``; return its digits."""
        if base <= 1:
            return torch.zeros_like(self.head)
        if base > _MAX_BASE:
            return self._undo_push_bits(_power_of_two_bits(base))
        if base & (base - 1) == 0:
            r = self.head & (base - 1)
            self.head >>= base.bit_length() - 1
        else:
            self.head, r = floor_divmod(self.head, base)
        self._undo()
        return r

    def pop(self, base: int) -> torch.Tensor:
        """Pop digits in ``[0, base)``: ``B mod base``, leaving ``B // base``."""
        if base <= 1:
            return torch.zeros_like(self.head)
        self.note_pop(base)
        if base & (base - 1) == 0:
            r = self.head & (base - 1)
            self.head >>= base.bit_length() - 1
        else:
            self.head, r = floor_divmod(self.head, base)
        return r

    def undo_pop(self, r: torch.Tensor, base: int) -> None:
        """Reverse the latest :meth:`pop` with this ``base``, putting ``r`` back."""
        if base <= 1:
            return
        if base & (base - 1) == 0:
            self.head <<= base.bit_length() - 1
            self.head |= r
        else:
            self.head.mul_(base).add_(r)
        self._undo()

    # -- wide digits ---------------------------------------------------------------------------
    def _push_bits(self, u: torch.Tensor, bits: int) -> None:
        # Values in [0, 2**bits), as digits of at most 16 bits, the lowest first.
        u = u.to(torch.int64, copy=True)
        while bits > 0:
            k = min(bits, _MAX_DIGIT_BITS)
            self.push(u & ((1 << k) - 1), 1 << k)
            u >>= k
            bits -= k

    def _undo_push_bits(self, bits: int) -> torch.Tensor:
        digits = []
        while bits > 0:
            digits.append(min(bits, _MAX_DIGIT_BITS))
            bits -= digits[-1]
        u = torch.zeros(self.head.shape, dtype=torch.int64, device=self.head.device)
        for k in reversed(digits):
            u <<= k
            u |= self.undo_push(1 << k)
        return u

    def freeze(self) -> None:
        """Spill the head into words so that only narrow words stay in memory (int16, the
        last one uint8 where its digits fit)."""
        self._log.append((self.bound, 0))
        spills = 0
        while self.bound > 1:
            if self.bound <= 1 << _WORD_BITS:
                # The last word: the head is dropped after it, so it is not shifted (a pass).
                # It is often a few bits (a short chain's), kept in a byte where they fit.
                narrow = torch.uint8 if self.bound <= 1 << 8 else torch.int16
                self.words.append(self.head.to(narrow))
                self.bound = 1
            else:
                self._spill()
            spills += 1
        self._log[-1] = (self._log[-1][0], spills)
        self.head = torch.empty(0, dtype=torch.int32, device=self.head.device)

    def thaw(self, like: torch.Tensor) -> None:
        """Reverse :meth:`freeze`."""
        self.head = None
        self._undo()
        if self.head is None:
            self.head = torch.zeros_like(like, dtype=torch.int32)
