"""taciturn.presets: one frozen record per method, aliases that are that record, lookup through
the registries' one naming rule, ``configure`` and the compressor a preset makes."""
from __future__ import annotations

import dataclasses

import pytest

from taciturn import PRESETS, Preset, preset
from taciturn.compressors import BlockSign, Cast, ScaledSign, TopK, make_compressor
from taciturn.compressors.topk import RandK
from taciturn.feedback import make_feedback
from taciturn.names import name_key

# The names DDP and Horovod users know (integrations/ddp.py, README's preset table) and what
# they stand for: (compressor, worker, server, two-way).
ALIASES = {
    "markov_sign": ("cdadam", ("block_sign", "markov", "markov", True)),  # CD-Adam's
    "block_sign": ("dist_ef_block_sign", ("block_sign", "ef", "ef", True)),  # dist-EF-blockSGD's
    "topk": ("sparsams_topk", ("topk", "ef", "none", False)),  # SPARS-AMS's, one-way
}


def spellings(name):
    """Spellings the naming rule must treat as ``name``: case, ``_`` and ``-`` do not count."""
    return {name, name.upper(), name.title(), name.replace("_", "-"), name.replace("_", ""),
            "-" + name.replace("_", "_-").upper() + "_"}


# ----------------------------------------------------------------------------- the table

@pytest.mark.parametrize("alias", ALIASES)
def test_an_alias_is_the_record_itself_not_a_copy(alias):
    target, (compressor, worker, server, two_way) = ALIASES[alias]
    record = preset(alias)
    assert record is preset(target) is PRESETS.get(target)
    assert PRESETS.canonical(alias) == target
    assert (record.compressor, record.worker, record.server, record.two_way) == (compressor, worker, server, two_way)
    # an alias is a second name, not a second entry of the table
    assert alias not in PRESETS.names() and target in PRESETS.names()


def test_every_name_and_alias_resolves_under_any_spelling_of_the_one_rule():
    for name in PRESETS.names() + list(ALIASES):
        record = preset(name)
        for spelling in spellings(name):
            assert name_key(spelling) == name_key(name)
            assert spelling in PRESETS
            assert preset(spelling) is record, spelling
    # what the rule does not drop still counts: a space, a dot
    for wrong in ("cd adam", "cdadam.", "ef sign"):
        assert wrong not in PRESETS
        with pytest.raises(ValueError, match="unknown preset"):
            preset(wrong)
    assert None not in PRESETS and 3 not in PRESETS


def test_unknown_name_lists_every_choice_and_the_closest_record():
    with pytest.raises(ValueError) as err:
        preset("cdadamm")
    msg = str(err.value)
    assert msg.startswith("unknown preset 'cdadamm'; valid names: ")
    listed = msg.split("valid names: ")[1].split(". Did you mean")[0].split(", ")
    assert listed == PRESETS.names()
    assert "Did you mean 'cdadam'?" in msg
    # a misspelt alias points at the record's own name
    with pytest.raises(ValueError, match=r"unknown preset 'markov-sgn'.*Did you mean 'cdadam'\?"):
        preset("markov-sgn")
    with pytest.raises(ValueError) as far:
        preset("qqqqqqqq")
    assert "Did you mean" not in str(far.value)


@pytest.mark.parametrize("name", PRESETS.names())
def test_every_record_builds_its_compressor_and_says_what_it_is(name):
    p = preset(name)
    assert isinstance(p, Preset) and p.description
    codec = p.make_compressor()
    assert codec.name == p.compressor
    assert make_feedback(p.worker).name == p.worker and make_feedback(p.server).name == p.server
    # the description and the fields tell the same story
    text = p.description.lower()
    if "both ways" in text:
        assert p.two_way
    if "one-way" in text:
        assert not p.two_way
    if "markov" in text:
        assert p.worker == p.server == "markov"
    if "error feedback both ways" in text:
        assert p.worker == p.server == "ef"
    if "without feedback" in text or "without scale" in text or p.compressor in ("identity", "bf16"):
        assert p.worker == p.server == "none"
    if "1024" in text or p.compressor == "block_sign":
        assert isinstance(codec, BlockSign) and codec.block_size == 1024
    if "1 %" in text:
        assert isinstance(codec, TopK) and codec.ratio == 0.01 and codec.k is None
    # describe(): the compressor with its options, both rules and the direction
    opts = ", ".join(f"{k}={v}" for k, v in p.options)
    assert p.describe() == (f"{p.compressor}({opts}) worker={p.worker} server={p.server} "
                            f"{'two-way' if p.two_way else 'one-way'}")


def test_records_are_frozen():
    p = preset("cdadam")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.worker = "ef"
    assert hash(p) == hash(preset("markov_sign"))


# ----------------------------------------------------------------------------- configure

def test_configure_without_arguments_is_the_same_preset_and_never_edits_the_table():
    for name in PRESETS.names():
        assert preset(name).configure() == preset(name)
    before = dataclasses.astuple(preset("cdadam"))
    changed = preset("markov_sign").configure("topk", ratio=0.2, worker="ef", server="none", two_way=False)
    assert changed is not preset("cdadam")
    assert dataclasses.astuple(preset("cdadam")) == before
    assert (changed.compressor, changed.worker, changed.server, changed.two_way) == ("topk", "ef", "none", False)
    assert changed.description == preset("cdadam").description


def test_block_size_goes_to_block_sign_only_and_options_win():
    p = preset("cdadam")
    assert p.configure(block_size=64).make_compressor().block_size == 64
    assert p.configure(block_size=64).options == (("block_size", 64),)
    per_tensor = p.configure(block_size=None).make_compressor()
    assert per_tensor.block_size is None and not per_tensor.chunk_aligned
    assert p.configure(block_size=64, options={"block_size": 8}).make_compressor().block_size == 8
    # the optimizers always pass their block_size: a codec without blocks ignores it
    assert preset("ef_sign").configure(block_size=64).options == ()
    assert preset("sparsams_topk").configure(block_size=64).options == (("ratio", 0.01),)
    # another spelling of the same compressor keeps its options, another compressor drops them
    assert p.configure("Block-Sign").options == p.options
    assert p.configure("BLOCK_SIGN", block_size=64).options == (("block_size", 64),)
    assert p.configure("scaled_sign").options == ()
    assert isinstance(p.configure("scaled_sign").make_compressor(), ScaledSign)


def test_ratio_and_k_replace_each_other():
    p = preset("sparsams_topk")
    assert p.configure(ratio=0.05).options == (("ratio", 0.05),)
    by_k = p.configure(k=10)
    assert by_k.options == (("k", 10),)
    assert by_k.make_compressor().k == 10 and by_k.make_compressor().ratio is None
    assert by_k.configure(ratio=0.2).options == (("ratio", 0.2),)
    assert by_k.configure().options == (("k", 10),)
    # a top-k without either keeps 1 %, whatever preset it starts from
    for start in ("cdadam", "identity", "ef_sign"):
        top = preset(start).configure("topk")
        assert top.options == (("ratio", 0.01),) and top.make_compressor().ratio == 0.01
        rand = preset(start).configure("randk")
        assert isinstance(rand.make_compressor(), RandK) and rand.options == (("ratio", 0.01),)
    options = {"mode": "exact"}
    assert p.configure(options=options, k=3).options == (("k", 3), ("mode", "exact"))
    assert options == {"mode": "exact"}, "configure edited the caller's options"


def test_configure_checks_the_options_now_with_the_compressors_message():
    with pytest.raises(ValueError, match="give ratio or k, not both"):
        preset("topk").configure(ratio=0.1, k=3)
    with pytest.raises(ValueError, match=r"ratio=0 must be in \(0, 1\]"):
        preset("cdadam").configure("topk", ratio=0)
    with pytest.raises(ValueError, match=r"compressor 'topk' does not take \['block_size'\]"):
        preset("topk").configure(options={"block_size": 8})
    with pytest.raises(ValueError, match="block_size=0 must be a positive int or None"):
        preset("cdadam").configure(block_size=0)
    with pytest.raises(ValueError, match="unknown compressor 'signn'"):
        preset("cdadam").configure("signn")
    with pytest.raises(ValueError, match="unknown feedback 'ef22'"):
        preset("cdadam").configure(worker="ef22")


def test_feedback_names_and_direction():
    p = preset("identity").configure(worker="EF", server="Markov", two_way=0)
    assert (p.worker, p.server, p.two_way) == ("ef", "markov", False)
    assert p.configure(two_way=None).two_way is False
    assert p.configure(two_way=1).two_way is True
    assert p.configure(worker=make_feedback("none")).worker == "none"
    assert p.describe().endswith("worker=ef server=markov one-way")


def test_a_ready_compressor_replaces_the_options():
    codec = make_compressor("bf16")
    p = preset("cdadam").configure(codec)
    assert p.compressor is codec and p.options == ()
    assert p.make_compressor() is codec
    assert (p.worker, p.server, p.two_way) == ("markov", "markov", True)
    kept = p.configure(server="ef", two_way=False)
    assert kept.compressor is codec and (kept.worker, kept.server, kept.two_way) == ("markov", "ef", False)
    assert repr(codec) in p.describe()
    # a name after a ready compressor: a fresh one of that name
    named = p.configure("identity")
    assert named.compressor == "identity" and isinstance(named.make_compressor(), Cast)


def test_make_compressor_is_fresh_each_time_and_carries_the_options():
    p = preset("cdadam").configure(block_size=256)
    a, b = p.make_compressor(), p.make_compressor()
    assert a is not b and repr(a) == repr(b) == repr(BlockSign(256))
