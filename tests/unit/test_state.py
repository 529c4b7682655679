"""taciturn.state: the flat per-rank compression state in ``optimizer.state[key]``, its keys and
dtype, the round trip through ``optimizer.state_dict()``, and the refusal of another rank's,
world's or settings' state (with the fix named), unless the state is reset."""
from __future__ import annotations

import io

import pytest
import torch

import taciturn
from taciturn import Exchange, LocalCommunicator, make_compressor
from taciturn.feedback import make_feedback
from taciturn.state import RESET_HINT, CompressionState, mismatch, refusal

SIZES = [6, 3, 5]  # with a cap of 8 elements: buckets [6] and [3, 5]
CAP_MB = 8 * 4 / 2 ** 20
KEY = "taciturn"


class RankComm(LocalCommunicator):
    """Rank ``rank`` of ``world_size``: enough for layouts and state, which run no collective."""

    def __init__(self, rank=0, world_size=1):
        self.rank, self.world_size = rank, world_size


def exchanges(comm, block_size=4, two_way=True):
    return {
        "grad": Exchange(SIZES, make_compressor("block_sign", block_size=block_size), make_feedback("markov"),
                         make_feedback("markov"), comm, two_way=two_way, bucket_cap_mb=CAP_MB),
        "delta": Exchange(SIZES, make_compressor("topk", ratio=0.5), make_feedback("ef"), make_feedback("ef"), comm,
                          bucket_cap_mb=None),
    }


def make_state(comm=None, rank_bound=False, **kw):
    comm = comm or LocalCommunicator()
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(sum(SIZES)))], lr=0.1)
    cs = CompressionState(opt, KEY, exchanges(comm, **kw), comm, torch.device("cpu"), "Tester", rank_bound)
    cs.reset()
    return opt, cs


def fill(cs, seed=0):
    """Distinct non-zero values in every state tensor, written through ``buckets``."""
    gen = torch.Generator().manual_seed(seed)
    for name in cs.exchanges:
        for st in cs.buckets(name):
            for t in st.values():
                t.copy_(torch.randn(t.shape, generator=gen))


def tensors(flat):
    return {k: v for k, v in flat.items() if torch.is_tensor(v)}


def through_bytes(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ----------------------------------------------------------------------------- layout of the state

def test_reset_lays_out_every_bucket_of_every_exchange_under_flat_keys():
    comm = RankComm(rank=1, world_size=2)
    _, cs = make_state(comm, rank_bound=True)
    flat = cs.flat
    assert flat["step"] == 0 and flat["world_size"] == 2 and flat["rank"] == 1
    assert flat["signature"] == cs.signature()
    grad, delta = cs.exchanges["grad"], cs.exchanges["delta"]
    assert [list(b) for b in grad.buckets] == [[0], [1, 2]] and len(delta.buckets) == 1
    expected = {}
    for b, lay in enumerate(grad.layouts):
        # Markov two-way: the worker's and the result's sequences full length, the server's this rank's chunk
        expected.update({f"grad.{b}.worker_markov": lay.numel, f"grad.{b}.result_markov": lay.numel,
                         f"grad.{b}.server_markov": lay.chunk_numel(1)})
    lay = delta.layouts[0]
    expected.update({"delta.0.worker_error": lay.numel, "delta.0.server_error": lay.chunk_numel(1)})
    assert {k: v.numel() for k, v in tensors(flat).items()} == expected
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" and not v.any() for v in tensors(flat).values())
    # bucket() strips the prefix: the names of taciturn.feedback
    assert sorted(cs.bucket("grad", 1)) == ["result_markov", "server_markov", "worker_markov"]
    assert cs.bucket("grad", 1)["server_markov"].numel() == grad.layouts[1].chunk_numel(1)


def test_one_unnamed_exchange_has_bucket_keys_and_no_rank_unless_bound():
    comm = LocalCommunicator()
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    ex = Exchange([3], make_compressor("scaled_sign"), make_feedback("ef"), make_feedback("none"), comm,
                  two_way=False)
    cs = CompressionState(opt, KEY, {"": ex}, comm, "cpu", "Tester")
    cs.reset(step=5)
    assert set(opt.state[KEY]) == {"step", "world_size", "signature", "0.worker_error"}
    assert cs.step == 5 and cs.buckets("")[0]["worker_error"].numel() == 3


def test_buckets_are_the_states_own_tensors_and_the_step_an_int():
    opt, cs = make_state()
    fill(cs)
    for name in cs.exchanges:
        for b, st in enumerate(cs.buckets(name)):
            for k, t in st.items():
                assert t.data_ptr() == opt.state[KEY][f"{name}.{b}.{k}"].data_ptr()
                assert t.any()
    cs.step = 3.0
    assert cs.step == 3 and type(opt.state[KEY]["step"]) is int


def test_signature_follows_the_settings_and_not_the_values():
    _, a = make_state()
    _, b = make_state()
    fill(b)
    assert a.signature() == b.signature()
    for other in (dict(block_size=8), dict(two_way=False)):
        assert make_state(**other)[1].signature() != a.signature(), other
    # the signature names what it covers: each exchange's compressor, rules, direction, buckets
    for name, ex in a.exchanges.items():
        assert repr(name) in a.signature() and repr(ex.compressor) in a.signature()


# ----------------------------------------------------------------------------- save and load

def test_round_trip_through_an_optimizer_state_dict():
    opt, cs = make_state()
    fill(cs, seed=1)
    cs.step = 4
    saved = through_bytes(opt.state_dict())
    before = {k: v.clone() for k, v in tensors(cs.flat).items()}

    opt2, cs2 = make_state()
    assert cs2.saved(saved, reset=False) is saved["state"][KEY]
    opt2.load_state_dict(saved)  # replaces opt2.state: the state is looked up each time
    cs2.restore(cs2.saved(saved, reset=False), reset=False)
    assert cs2.step == 4 and cs2.flat is opt2.state[KEY]
    got = tensors(cs2.flat)
    assert sorted(got) == sorted(before)
    for k, v in before.items():
        assert got[k].dtype == torch.float32 and torch.equal(got[k], v), k
    # copies: the loaded dict and the live state no longer share memory
    saved["state"][KEY]["grad.0.worker_markov"].fill_(123.0)
    assert torch.equal(cs2.flat["grad.0.worker_markov"], before["grad.0.worker_markov"])


def test_restore_keeps_fp32_from_a_low_precision_copy_and_the_other_entries():
    opt, cs = make_state()
    fill(cs)
    sd = opt.state_dict()
    flat = dict(sd["state"][KEY])
    exact = {k: v.half().float() for k, v in tensors(flat).items()}
    flat.update({k: v.half() for k, v in tensors(flat).items()})
    _, cs2 = make_state()
    cs2.restore(cs2.saved({"state": {KEY: flat}}, reset=False), reset=False)
    for k, v in exact.items():
        assert cs2.flat[k].dtype == torch.float32 and torch.equal(cs2.flat[k], v), k
    assert cs2.flat["signature"] == cs.signature() and cs2.flat["world_size"] == 1


def test_reset_zeroes_the_state_and_keeps_the_step():
    opt, cs = make_state()
    fill(cs)
    cs.step = 9
    sd = through_bytes(opt.state_dict())
    cs.reset(cs.step)
    assert cs.step == 9 and not any(v.any() for v in tensors(cs.flat).values())
    assert sd["state"][KEY]["step"] == 9 and any(v.any() for v in tensors(sd["state"][KEY]).values())
    # reset on load: zeros at the saved step; nothing saved: zeros at step 0
    _, cs2 = make_state()
    cs2.restore(cs2.saved(sd, reset=True), reset=True)
    assert cs2.step == 9 and not any(v.any() for v in tensors(cs2.flat).values())
    assert cs2.saved({"state": {}}, reset=True) is None
    cs2.restore(None, reset=True)
    assert cs2.step == 0 and cs2.flat["signature"] == cs2.signature()


def test_free_drops_one_exchange_and_an_earlier_state_dict_keeps_it():
    opt, cs = make_state()
    fill(cs)
    earlier = opt.state_dict()
    cs.free("grad")
    assert not any(k.startswith("grad.") for k in cs.flat)
    assert cs.buckets("grad") == [{}, {}]
    assert sorted(cs.bucket("delta", 0)) == ["server_error", "worker_error"]
    assert any(k.startswith("grad.") for k in earlier["state"][KEY])


def test_free_drops_the_unnamed_exchange_too():
    # the keys of an exchange named "" (the Horovod wrapper's single exchange) are "<bucket>.<name>"
    comm = LocalCommunicator()
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    ex = Exchange([3], make_compressor("scaled_sign"), make_feedback("ef"), make_feedback("none"), comm,
                  two_way=False)
    cs = CompressionState(opt, KEY, {"": ex}, comm, "cpu", "Tester")
    cs.reset()
    cs.free("")
    assert sorted(cs.flat) == ["signature", "step", "world_size"]


# ----------------------------------------------------------------------------- refusals

def test_mismatch_names_the_first_problem():
    comm = RankComm(rank=1, world_size=4)
    good = {"world_size": 4, "rank": 1, "signature": "S"}
    assert mismatch(good, comm, "S") is None
    assert mismatch({**good, "world_size": 2}, comm, "S") == \
        "it was saved with world size 2 and this job has 4 ranks"
    assert mismatch({**good, "rank": 3}, comm, "S") == "it was saved by rank 3, not by this rank (1)"
    assert mismatch({**good, "rank": 3}, comm, "S", rank=False) is None
    assert mismatch({**good, "signature": "T"}, comm, "S") == \
        "it was saved with different compression settings (T) than these (S)"
    assert mismatch({**good, "signature": "T"}, comm) is None  # no signature to compare
    # world size is checked first, then the rank
    assert "world size" in mismatch({"world_size": 2, "rank": 0, "signature": "T"}, comm, "S")
    err = refusal("Opt", "a problem")
    assert isinstance(err, ValueError)
    assert str(err) == f"Opt.load_state_dict: refusing the compression state: a problem. {RESET_HINT}"
    assert "reset_compression_state=True on every rank" in RESET_HINT


def saved_by(comm, **kw):
    opt, cs = make_state(comm, **kw)
    fill(cs)
    cs.step = 2
    return through_bytes(opt.state_dict())


@pytest.mark.parametrize("case", ["world_size", "rank", "settings", "absent"])
def test_refused_state_names_the_reason_and_the_fix_unless_reset(case):
    here = RankComm(rank=1, world_size=2)
    if case == "world_size":
        sd, kw, needle = saved_by(RankComm(1, 3), rank_bound=True), {}, \
            "it was saved with world size 3 and this job has 2 ranks"
    elif case == "rank":
        sd, kw, needle = saved_by(RankComm(0, 2), rank_bound=True), {}, "it was saved by rank 0, not by this rank (1)"
    elif case == "settings":
        sd, kw, needle = saved_by(RankComm(1, 2), rank_bound=True, block_size=8), {}, \
            "it was saved with different compression settings"
    else:
        sd, kw, needle = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))]).state_dict(), {}, \
            "the checkpoint holds no taciturn compression state ('taciturn'; was it saved by another optimizer?)"
    opt, cs = make_state(here, rank_bound=True, **kw)
    fill(cs)
    live = {k: v.clone() for k, v in tensors(cs.flat).items()}
    with pytest.raises(ValueError) as err:
        cs.saved(sd, reset=False)
    msg = str(err.value)
    assert msg.startswith("Tester.load_state_dict: ") and needle in msg
    assert "reset_compression_state=True" in msg
    # a refusal changes nothing
    assert all(torch.equal(cs.flat[k], v) for k, v in live.items())
    # reset: this rank's zeros in this world, at the saved step
    cs.restore(cs.saved(sd, reset=True), reset=True)
    assert cs.step == (0 if case == "absent" else 2)
    assert cs.flat["rank"] == 1 and cs.flat["world_size"] == 2 and cs.flat["signature"] == cs.signature()
    assert sorted(tensors(cs.flat)) == sorted(live)
    assert not any(v.any() for v in tensors(cs.flat).values())


def test_another_ranks_state_is_accepted_when_not_rank_bound():
    """The optimizers check world size and settings only (DeepSpeed loads rank 0's state dict
    on every rank before each rank's own compression state)."""
    sd = saved_by(RankComm(0, 2))
    assert "rank" not in sd["state"][KEY]
    _, cs = make_state(RankComm(1, 2))
    cs.restore(cs.saved(sd, reset=False), reset=False)
    assert cs.step == 2 and cs.flat["grad.0.worker_markov"].any()


def test_optimizer_reset_compression_state_keeps_the_global_step():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = taciturn.CDAdam(model.parameters(), lr=1e-2, block_size=4, process_group="local")
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    flat = opt.compression.flat
    assert opt.global_step == 3 and any(v.any() for v in tensors(flat).values())
    opt.reset_compression_state()
    assert opt.global_step == 3 and sorted(tensors(opt.compression.flat)) == sorted(tensors(flat))
    assert not any(v.any() for v in tensors(opt.compression.flat).values())
