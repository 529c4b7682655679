"""taciturn.checkpoint.rank_path: the per-rank file names of save_checkpoint and of the
integrations, which checkpoints already on disk hold (a change would orphan them)."""
import os

from taciturn.checkpoint import rank_path


def test_rank_path_template_or_suffix():
    assert rank_path("ckpt/{rank}/state.pt", 3) == "ckpt/3/state.pt"
    assert rank_path("ckpt/state.pt", 3) == "ckpt/state.pt.rank3"


def test_rank_path_name_inside_a_folder_keeps_the_folder_literal():
    # the DeepSpeed integration's and the Trainer's names
    assert rank_path("run/{rank}", 7, "taciturn_rank{rank:05d}.pt") == os.path.join("run/{rank}",
                                                                                     "taciturn_rank00007.pt")
    assert rank_path("out/{x}", 12, "taciturn_rank{rank}.pt") == os.path.join("out/{x}", "taciturn_rank12.pt")
