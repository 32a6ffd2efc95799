"""Phase plans of grow/prune schedules (SPEC 5): validation and where phases switch."""

import pytest

from torchrec_prune.schedules import DENSE, SCHEMES, SPARSE, Phase, PhasePlan, scheme


def _kinds(plan: PhasePlan) -> list[str]:
    return [p.kind for p in plan.phases]


def test_paper_default_alternates_every_fifth_and_starts_and_ends_dense():
    plan = PhasePlan.every(0.2)
    assert _kinds(plan) == [DENSE, SPARSE, DENSE, SPARSE, DENSE]
    assert [x for p in plan.phases for x in (p.start, p.end)] == pytest.approx(
        [0, 0.2, 0.2, 0.4, 0.4, 0.6, 0.6, 0.8, 0.8, 1.0]
    )
    assert plan.starts_dense and plan.ends_dense


@pytest.mark.parametrize("boundaries", [(0.1, 0.5), (0.2, 0.35, 0.5, 0.65), (0.3, 0.7)])
def test_alternate_plans_start_and_end_dense(boundaries):
    plan = PhasePlan.alternate(boundaries)
    assert plan.starts_dense and plan.ends_dense
    assert _kinds(plan)[::2] == [DENSE] * (len(boundaries) // 2 + 1)


def test_baseline_schemes_match_the_paper_and_spend_forty_percent_sparse():
    assert _kinds(scheme("prune_only")) == [DENSE, SPARSE]
    assert _kinds(scheme("grow_only")) == [SPARSE, DENSE]
    assert _kinds(scheme("dsd")) == [DENSE, SPARSE, DENSE]
    assert scheme("dsd").phases[1].start == pytest.approx(0.3)
    for name in SCHEMES:
        assert scheme(name).sparse_fraction == pytest.approx(0.4)


@pytest.mark.parametrize(
    "phases, message",
    [
        ([], "at least one"),
        ([Phase(DENSE, 0.1, 1.0)], "start at 0"),
        ([Phase(DENSE, 0.0, 0.9)], "end at 1"),
        ([Phase(DENSE, 0.0, 0.5), Phase(SPARSE, 0.4, 1.0)], "overlap"),
        ([Phase(DENSE, 0.0, 0.4), Phase(SPARSE, 0.5, 1.0)], "gap"),
        ([Phase(DENSE, 0.0, 0.5), Phase(DENSE, 0.5, 1.0)], "alternate"),
    ],
)
def test_plans_that_do_not_tile_the_stream_are_rejected(phases, message):
    with pytest.raises(ValueError, match=message):
        PhasePlan(tuple(phases))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "half", "start": 0.0, "end": 1.0}, "kind"),
        ({"kind": DENSE, "start": -0.1, "end": 1.0}, "start"),
        ({"kind": DENSE, "start": 0.0, "end": 1.5}, "end"),
        ({"kind": DENSE, "start": 0.5, "end": 0.5}, "end must be > "),
    ],
)
def test_bad_phases_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Phase(**kwargs)


@pytest.mark.parametrize(
    "boundaries, message",
    [
        ((0.2, 0.4, 0.6), "even number"),
        ((0.5,), "at least two"),
        ((0.4, 0.2), "strictly increasing"),
        ((0.0, 0.5), "strictly increasing"),
        ((0.5, 1.0), "strictly increasing"),
    ],
)
def test_alternate_rejects_bad_boundaries(boundaries, message):
    with pytest.raises(ValueError, match=message):
        PhasePlan.alternate(boundaries)


@pytest.mark.parametrize("fraction", [0.25, 0.5, 1.0, 0.0, -0.2, 0.3])
def test_every_needs_an_odd_number_of_equal_phases(fraction):
    with pytest.raises(ValueError, match="odd n >= 3"):
        PhasePlan.every(fraction)


def test_unknown_scheme_is_rejected():
    with pytest.raises(ValueError, match="unknown scheme"):
        scheme("sparse_forever")


def test_sample_bounds_cut_where_batches_start():
    # increments of 1000 rows in batches of 128: batches start at 0, 128, ..., 896, 1000, 1128, ...
    bounds = PhasePlan.every(0.2).sample_bounds(5000, 1000, 128)
    assert [a for a, _ in bounds] == [0, 1000, 2000, 3000, 4000]
    assert bounds[-1][1] == 5000
    odd = PhasePlan.alternate((0.3, 0.7)).sample_bounds(5000, 1000, 128)
    assert odd == [(0, 1512), (1512, 3512), (3512, 5000)]  # 1500 -> nearest batch start 1512
    assert all(a < b for a, b in odd)


def test_sample_bounds_reject_an_empty_phase():
    with pytest.raises(ValueError, match="empty"):
        PhasePlan.alternate((0.01, 0.02)).sample_bounds(1000, 1000, 128)
