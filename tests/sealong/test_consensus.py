"""Answer clusters (sealong/score/consensus.py): the shares the adaptive sampler, the consensus filter and the
round monitoring use."""

from sealong.score.consensus import MIN_CLUSTER, answer_consensus, extract_final_answer, reached


def test_clusters_count_every_sample_and_only_answers():
    outs = ["x. So the answer is Paris.", "the answer is paris", "Answer: Rome", "", "   ", "So the answer is The Paris"]
    c = answer_consensus(outs)
    assert c.n == 6 and c.distinct == 2 and c.top_answer == "paris"
    assert c.top_share == 3 / 6  # the empty outputs count in n, join no cluster


def test_invalid_outputs_join_no_cluster_and_no_answer_is_no_consensus():
    c = answer_consensus(["answer is x", "answer is x", "answer is y"], valid=[True, False, True])
    assert (c.top_share, c.distinct) == (1 / 3, 2)
    assert answer_consensus(["", " "]).top_share == 0.0 and answer_consensus([]).n == 0


def test_stop_rule_needs_both_the_share_and_the_sample_count():
    agree = answer_consensus(["answer is x"] * 6 + ["answer is y"] * 2)
    assert agree.top_share == 0.75
    assert reached(agree, 0.75, 8) and not reached(agree, 0.76, 8) and not reached(agree, 0.75, 9)


def test_stop_rule_needs_a_real_cluster():
    """Two samples with two answers (each a 'cluster' of one, half the samples) never stop, whatever the share;
    two that agree do; the share is of the answered outputs (a sample that says nothing neither agrees nor
    disagrees)."""
    assert MIN_CLUSTER == 2
    split = answer_consensus(["the answer is x", "the answer is y"])
    assert (split.top_share, split.top_size, split.answered) == (0.5, 1, 2)
    assert not reached(split, 0.5, 2) and not reached(split, 0.01, 1)
    assert reached(answer_consensus(["the answer is x", "answer: X"]), 0.5, 2)
    assert not reached(answer_consensus(["the answer is x"]), 0.5, 1)  # one sample agrees with nothing
    quiet = answer_consensus(["the answer is x", "the answer is x", "", "   "])
    assert (quiet.top_size, quiet.answered) == (2, 2) and reached(quiet, 0.75, 4)
    assert not reached(answer_consensus(["the answer is x", "the answer is x", "the answer is y"]), 0.75, 3)
    assert not reached(answer_consensus(["", ""]), 0.5, 2)


def test_extraction_is_the_answer_utilitys():
    assert extract_final_answer("blah\nSo the answer is The Paris.\nextra") == "paris"
    assert extract_final_answer("no marker\n\nlast line here\n") == "last line here"
