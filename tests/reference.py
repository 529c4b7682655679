"""Plain transcriptions of the papers' pseudo-code, simulating n workers in one process.

Each class follows its algorithm box line by line (cd-adam.md Algorithm 1, spars-ams.md
Algorithms 1-2, dist-ef-blocksgdm.md Algorithms 2-4 with the "+ g" term of §3.3, saef.md
Algorithm 1, Tang et al.'s 1-bit Adam), with ALGORITHMS.md's readings. Nothing here imports
taciturn: these are the independent side of the comparison.

Vectors are flat fp32 tensors holding every trainable parameter, in the optimizer's order.
``Compression`` places C the way ALGORITHMS.md does: on the workers per tensor (blocks inside
tensors); on the servers per piece, a piece being a tensor cut at the chunk boundaries
``cuts`` of its bucket (each rank serves one chunk). Blockwise sign with blocks is the
single-server C: its chunks are cut on block boundaries, so the pieces change nothing.

The second half is the workload both sides run (a tiny MLP with a frozen parameter, per-rank
data, two micro-batches per step for gradient accumulation, one gradient missing on one
rank, a closure on odd steps, an lr that changes every step, two param groups), ``train``
that drives a real optimizer through it, ``simulate`` that drives a transcription, and
``CASES``: each taciturn preset configuration with its transcription.
"""
from __future__ import annotations

import io
import math
from fractions import Fraction
from typing import List, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread while a test runs: on two shared cores, torch's thread pool makes
    these tiny models 100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------- compressors


def sign(v):
    """sign with sign(0) = +1."""
    return torch.where(v >= 0, 1.0, -1.0)


def scaled_sign(v):
    """||v||_1 / d * sign(v)."""
    return v.abs().mean() * sign(v)


def block_sign(v, block_size):
    """Scaled sign of every block of ``block_size`` elements (the last one shorter)."""
    if block_size is None:
        return scaled_sign(v)
    return torch.cat([scaled_sign(v[i:i + block_size]) for i in range(0, v.numel(), block_size)])


def top_k(v, ratio):
    """Keep the k = ceil(ratio * d) entries of largest magnitude (at least one); ratio * d in
    exact arithmetic (0.07 * 100 is 7, not the float 7.000000000000001)."""
    k = min(v.numel(), max(1, math.ceil(Fraction(str(ratio)) * v.numel())))
    out = torch.zeros_like(v)
    idx = torch.sort(v.abs(), descending=True, stable=True).indices[:k]  # ties: lowest indices
    out[idx] = v[idx]
    return out


class Compression:
    """C on the workers and on the servers, for one compressor over the flat vector.

    ``sizes``: element counts of the tensors; ``buckets``: ``(tensor indices, cuts)`` per
    bucket of the pipeline, ``cuts`` the n + 1 chunk boundaries inside the bucket.
    """

    def __init__(self, name: str, sizes: Sequence[int], buckets, two_way: bool = True, block_size=1024,
                 ratio: float = 0.01):
        self.name, self.two_way, self.block_size, self.ratio = name, two_way, block_size, ratio
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self.tensors = [(s, s + n) for s, n in zip(starts, sizes)]
        self.pieces: List[Tuple[int, int]] = []
        for indices, cuts in buckets:
            base = starts[indices[0]]
            for j in range(len(cuts) - 1):
                lo, hi = base + cuts[j], base + cuts[j + 1]
                for i in indices:
                    a, b = max(lo, self.tensors[i][0]), min(hi, self.tensors[i][1])
                    if a < b:
                        self.pieces.append((a, b))

    def op(self, v):
        if self.name == "identity":
            return v.clone()
        if self.name == "sign":
            return sign(v)
        if self.name == "scaled_sign":
            return scaled_sign(v)
        if self.name == "block_sign":
            return block_sign(v, self.block_size)
        if self.name == "topk":
            return top_k(v, self.ratio)
        raise ValueError(self.name)

    def _apply(self, v, segments):
        out = torch.zeros_like(v)
        for a, b in segments:
            out[a:b] = self.op(v[a:b])
        return out

    def worker(self, v):
        """C on a worker: per tensor; top-k in two-way mode per piece (k proportional)."""
        per_piece = self.name == "topk" and self.two_way
        return self._apply(v, self.pieces if per_piece else self.tensors)

    def server(self, v):
        """C on the servers: each chunk's server compresses each of its pieces alone."""
        single_server = self.name == "block_sign" and self.block_size is not None
        return self._apply(v, self.tensors if single_server else self.pieces)


def mean(vectors):
    """(1/n) sum_i v_i, summed in rank order."""
    total = torch.zeros_like(vectors[0])
    for v in vectors:
        total = total + v
    return total / len(vectors)


# ---------------------------------------------------------------------- algorithms
#
# Every simulator holds the model x, takes one gradient per worker at ``points()`` and the
# step's learning rate ``lr`` (a flat tensor: each parameter's group lr), and updates x.


class Simulator:
    weight_decay, decoupled = 0.0, False

    def __init__(self, x0, n):
        self.x = x0.clone().float()
        self.n = n

    def l2(self, g):
        """L2 weight decay: every worker adds weight_decay * x to its gradient."""
        if self.weight_decay and not self.decoupled:
            return [gi + self.weight_decay * self.x for gi in g]
        return g

    def zeros(self):
        return torch.zeros_like(self.x)

    def points(self):
        """Where each worker evaluates its gradient."""
        return [self.x] * self.n


class CDAdam(Simulator):
    """cd-adam.md Algorithm 1 (nu inside the square root, no bias correction).

    ``weight_decay``: L2 (added to the gradients) or, ``decoupled``, x = x (1 - lr wd) first."""

    def __init__(self, x0, n, C: Compression, betas=(0.9, 0.99), nu=1e-8, weight_decay=0.0, decoupled=False):
        super().__init__(x0, n)
        self.C, (self.b1, self.b2), self.nu = C, betas, nu
        self.weight_decay, self.decoupled = weight_decay, decoupled
        # line 1: g_0 = 0, m_0 = v_0 = 0, g^_0 = C(g_0) = 0, g~_0 = C(mean g^_0) = 0
        self.g_hat_w = [self.zeros() for _ in range(n)]
        self.g_hat = self.zeros()
        self.g_tilde = self.zeros()
        self.m, self.v, self.v_hat = self.zeros(), self.zeros(), self.zeros()

    def step(self, g, lr):
        self.adapt(self.markov(self.l2(g)), lr)

    def markov(self, g):
        """Lines 4-12: the workers' and the server's Markov sequences; the result g~."""
        c_w = []
        for i in range(self.n):
            c_w.append(self.C.worker(g[i] - self.g_hat_w[i]))            # line 4
            self.g_hat_w[i] = self.g_hat_w[i] + c_w[i]                   # line 5
        self.g_hat = self.g_hat + mean(c_w)                              # line 7
        c = self.C.server(self.g_hat - self.g_tilde)                     # line 8
        self.g_tilde = self.g_tilde + c                                  # lines 10, 12
        return self.g_tilde

    def adapt(self, g, lr):
        """AMSGrad lines 13-16: x = x - lr V^{-1/2} m with V = diag(v^ + nu)."""
        if self.decoupled:
            self.x = self.x * (1 - lr * self.weight_decay)
        self.m = self.b1 * self.m + (1 - self.b1) * g
        self.v = self.b2 * self.v + (1 - self.b2) * g * g
        self.v_hat = torch.maximum(self.v_hat, self.v)
        self.x = self.x - lr * self.m / torch.sqrt(self.v_hat + self.nu)


class CDAdamMomentum(CDAdam):
    """CD-Adam with ``track="momentum"``: each worker's own momentum m_i = b1 m_i + (1-b1) g_i
    goes through lines 4-12 in place of its gradient; the result M~ is AMSGrad's m, and v takes
    the gradient that leads to it, (M~ - b1 m) / (1-b1)."""

    def __init__(self, x0, n, C: Compression, **kwargs):
        super().__init__(x0, n, C, **kwargs)
        self.m_w = [self.zeros() for _ in range(n)]

    def step(self, g, lr):
        g = self.l2(g)
        self.m_w = [self.b1 * m + (1 - self.b1) * gi for m, gi in zip(self.m_w, g)]
        M = self.markov(self.m_w)
        self.adapt((M - self.b1 * self.m) / (1 - self.b1), lr)


class AMSGrad(CDAdam):
    """Uncompressed distributed AMSGrad: the same update on the exact average gradient."""

    def __init__(self, x0, n, betas=(0.9, 0.99), nu=1e-8):
        super().__init__(x0, n, None, betas, nu)

    def step(self, g, lr):
        self.adapt(mean(g), lr)


class EFAMSGrad(CDAdam):
    """Baseline: error feedback (s = 1) on the workers and the servers, then AMSGrad."""

    def __init__(self, x0, n, C: Compression, **kwargs):
        super().__init__(x0, n, C, **kwargs)
        self.e = [self.zeros() for _ in range(n)]
        self.e_server = self.zeros()

    def step(self, g, lr):
        g = self.l2(g)
        sent = []
        for i in range(self.n):
            p = g[i] + self.e[i]
            sent.append(self.C.worker(p))
            self.e[i] = p - sent[i]
        p_server = mean(sent) + self.e_server
        c = self.C.server(p_server)
        self.e_server = p_server - c
        self.adapt(c, lr)


class NaiveAMSGrad(CDAdam):
    """Baseline: compression both ways without feedback, then AMSGrad."""

    def step(self, g, lr):
        self.adapt(self.C.server(mean([self.C.worker(gi) for gi in g])), lr)


class SparsAMS(CDAdam):
    """spars-ams.md Algorithm 1 (n workers); with n = 1 it is Algorithm 2."""

    def __init__(self, x0, n, C: Compression, betas=(0.9, 0.99), eps=1e-8):
        super().__init__(x0, n, C, betas, eps)
        self.e = [self.zeros() for _ in range(n)]                        # line 2: e_{1,i} = 0

    def step(self, g, lr):
        g_tilde = []
        for i in range(self.n):
            g_tilde.append(self.C.worker(g[i] + self.e[i]))              # line 7
            self.e[i] = self.e[i] + g[i] - g_tilde[i]                    # line 8
        self.adapt(mean(g_tilde), lr)                                    # lines 12-16


class SparsAMSMomentumCorrection(SparsAMS):
    """SPARS-AMS with ``momentum_correction=True`` (DGC's momentum correction and momentum factor
    masking, Lin et al. 2018): worker i keeps u_i = b1 u_i + (1-b1) g_i, sends C(u_i + e_i) with
    error feedback and zeroes u_i where it sent an entry; the mean is the step, AMSGrad with b1 = 0."""

    def __init__(self, x0, n, C: Compression, betas=(0.9, 0.99), eps=1e-8):
        super().__init__(x0, n, C, (0.0, betas[1]), eps)
        self.worker_b1 = betas[0]
        self.u = [self.zeros() for _ in range(n)]

    def step(self, g, lr):
        sent = []
        for i in range(self.n):
            self.u[i] = self.worker_b1 * self.u[i] + (1 - self.worker_b1) * g[i]
            p = self.u[i] + self.e[i]
            sent.append(self.C.worker(p))
            self.e[i] = p - sent[i]
            self.u[i] = torch.where(sent[i] != 0, torch.zeros_like(p), self.u[i])
        self.adapt(mean(sent), lr)


class DistEFSGDM(Simulator):
    """dist-ef-blocksgdm.md Algorithm 4 with §3.3's p = mu m + g + s e (Nesterov), or
    p = m + s e (heavy ball); mu = 0 is Algorithms 2/3. s = lr_{t-1}/lr_t, lr_{-1} = 0."""

    def __init__(self, x0, n, C: Compression, momentum=0.0, nesterov=False, weight_decay=0.0):
        super().__init__(x0, n)
        self.C, self.mu, self.nesterov, self.weight_decay = C, momentum, nesterov, weight_decay
        self.m = [self.zeros() for _ in range(n)]                        # m_{-1,i} = 0
        self.e = [self.zeros() for _ in range(n)]                        # e_{0,i} = 0
        self.e_server = self.zeros()                                     # e~_0 = 0
        self.lr_prev = self.zeros()                                      # lr_{-1} = 0

    def step(self, g, lr):
        s = self.lr_prev / lr
        g = self.l2(g)
        delta = []
        for i in range(self.n):
            self.m[i] = self.mu * self.m[i] + g[i]                       # line 5
            direction = self.mu * self.m[i] + g[i] if self.nesterov else self.m[i]
            p = direction + s * self.e[i]                                # line 6 (+ g, §3.3)
            delta.append(self.C.worker(p))                               # line 7
            self.e[i] = p - delta[i]                                     # line 9
        p_server = mean(delta) + s * self.e_server                       # line 11
        delta_server = self.C.server(p_server)                           # line 12
        self.e_server = p_server - delta_server                          # line 13
        self.x = self.x - lr * delta_server                              # line 8
        self.lr_prev = lr


class EF21SGD(Simulator):
    """EF21 two-way: CD-Adam's Markov sequences on both sides, then x = x - lr g~."""

    def __init__(self, x0, n, C: Compression):
        super().__init__(x0, n)
        self.C = C
        self.g_hat_w = [self.zeros() for _ in range(n)]
        self.g_hat, self.g_tilde = self.zeros(), self.zeros()

    def step(self, g, lr):
        c_w = []
        for i in range(self.n):
            c_w.append(self.C.worker(g[i] - self.g_hat_w[i]))
            self.g_hat_w[i] = self.g_hat_w[i] + c_w[i]
        self.g_hat = self.g_hat + mean(c_w)
        self.g_tilde = self.g_tilde + self.C.server(self.g_hat - self.g_tilde)
        self.x = self.x - lr * self.g_tilde


class Signum(Simulator):
    """signum with majority vote: m_i = b m_i + (1-b) g_i; x = x - lr sign(sum_i sign(m_i))."""

    def __init__(self, x0, n, momentum=0.9):
        super().__init__(x0, n)
        self.b = momentum
        self.m = [self.zeros() for _ in range(n)]

    def step(self, g, lr):
        votes = self.zeros()
        for i in range(self.n):
            self.m[i] = self.b * self.m[i] + (1 - self.b) * g[i]
            votes = votes + sign(self.m[i])
        self.x = self.x - lr * sign(votes)


class SAEF(Simulator):
    """saef.md Algorithm 1: momentum SGD whose model difference goes through EF compression.

    ``step_ahead``: lines 6-12 (SAEF), else lines 14-16 (local EF). ``two_way``: the
    server compresses Delta with its own error (DC, lines 21-23), else it broadcasts the
    mean (SC). Lines 11-12 give Delta_k = e_k + lr m_k (ALGORITHMS.md's form).
    """

    def __init__(self, x0, n, C: Compression, momentum=0.9, period=None, step_ahead=True, two_way=True):
        super().__init__(x0, n)
        self.C, self.mu, self.period, self.step_ahead, self.two_way = C, momentum, period, step_ahead, two_way
        self.e_w = [self.zeros() for _ in range(n)]                      # e_0^(k) = 0
        self.m = [self.zeros() for _ in range(n)]                        # m_0^(k) = 0
        self.e_server = self.zeros()
        self.t = 0
        self._average_errors()

    def _average_errors(self):
        if self.step_ahead and self.period and (self.t + 1) % self.period == 0:     # line 6
            avg = mean(self.e_w)                                                    # line 7
            self.e_w = [avg.clone() for _ in range(self.n)]

    def points(self):
        if self.step_ahead:
            return [self.x - self.e_w[k] for k in range(self.n)]         # line 9: x_{t+1/2}
        return [self.x] * self.n

    def step(self, g, lr):
        sent = []
        for k in range(self.n):
            self.m[k] = self.mu * self.m[k] + g[k]                       # line 10 / 14
            delta = self.e_w[k] + lr * self.m[k]                         # lines 11-12 / 15-16
            sent.append(self.C.worker(delta))
            self.e_w[k] = delta - sent[k]                                # line 18
        if self.two_way:
            delta_server = self.e_server + mean(sent)                    # line 21
            update = self.C.server(delta_server)
            self.e_server = delta_server - update                        # line 22
        else:
            update = mean(sent)
        self.x = self.x - update                                         # line 25
        self.t += 1
        self._average_errors()


class OneBitAdam(CDAdam):
    """1-bit Adam (Tang et al. 2021, Algorithm 1): a warm-up of ``freeze_step`` steps, then the
    variance is frozen and the momentum is averaged with two-way error-feedback compression:
    m_i = b1 m + (1-b1) g_i ; m = EF-compressed mean of m_i ; x = x - lr m / (sqrt(v) + eps).
    No bias correction. ``warmup="adam"``: uncompressed Adam (eps outside the root);
    ``"cdadam"``: CD-Adam (Algorithm 1 above), whose v^ becomes the frozen v.
    """

    def __init__(self, x0, n, C: Compression, freeze_step, warmup="adam", warmup_C: Compression = None,
                 betas=(0.9, 0.999), eps=1e-8, variance_floor=0.1):
        super().__init__(x0, n, warmup_C, betas, eps)
        self.C_momentum, self.freeze_step, self.warmup, self.eps = C, freeze_step, warmup, eps
        self.variance_floor = variance_floor
        self.e = [self.zeros() for _ in range(n)]
        self.e_server = self.zeros()
        self.t = 0

    def step(self, g, lr):
        if self.t < self.freeze_step and self.warmup == "cdadam":
            super().step(g, lr)
        elif self.t < self.freeze_step:
            g_avg = mean(g)
            self.m = self.b1 * self.m + (1 - self.b1) * g_avg
            self.v = self.b2 * self.v + (1 - self.b2) * g_avg * g_avg
            self.x = self.x - lr * self.m / (torch.sqrt(self.v) + self.eps)
        else:
            if self.t == self.freeze_step and self.warmup == "cdadam":
                self.v = self.v_hat
            if self.t == self.freeze_step and self.variance_floor:
                self.v = self.floored(self.v)
            sent = []
            for i in range(self.n):
                p = self.b1 * self.m + (1 - self.b1) * g[i] + self.e[i]
                sent.append(self.C_momentum.worker(p))
                self.e[i] = p - sent[i]
            p_server = mean(sent) + self.e_server
            self.m = self.C_momentum.server(p_server)
            self.e_server = p_server - self.m
            self.x = self.x - lr * self.m / (torch.sqrt(self.v) + self.eps)
        self.t += 1


    def floored(self, v):
        """taciturn's ``variance_floor``: in every block of the momentum compressor (blocks of
        ``block_size`` inside each tensor for block_sign, else whole tensors), each non-zero
        v_i becomes max(v_i, variance_floor * mean of the block's v)."""
        C, out = self.C_momentum, v.clone()
        for a, b in C.tensors:
            size = C.block_size if C.name == "block_sign" and C.block_size is not None else b - a
            for lo in range(a, b, size):
                block = v[lo:min(lo + size, b)]
                floor = self.variance_floor * block.mean()
                out[lo:lo + block.numel()] = torch.where(block > 0, torch.maximum(block, floor), block)
        return out


# ---------------------------------------------------------------------- the workload

IN, HIDDEN, OUT = 12, 100, 3
MICRO_BATCHES, BATCH = 2, 6
#: (step, parameter index) where the gradient is missing on rank 1 % n (``p.grad = None``)
MISSING_GRAD = {3: 3, 11: 3}


def make_model(seed=0):
    """fc1 (1200 + 100), fc2 (300 + 3) and a frozen input scale (requires_grad=False)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential()
    model.register_parameter("scale", torch.nn.Parameter(torch.linspace(0.5, 1.5, IN), requires_grad=False))
    model.fc1 = torch.nn.Linear(IN, HIDDEN)
    model.fc2 = torch.nn.Linear(HIDDEN, OUT)
    return model


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def param_groups(model, split=True, factor=0.5):
    """The frozen scale and fc1 at the base lr, fc2 at ``factor`` times it (``lr_factor``);
    ``split=False``: one group."""
    first = [model.scale] + list(model.fc1.parameters())
    if not split:
        return [{"params": first + list(model.fc2.parameters()), "lr_factor": 1.0}]
    return [{"params": first, "lr_factor": 1.0}, {"params": list(model.fc2.parameters()), "lr_factor": factor}]


def fc2_mask(model):
    """DeepSpeed's exp_avg_mask for the second param group [fc2.weight, fc2.bias], flat: fc2's
    first two output rows and its bias kept."""
    w = torch.zeros_like(model.fc2.weight)
    w[:2] = 1.0
    return torch.cat([w.flatten(), torch.ones_like(model.fc2.bias)])


def masked_groups(model, masked):
    """``param_groups(model)``, the second with ``fc2_mask`` when ``masked``."""
    groups = param_groups(model)
    if masked:
        groups[1]["exp_avg_mask"] = fc2_mask(model)
    return groups


def flat_mask(model):
    """``fc2_mask`` over every trainable element (fc1 unmasked), for the transcriptions."""
    return torch.cat([torch.ones(sum(p.numel() for p in model.fc1.parameters())), fc2_mask(model)])


def assert_close_steps(actual, expected, what, rtol=1e-5, atol=1e-5):
    """Two trajectories (a tensor per step) of the same length, close at every step (named from 1)."""
    assert len(actual) == len(expected)
    for k, (a, e) in enumerate(zip(actual, expected), 1):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m: f"{what}, step {k}: {m}")


def full_and_resumed(run_ranks, tmp_path_factory, run_full, run_resumed, n, timeout=300):
    """A job of ``n`` ranks that checkpoints into a fresh folder, then a job of fresh processes
    that resumes from it: (full results, resumed results)."""
    ckpt_dir = str(tmp_path_factory.mktemp("ckpt"))
    return (run_ranks(run_full, n, ckpt_dir, timeout=timeout), run_ranks(run_resumed, n, ckpt_dir, timeout=timeout))


def ef_allreduce(C, buffers, worker_error, server_error):
    """DeepSpeed's compressed_allreduce: error feedback on the workers and on the server.
    Returns (the average, the workers' new errors, the server's new error)."""
    sent, errors = [], []
    for b, e in zip(buffers, worker_error):
        p = b + e
        sent.append(C.worker(p))
        errors.append(p - sent[-1])
    p = mean(sent) + server_error
    out = C.server(p)
    return out, errors, p - out


def lr_at(t, base):
    """A learning rate that changes every step."""
    return base * (1.0 + 0.5 * math.cos(1.3 * t))


def batch(rank, t, micro):
    gen = torch.Generator().manual_seed(100_003 * t + 1009 * rank + micro)
    return torch.randn(BATCH, IN, generator=gen), torch.randint(0, OUT, (BATCH,), generator=gen)


def forward(scale, w1, b1, w2, b2, x):
    return F.linear(torch.tanh(F.linear(x * scale, w1, b1)), w2, b2)


def loss_of(model, rank, t, micro):
    x, y = batch(rank, t, micro)
    return F.cross_entropy(forward(model.scale, model.fc1.weight, model.fc1.bias, model.fc2.weight,
                                   model.fc2.bias, x), y)


def shapes(model):
    return [p.shape for p in trainable(model)]


def gradient(flat, shapes_, scale, rank, n, t):
    """The flat gradient worker ``rank`` computes at ``flat``: the sum of its micro-batches,
    with the gradient of ``MISSING_GRAD[t]`` zero on rank 1 % n."""
    params, offset = [], 0
    for s in shapes_:
        k = math.prod(s)
        params.append(flat[offset:offset + k].view(s).clone().requires_grad_(True))
        offset += k
    total = [torch.zeros_like(p) for p in params]
    for micro in range(MICRO_BATCHES):
        x, y = batch(rank, t, micro)
        loss = F.cross_entropy(forward(scale, *params, x), y)
        total = [a + b for a, b in zip(total, torch.autograd.grad(loss, params))]
    if t in MISSING_GRAD and rank == 1 % n:
        total[MISSING_GRAD[t]] = torch.zeros_like(total[MISSING_GRAD[t]])
    return torch.cat([g.reshape(-1) for g in total])


def flat_lr(model, groups, t, base):
    """Each trainable element's lr at step t (its group's lr)."""
    parts = []
    for g in groups:
        lr = lr_at(t, base) * g["lr_factor"]
        parts.extend(torch.full((p.numel(),), lr) for p in g["params"] if p.requires_grad)
    return torch.cat(parts)


def flat(tensors):
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


def pipeline_layout(opt):
    """(tensor sizes, [(tensor indices, chunk cuts)] per bucket) of ``opt``'s main (last) pipeline."""
    pipe = list(opt.exchanges.values())[-1]
    return list(pipe.sizes), [(list(idx), list(lay.cuts)) for idx, lay in zip(pipe.buckets, pipe.layouts)]


def compression_factory(layout):
    """``C(name, two_way=True, **opts)``: a Compression over a ``pipeline_layout``."""
    sizes, buckets = layout
    return lambda name, two_way=True, **opts: Compression(name, sizes, buckets, two_way, **opts)


def simulate(sim: Simulator, model, groups, n, steps, base_lr):
    """Run a simulator on the workload; returns x and each worker's point after every step."""
    shapes_ = shapes(model)
    scale = model.scale.detach()
    xs, points = [], []
    for t in range(steps):
        grads = [gradient(pt, shapes_, scale, i, n, t) for i, pt in enumerate(sim.points())]
        sim.step(grads, flat_lr(model, groups, t, base_lr))
        xs.append(sim.x.clone())
        points.append([pt.clone() for pt in sim.points()])
    return xs, points


def train(opt, model, rank, n, steps, base_lr, start=0):
    """Drive a real optimizer on the workload from step ``start``; returns the flat trainable
    parameters after every step (and, for SAEF, the synced model x)."""
    params = trainable(model)
    xs, points = [], []
    for t in range(start, steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(t, base_lr) * g["lr_factor"]

        seen = []

        def closure():
            opt.zero_grad()
            total = 0.0
            for micro in range(MICRO_BATCHES):
                loss = loss_of(model, rank, t, micro)
                loss.backward()
                total += loss.item()
            if t in MISSING_GRAD and rank == 1 % n:
                params[MISSING_GRAD[t]].grad = None
            seen.append(total)
            return total

        if t % 2:
            assert opt.step(closure) == seen[-1], "step(closure) must return the closure's loss"
        else:
            closure()
            opt.step()
        points.append(flat(params))
        synced = [opt.state[p]["synced_param"] for p in params] if "synced_param" in opt.state[params[0]] else params
        xs.append(flat(synced))
    return xs, points


class TorchSGD(Simulator):
    """The uncompressed counterpart run by torch itself: torch.optim.SGD on the mean gradient."""

    def __init__(self, x0, n, momentum=0.0, nesterov=False):
        super().__init__(x0, n)
        self.param = torch.nn.Parameter(self.x.clone())
        self.opt = torch.optim.SGD([self.param], lr=1.0, momentum=momentum, nesterov=nesterov)

    def step(self, g, lr):
        if not torch.all(lr == lr[0]):
            raise ValueError("TorchSGD takes one lr for all parameters")
        self.param.grad = mean(g)
        self.opt.param_groups[0]["lr"] = float(lr[0])
        self.opt.step()
        self.x = self.param.detach().clone()


# ---------------------------------------------------------------------- the cases


class Case:
    """A taciturn preset (registry name + keyword arguments) and its transcription.

    ``sim(x0, n, C)`` builds the simulator; ``C(name, **opts)`` makes the Compression for the
    real optimizer's pipeline layout (the tests pass the buckets and cuts it uses).
    """

    def __init__(self, optimizer, kwargs, lr, sim, groups=True):
        self.optimizer, self.kwargs, self.lr, self.sim, self.groups = optimizer, kwargs, lr, sim, groups


SMALL_BUCKETS = 0.002  # MB: fc1.weight, fc1.bias and fc2 land in three buckets

CASES = {
    "cdadam_block1024": Case("CDAdam", {}, 1e-2, lambda x0, n, C: CDAdam(x0, n, C("block_sign", block_size=1024))),
    "cdadam_block64_buckets": Case(
        "cd_adam", dict(block_size=64, bucket_cap_mb=SMALL_BUCKETS, betas=(0.8, 0.95), eps=1e-6), 1e-2,
        lambda x0, n, C: CDAdam(x0, n, C("block_sign", block_size=64), betas=(0.8, 0.95), nu=1e-6)),
    "cdadam_scaled_sign": Case("cdadam", dict(compressor="scaled_sign"), 1e-2,
                               lambda x0, n, C: CDAdam(x0, n, C("scaled_sign"))),
    "sparsams": Case("SparsAMS", dict(ratio=0.05), 1e-2,
                     lambda x0, n, C: SparsAMS(x0, n, C("topk", two_way=False, ratio=0.05))),
    "sparsams_momentum_correction": Case(
        "SparsAMS", dict(ratio=0.05, momentum_correction=True, betas=(0.8, 0.95), bucket_cap_mb=SMALL_BUCKETS), 1e-2,
        lambda x0, n, C: SparsAMSMomentumCorrection(x0, n, C("topk", two_way=False, ratio=0.05), betas=(0.8, 0.95))),
    "distef_nesterov": Case("DistEFSGD", dict(momentum=0.9, nesterov=True, block_size=64), 0.1,
                            lambda x0, n, C: DistEFSGDM(x0, n, C("block_sign", block_size=64), 0.9, True)),
    "distef_heavyball_per_tensor_l2": Case(
        "dist_ef_blocksgdm", dict(momentum=0.9, block_size=None, weight_decay=0.01), 0.1,
        lambda x0, n, C: DistEFSGDM(x0, n, C("block_sign", block_size=None), 0.9, False, weight_decay=0.01)),
    "saef_two_way": Case("SAEFSGD", dict(momentum=0.9, ratio=0.05, error_avg_period=4), 0.1,
                         lambda x0, n, C: SAEF(x0, n, C("topk", ratio=0.05), 0.9, period=4)),
    "saef_single_way": Case("saef", dict(momentum=0.9, ratio=0.05, error_avg_period=3, two_way=False), 0.1,
                            lambda x0, n, C: SAEF(x0, n, C("topk", two_way=False, ratio=0.05), 0.9, period=3,
                                                  two_way=False)),
    "saef_local_ef_sign": Case("SAEFSGD", dict(momentum=0.5, compressor="block_sign", block_size=64,
                                               step_ahead=False), 0.1,
                               lambda x0, n, C: SAEF(x0, n, C("block_sign", block_size=64), 0.5, step_ahead=False)),
    "onebit_adam": Case("OneBitAdam", dict(freeze_step=6), 1e-2,
                        lambda x0, n, C: OneBitAdam(x0, n, C("block_sign", block_size=1024), 6)),
    "onebit_cdadam": Case("onebit_adam", dict(freeze_step=13, warmup="cdadam", block_size=64), 1e-2,
                          lambda x0, n, C: OneBitAdam(x0, n, C("block_sign", block_size=64), 13, "cdadam",
                                                      C("block_sign", block_size=64))),
    "ef21": Case("EF21SGD", dict(block_size=64), 0.1, lambda x0, n, C: EF21SGD(x0, n, C("block_sign", block_size=64))),
    "signum": Case("Signum", dict(momentum=0.9), 1e-3, lambda x0, n, C: Signum(x0, n, 0.9)),
    # compressor "identity": each preset is its uncompressed counterpart
    "cdadam_decoupled_weight_decay": Case(
        "CDAdam", dict(block_size=64, weight_decay=0.05, decoupled_weight_decay=True), 1e-2,
        lambda x0, n, C: CDAdam(x0, n, C("block_sign", block_size=64), weight_decay=0.05, decoupled=True)),
    "ef_amsgrad_l2": Case("EFAMSGrad", dict(block_size=64, weight_decay=0.05), 1e-2,
                          lambda x0, n, C: EFAMSGrad(x0, n, C("block_sign", block_size=64), weight_decay=0.05)),
    "naive_amsgrad_scaled_sign": Case("NaiveAMSGrad", dict(compressor="scaled_sign"), 1e-2,
                                      lambda x0, n, C: NaiveAMSGrad(x0, n, C("scaled_sign"))),
    "cdadam_momentum": Case("CDAdam", dict(block_size=64, track="momentum", weight_decay=0.05), 1e-2,
                            lambda x0, n, C: CDAdamMomentum(x0, n, C("block_sign", block_size=64), weight_decay=0.05)),
    "amsgrad": Case("AMSGrad", {}, 1e-2, lambda x0, n, C: AMSGrad(x0, n)),
    "cdadam_identity": Case("CDAdam", dict(compressor="identity"), 1e-2, lambda x0, n, C: AMSGrad(x0, n)),
    "sparsams_identity": Case("SparsAMS", dict(compressor="identity"), 1e-2, lambda x0, n, C: AMSGrad(x0, n)),
    # masked every step: the momentum restarts, M = (1-b1) mean g, AMSGrad with b1 = 0 and eps / (1-b1)^2
    "sparsams_momentum_correction_identity": Case(
        "SparsAMS", dict(compressor="identity", momentum_correction=True), 1e-2,
        lambda x0, n, C: AMSGrad(x0, n, betas=(0.0, 0.99), nu=1e-8 / (1 - 0.9) ** 2)),
    "cdadam_momentum_identity": Case("CDAdam", dict(compressor="identity", track="momentum"), 1e-2,
                                     lambda x0, n, C: AMSGrad(x0, n)),
    "distef_identity": Case("DistEFSGD", dict(compressor="identity", momentum=0.9, nesterov=True), 0.1,
                            lambda x0, n, C: TorchSGD(x0, n, 0.9, True), groups=False),
    "ef21_identity": Case("EF21SGD", dict(compressor="identity"), 0.1, lambda x0, n, C: TorchSGD(x0, n),
                          groups=False),
    "saef_identity": Case("SAEFSGD", dict(compressor="identity", momentum=0.9, error_avg_period=2), 0.1,
                          lambda x0, n, C: TorchSGD(x0, n, 0.9), groups=False),
}

#: the cases whose compressor is identity, with the preset they must equal
IDENTITY_OF = {"cdadam_identity": "amsgrad", "sparsams_identity": "amsgrad", "cdadam_momentum_identity": "amsgrad"}


def dead_unit_resume(make_opt, freeze: int, after: int, drop_mask: bool):
    """Train ``make_opt(param_groups(model))`` with fc1's unit 0 getting no gradient (its frozen
    variance is exactly 0) ``freeze`` steps, checkpoint, train ``after`` more; then a fresh model
    and optimizer load the checkpoint (without its ``zero_variance_mask`` entries when
    ``drop_mask``) and train the same ``after`` steps. Returns (the first optimizer, its mask of
    fc1's weight at the checkpoint, the fresh optimizer, the fresh model, the first run's final
    weights, the resumed run's)."""
    def run(model, opt, steps):
        for t in steps:
            opt.zero_grad()
            loss_of(model, 0, t, 0).backward()
            model.fc1.weight.grad[0] = 0.0
            opt.step()
        return [p.detach().clone() for p in trainable(model)]

    model = make_model(0)
    opt = make_opt(param_groups(model))
    run(model, opt, range(freeze))
    mask = opt.state[model.fc1.weight].get("zero_variance_mask")
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buf)
    full = run(model, opt, range(freeze, freeze + after))
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    if drop_mask:
        for st in saved["optimizer"]["state"].values():
            st.pop("zero_variance_mask", None)
    fresh_model = make_model(1)
    fresh_model.load_state_dict(saved["model"])
    fresh = make_opt(param_groups(fresh_model))
    fresh.load_state_dict(saved["optimizer"])
    return opt, mask, fresh, fresh_model, full, run(fresh_model, fresh, range(freeze, freeze + after))
