"""Communication metrics: bytes per direction, compression and collective time."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class CommStats:
    """Counters of one rank, cumulative since construction (``last`` holds the latest step).

    ``bytes_up``: bytes this rank handed to the worker-to-server collective (its compressed
    gradient); ``bytes_down``: bytes it received from the server-to-worker collective.
    ``fp32_bytes``: what one direction costs uncompressed (4 bytes per element), so
    ``compression_ratio = fp32_bytes / bytes_up``. ``update_time``: seconds a sharded step's
    chunk owner spent in the update rule inside the exchange (0 unsharded), which
    ``compress_time`` does not count. ``bytes_intra``: bytes handed to the collectives inside a
    node (the two-level exchange's fp32/bf16 reduce-scatter and all-gather); ``bytes_up`` and
    ``bytes_down`` are then what crosses nodes.
    """

    steps: int = 0
    skipped_steps: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    fp32_bytes: int = 0
    compress_time: float = 0.0
    collective_time: float = 0.0
    update_time: float = 0.0
    bytes_intra: int = 0
    last: dict = field(default_factory=dict)

    def record(self, bytes_up: int, bytes_down: int, fp32_bytes: int, compress_time: float,
               collective_time: float, update_time: float = 0.0, bytes_intra: int = 0) -> None:
        self.bytes_up += bytes_up
        self.bytes_down += bytes_down
        self.fp32_bytes += fp32_bytes
        self.compress_time += compress_time
        self.collective_time += collective_time
        self.update_time += update_time
        self.bytes_intra += bytes_intra
        step = dict(bytes_up=bytes_up, bytes_down=bytes_down, fp32_bytes=fp32_bytes,
                    compress_time=compress_time, collective_time=collective_time, update_time=update_time,
                    bytes_intra=bytes_intra)
        if self.last.get("_open"):
            for k, v in step.items():
                self.last[k] += v
        else:
            self.last = {**step, "_open": True}

    def end_step(self) -> None:
        """Close the current optimizer step (several buckets add up to one step)."""
        self.steps += 1
        self.last.pop("_open", None)

    @property
    def compression_ratio(self) -> float:
        return self.fp32_bytes / self.bytes_up if self.bytes_up else 1.0

    def as_dict(self, prefix: str = "taciturn/") -> dict:
        last = {k: v for k, v in self.last.items() if not k.startswith("_")}
        out = {f"{prefix}{k}": v for k, v in last.items()}
        out[f"{prefix}compression_ratio"] = (last["fp32_bytes"] / last["bytes_up"]
                                            if last.get("bytes_up") else self.compression_ratio)
        out[f"{prefix}total_bytes_up"] = self.bytes_up
        out[f"{prefix}total_bytes_down"] = self.bytes_down
        return out

    def reset(self) -> None:
        fresh = CommStats()
        self.__dict__.update(asdict(fresh))
