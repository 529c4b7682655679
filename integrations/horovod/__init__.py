"""Horovod: a compressed ``DistributedOptimizer`` for ``horovodrun`` jobs (MPI or Gloo controller).

Two lines of a Horovod script change::

    import horovod.torch as hvd
    from taciturn.integrations import horovod as thvd

    hvd.init()
    opt = thvd.DistributedOptimizer(taciturn.AMSGrad(model.parameters(), lr=1e-4, process_group="local"),
                                    named_parameters=model.named_parameters(),
                                    compression=thvd.Compression.cdadam)      # = CD-Adam
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    thvd.broadcast_optimizer_state(opt, root_rank=0)

The signature and behaviour are ``hvd.DistributedOptimizer``'s: gradient hooks start the
communication of a bucket as soon as all its gradients are ready, during ``backward()``;
``step()`` waits for it, writes the averages into ``p.grad`` and runs the wrapped optimizer;
``synchronize()`` / ``skip_synchronize()`` let users clip in between; ``backward_passes_per_step``
accumulates locally and communicates once.

Compression:

- a taciturn preset (``Compression.cdadam``, ``dist_ef_block_sign``, ``sparsams_topk``, ``ef_sign``,
  ``markov_sign``, ``bf16``) runs the core ``Exchange`` (``taciturn.exchange``: worker feedback,
  all_to_all of chunks, server feedback and recompression, all_gather) over Horovod's alltoall
  and allgather. The wrapped optimizer receives the two-way-compressed average in ``p.grad``;
  with ``taciturn.AMSGrad(..., process_group="local")`` on top, ``Compression.cdadam`` is
  ``taciturn.CDAdam``. A preset takes compressor options: ``Compression.cdadam(block_size=256)``,
  ``Compression.sparsams_topk(ratio=0.05)``. Buckets (``bucket_cap_mb``, parameters in reverse
  order, the order gradients arrive) run one after the other on one communication thread, in
  the same order on every rank.
- a Horovod ``Compressor`` (``Compression.none``, ``Compression.fp16``, ``ScaledFP16Compressor``)
  is Horovod's path: per-parameter ``allreduce_async_`` of the compressed tensor, named by the
  parameter, fused by Horovod.

Sparse gradients (``nn.Embedding(sparse=True)``): with a Horovod ``Compressor`` they take
Horovod's paths, the sparse allreduce (allgather of indices and values) or, with
``sparse_as_dense=True``, a dense allreduce; the presets always exchange them dense (the codecs
are dense). Either way ``p.grad`` is sparse again after ``synchronize()``, for SparseAdam.

Uneven inputs (``hvd.join()``): a rank that runs out of data calls ``hvd.join()``, as with
Horovod's optimizer. A Horovod ``Compressor`` runs Horovod's allreduce, which joined ranks feed
with zeros. A preset first counts the ranks present each step (a one-float allreduce, which a
joined rank answers with 0); while some rank is joined, the step's gradients go through an
uncompressed fp32 allreduce instead (Horovod's join semantics: joined ranks add zeros, the
average divides by all ranks) and the compression state stays as it is on every rank, so
compressed steps resume in step once every rank has joined. ``hvd.join()`` returns the last rank
to join: broadcast the model from it, as with Horovod.

Compression state (errors, Markov sequences, step) lives in the wrapped optimizer's state under
``optimizer.state["taciturn.horovod"]``, so ``optimizer.state_dict()`` carries it. It is per rank
(each worker's feedback, each rank's server chunk): every rank saves and loads its own state
dict, and ``load_state_dict`` refuses another rank's or another world size's unless
``reset_compression_state=True``. ``broadcast_optimizer_state`` (use this one, not
``hvd.broadcast_optimizer_state``) broadcasts the wrapped optimizer's state from the root and
keeps every rank's own compression state when all ranks hold theirs for the same step; when
they do not (only the root loaded a checkpoint, a rank joined, the world changed) it restarts
compression from zero on every rank, the only state all ranks can agree on. Importing this
module registers a handler so ``hvd.elastic.TorchState`` commits, restores and syncs the
optimizer this way.

Modules: ``compression`` (the choices), ``optimizer`` (the wrapper), ``taciturn_path`` and
``passthrough`` (its two communication paths, one interface: ``grad_ready``, ``finish``,
``forget``, ``drain``, ``rejoin`` and the compression-state calls), ``gradients`` (the dense
wire gradient), ``elastic`` (state sync, the elastic handler).

Horovod 0.28.1's torch binding has no bfloat16 collectives, so there is no bf16 Compressor for
``hvd.DistributedOptimizer``; ``Compression.bf16`` carries bf16 through this module's optimizer
(alltoall/allgather of bf16 bytes, averaged in fp32).
"""
from __future__ import annotations

try:
    import horovod.torch  # noqa: F401
    import horovod.torch.elastic  # noqa: F401
except ImportError as _e:  # pragma: no cover - depends on the environment
    raise ImportError("taciturn.integrations.horovod needs Horovod built with PyTorch support "
                      "(Horovod 0.28.1 must be built from source for torch >= 2.1): run scripts/install_horovod.sh") from _e

from .compression import Compression, ScaledFP16Compressor, TaciturnCompression
from .elastic import OptimizerStateHandler, broadcast_optimizer_state, broadcast_parameters
from .optimizer import DistributedOptimizer
from .taciturn_path import STATE_KEY

__all__ = ["Compression", "TaciturnCompression", "ScaledFP16Compressor", "DistributedOptimizer",
           "broadcast_parameters", "broadcast_optimizer_state", "OptimizerStateHandler", "STATE_KEY"]
