"""SGD-family methods: dist-EF-SGD / blockSGDM, EF21 two-way SGD, signum, and the SGD(M) baseline."""
from __future__ import annotations

from ..presets import preset
from .base import CompressedOptimizer, check_range
from .functional import momentum_, weight_decay_


class DistEFSGD(CompressedOptimizer):
    """dist-EF-SGD / dist-EF-blockSGD / dist-EF-blockSGDM (Zheng et al., Algorithms 2-4).

    Error feedback on workers and servers with the errors rescaled by s = lr_{t-1}/lr_t
    (lr_{-1} = 0, per param group, following any scheduler). Each worker keeps
    m = mu m + g and compresses m (heavy ball) or, with ``nesterov=True``, mu m + g
    (Algorithm 4 with the "+ g" term); then x = x - lr * Delta~. Default codec ``block_sign``
    with 1024-element blocks; ``block_size=None`` is one block per tensor (the paper's).
    With ``compressor="identity"`` it is plain distributed SGD(M).
    """

    preset = "dist_ef_block_sign"
    rule_state = ()
    unsharded_because = ("its update x = x - lr * Delta~ keeps no state, and its momentum is each worker's own, "
                         "taken before compression")

    def __init__(self, params, lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0,
                 compressor=None, block_size=1024, ratio=None, k=None, compressor_options=None,
                 worker_feedback=None, server_feedback=None, two_way=None, **kwargs):
        check_range("momentum", momentum, 0.0, 1.0, hi_open=True)
        if nesterov and momentum <= 0:
            raise ValueError("nesterov=True needs momentum > 0")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
        grad = preset(self.preset).configure(compressor, block_size=block_size, ratio=ratio, k=k,
                                             options=compressor_options, worker=worker_feedback,
                                             server=server_feedback, two_way=two_way)
        super().__init__(params, defaults, {"grad": grad}, **kwargs)

    def lr_ratios(self):
        """s = lr_{t-1}/lr_t per param group (0 at the first step); remembers this step's lr."""
        prev = self.compression.flat.get("prev_lr") or [0.0] * len(self.param_groups)
        ratios = [p / g["lr"] if g["lr"] > 0 else 0.0 for p, g in zip(prev, self.param_groups)]
        self.compression.flat["prev_lr"] = [float(g["lr"]) for g in self.param_groups]
        return ratios

    def worker_direction(self, p, g, group):
        g = weight_decay_(self.master(p), g, lr=group["lr"], weight_decay=group["weight_decay"], decoupled=False)
        buf = self.param_state(p, "momentum_buffer")[0] if group["momentum"] else None
        return momentum_(g, buf, group["momentum"], group["nesterov"])

    def _step(self):
        grads = self.local_grads()
        dirs = [self.worker_direction(p, g, self.param_groups[gi]) for (gi, p), g in zip(self._trainable, grads)]
        avg = self.communicate("grad", dirs, error_scale=self.lr_ratios())
        for (gi, p), d in zip(self._trainable, avg):
            x = self.master(p)
            x.add_(d, alpha=-self.param_groups[gi]["lr"])
            self.write_back(p, x)


class SGD(DistEFSGD):
    """Uncompressed distributed SGD(M) baseline (fp32, torch's SGD semantics on the average)."""

    preset = "identity"

    def __init__(self, params, lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0, **kwargs):
        # the preset's parts, named so that a compressor or feedback given here is refused
        super().__init__(params, lr, momentum, nesterov, weight_decay, compressor=None,
                         worker_feedback=None, server_feedback=None, **kwargs)


class EF21SGD(DistEFSGD):
    """EF21 two-way (Markov compression sequences on workers and servers) + SGD(M)."""

    preset = "cdadam"

    def __init__(self, params, lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0,
                 compressor="block_sign", block_size=1024, ratio=None, k=None, compressor_options=None, **kwargs):
        super().__init__(params, lr, momentum, nesterov, weight_decay, compressor, block_size, ratio, k,
                         compressor_options, None, None, None, **kwargs)


class Signum(CompressedOptimizer):
    """signum with majority vote (Bernstein et al.): each worker sends sign(m) with
    m = b m + (1-b) g (1 bit per element, no scale); the chunk owner takes the sign of the sum
    (the vote, ties to +1) and sends it back; x = x - lr * vote. ``momentum=0`` is signSGD."""

    rule_state = ()
    unsharded_because = "its update x = x - lr * vote keeps no state, and its momentum is each worker's own"

    def __init__(self, params, lr=1e-4, momentum=0.9, weight_decay=0.0, **kwargs):
        check_range("momentum", momentum, 0.0, 1.0, hi_open=True)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
        super().__init__(params, defaults, {"grad": preset("sign_vote")}, **kwargs)

    def _step(self):
        grads = self.local_grads()
        dirs = []
        for (gi, p), g in zip(self._trainable, grads):
            group = self.param_groups[gi]
            g = weight_decay_(self.master(p), g, lr=group["lr"], weight_decay=group["weight_decay"], decoupled=False)
            if group["momentum"]:
                m = self.param_state(p, "momentum_buffer")[0]
                g = m.mul_(group["momentum"]).add_(g, alpha=1 - group["momentum"])
            dirs.append(g)
        for (gi, p), vote in zip(self._trainable, self.communicate("grad", dirs)):
            x = self.master(p)
            x.add_(vote, alpha=-self.param_groups[gi]["lr"])
            self.write_back(p, x)
