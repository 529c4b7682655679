"""Feedback rules (none / EF / Markov) and their state, alone and inside a world-size-1 pipeline."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from taciturn import Exchange, LocalCommunicator, make_compressor
from taciturn.exchange import init_state
from taciturn.feedback import ErrorFeedback, Feedback, MarkovFeedback, make_feedback

RULES = ("none", "ef", "markov")


def vec(*values):
    return torch.tensor(values, dtype=torch.float32)


@pytest.mark.parametrize("two_way", [True, False], ids=["two_way", "one_way"])
@pytest.mark.parametrize("rule", RULES)
def test_init_state_is_fp32_zeros_of_the_right_lengths(rule, two_way):
    # 10 elements, this rank serves 4; the codec has no magnitude profile
    layout = SimpleNamespace(numel=10, chunk_numel=lambda rank: 4, compressor=make_compressor("sign"))
    state = init_state(make_feedback(rule), make_feedback(rule), layout, two_way, rank=1)
    expected = {
        ("none", True): {}, ("none", False): {},
        ("ef", True): {"worker_error": 10, "server_error": 4}, ("ef", False): {"worker_error": 10},
        ("markov", True): {"worker_markov": 10, "server_markov": 4, "result_markov": 10},
        ("markov", False): {"worker_markov": 10, "server_markov": 10},
    }[(rule, two_way)]
    assert {k: v.numel() for k, v in state.items()} == expected
    assert all(v.dtype == torch.float32 and not v.any() for v in state.values())
    # each side keeps only its own rule's state: a "none" server adds nothing to the worker's
    alone = init_state(make_feedback(rule), make_feedback("none"), layout, two_way, rank=1)
    assert {k: v.numel() for k, v in alone.items()} == {k: n for k, n in expected.items() if k.startswith("worker")}
    # a codec with a magnitude profile adds it full-length, beside whatever the rules keep
    profiled = SimpleNamespace(**{**vars(layout), "compressor": make_compressor("block_sign", block_size=4,
                                                                                profile=0.5)})
    with_profile = init_state(make_feedback(rule), make_feedback(rule), profiled, two_way, rank=1)
    assert {k: v.numel() for k, v in with_profile.items()} == {**expected, "magnitude_profile": 10}
    assert not with_profile["magnitude_profile"].any()
    # a detrended profile also keeps the results' mean, full-length
    detrended = SimpleNamespace(**{**vars(layout), "compressor": make_compressor(
        "block_sign", block_size=4, profile=0.5, profile_detrend=0.5)})
    with_trend = init_state(make_feedback(rule), make_feedback(rule), detrended, two_way, rank=1)
    assert {k: v.numel() for k, v in with_trend.items()} == {**expected, "magnitude_profile": 10,
                                                             "magnitude_profile_trend": 10}


def run_rule(fused, x, c):
    """What a codec does with a rule in torch ops: y = x + alpha*h, then h updated from c."""
    y = fused.input(x)
    fused.apply(y, c)
    return y


def test_none_passes_through():
    fb, x = make_feedback("none"), vec(1, -2)
    assert run_rule(fb.worker_step({}, 1.0), x, vec(5, 5)) is x
    acc, rule = fb.server_step({}, 1.0, slice(0, 2))
    assert acc is None and run_rule(rule, x, vec(5, 5)) is x
    assert fb.result_target({}) is None and fb.accumulate(x, {}) is x


def test_error_feedback_rescales_and_stores_the_error():
    fb = make_feedback("ef")
    st = {"worker_error": vec(1, 1, 0), "server_error": vec(2, -2)}
    x = vec(1, 2, 3)
    y = run_rule(fb.worker_step(st, 0.5), x, vec(1, 1, 1))
    assert torch.equal(y, vec(1.5, 2.5, 3)) and torch.equal(x, vec(1, 2, 3))
    assert torch.equal(st["worker_error"], vec(0.5, 1.5, 2))
    acc, rule = fb.server_step(st, 2.0, slice(0, 2))
    z = run_rule(rule, vec(1, 1), vec(4, -4))
    assert acc is None
    assert torch.equal(z, vec(5, -3)) and torch.equal(st["server_error"], vec(1, 1))
    assert fb.result_target(st) is None
    # s = 0 (lr_{-1} = 0 in dist-EF-SGD): the error is dropped, x itself is compressed, unchanged
    y0 = run_rule(fb.worker_step(st, 0.0), x, vec(1, 1, 1))
    assert torch.equal(y0, x) and torch.equal(x, vec(1, 2, 3)) and torch.equal(st["worker_error"], vec(0, 1, 2))


def test_markov_sequences():
    fb = make_feedback("markov")
    st = {"worker_markov": vec(1, 0, 0, 0), "server_markov": vec(1, 1), "result_markov": vec(0, 0, 3, 1)}
    y = run_rule(fb.worker_step(st, 1.0), vec(2, 2, 2, 2), vec(1, 1, 1, 1))
    assert torch.equal(y, vec(1, 2, 2, 2))
    assert torch.equal(st["worker_markov"], vec(2, 1, 1, 1))
    acc, rule = fb.server_step(st, 1.0, slice(2, 4))  # H = H + a ; y = H - G[chunk]
    assert acc.data_ptr() == st["server_markov"].data_ptr()
    z = run_rule(rule, acc.add_(vec(1, 2)), vec(7, 7))
    assert torch.equal(st["server_markov"], vec(2, 3))  # G is not changed by the server's own compression...
    assert torch.equal(z, vec(-1, 2)) and torch.equal(st["result_markov"], vec(0, 0, 3, 1))
    target = fb.result_target(st)  # ...every rank adds the decoded server chunks to G, the result
    assert target.data_ptr() == st["result_markov"].data_ptr()
    one_way = {"server_markov": vec(1, 1)}
    assert torch.equal(fb.accumulate(vec(0.5, -1), one_way), vec(1.5, 0))


def test_make_feedback_names():
    assert isinstance(make_feedback("EF"), ErrorFeedback) and isinstance(make_feedback("Markov"), MarkovFeedback)
    assert type(make_feedback("none")) is Feedback
    rule = MarkovFeedback()
    assert make_feedback(rule) is rule
    with pytest.raises(ValueError, match="unknown feedback 'ef21'; valid names: ef, markov, none"):
        make_feedback("ef21")


# ----------------------------------------------------------------------------- one process, n = 1

SIZES = [700, 1500, 33, 2100]
CODECS = {"block_sign": {}, "scaled_sign": {}, "topk": {"ratio": 0.25}, "identity": {}}
EF_SCALES = (1.0, 0.5, 2.0, 1.0)


@pytest.mark.parametrize("two_way", [True, False], ids=["two_way", "one_way"])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("name", CODECS)
def test_single_process_pipeline_equals_the_pseudo_code(name, rule, two_way, simulate):
    """World size 1 (SPARS-AMS Algorithm 2, single-process CD-Adam): no process group at all."""
    pipe = Exchange(SIZES, make_compressor(name, **CODECS[name]), make_feedback(rule), make_feedback(rule),
                    LocalCommunicator(), two_way=two_way)
    states = pipe.init_state()
    gen = torch.Generator().manual_seed(0)
    xs, got = [], []
    for t, s in enumerate(EF_SCALES):
        x = [torch.randn(n, generator=gen) for n in SIZES]
        xs.append([torch.cat(x)])
        got.append(torch.cat(pipe.allreduce(x, states, error_scale=s, step=t)))
    assert all(v.dtype == torch.float32 for st in states for v in st.values())
    expected = simulate(xs, [(SIZES, [0, sum(SIZES)])], name, CODECS[name], rule, two_way, EF_SCALES)
    torch.testing.assert_close(torch.stack(got), expected, rtol=1e-5, atol=1e-5)
