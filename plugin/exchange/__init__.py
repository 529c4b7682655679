"""The bucketed compressed allreduce: ``Exchange`` (buckets, the one entry ``allreduce``),
``BucketExchange`` (one bucket's three stages), ``direction`` (one-way vs two-way)."""
from .bucket import BucketExchange, Workspace
from .direction import OneWay, TwoWay, init_state
from .exchange import Exchange, bucket_ranges, bucket_seed

__all__ = ["Exchange", "BucketExchange", "Workspace", "OneWay", "TwoWay", "init_state", "bucket_ranges",
           "bucket_seed"]
