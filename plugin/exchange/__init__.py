"""The bucketed compressed allreduce: ``Exchange`` (buckets, the one entry ``allreduce``),
``BucketExchange`` (one bucket's three stages), ``direction`` (one-way, two-way, sharded),
``SideStream`` (the CUDA stream the hooks' exchanges run on)."""
from .bucket import BucketExchange, Workspace
from .direction import OneWay, Sharded, TwoWay, init_state
from .exchange import DOWNLINKS, Exchange, bucket_ranges, bucket_seed
from .streams import SideStream

__all__ = ["Exchange", "BucketExchange", "Workspace", "OneWay", "TwoWay", "Sharded", "init_state", "DOWNLINKS",
           "bucket_ranges", "bucket_seed", "SideStream"]
