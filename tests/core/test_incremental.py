"""The stream's push arithmetic against the exact batch affinity (core.affinity)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.affinity import exact_affinity, prototype_matrix
from core.graph import BipartiteGraph
from core.incremental import (
    ItemState,
    LocalNetwork,
    Membership,
    UserState,
    item_upsert,
    label_vector,
    must_push,
    persona_change,
    psi_raw,
    rank_personas,
    threshold,
    user_apply_value,
    user_purchase,
)

M = 4


def _drive(events, eps, rng=None, dup=0.0, interleave=3, seed=0):
    """Run (kind, user, item/personas) events through a LocalNetwork, partly delivering between."""
    net = LocalNetwork(M, eps)
    step = np.random.default_rng(seed)
    for kind, user, arg in events:
        if kind == "buy":
            net.purchase(user, arg)
        else:
            net.label(user, arg)
        if interleave:
            net.deliver(rng, dup, limit=int(step.integers(0, interleave + 1)))
    net.deliver(rng, dup)
    return net


def _exact(events):
    """Ψ_raw on the final graph and final labels, by the batch code."""
    pairs = [(u, i) for k, u, i in events if k == "buy"]
    users = sorted({u for u, _ in pairs})
    items = sorted({i for _, i in pairs})
    uix = {u: n for n, u in enumerate(users)}
    iix = {i: n for n, i in enumerate(items)}
    graph = BipartiteGraph.from_indices(
        np.array([uix[u] for u, _ in pairs]), np.array([iix[i] for _, i in pairs]), len(users), len(items)
    )
    labels = {uix[u]: list(p) for k, u, p in events if k == "label" and u in uix}  # last wins
    phi = prototype_matrix(len(users), labels, M)
    return users, graph, exact_affinity(graph, phi, hops=1)


def _random_events(rng, n_users=30, n_items=20, n_buys=300, n_labels=15):
    events = []
    for _ in range(n_buys):
        events.append(("buy", f"u{rng.integers(n_users)}", f"i{int(rng.zipf(1.6)) % n_items}"))
    for _ in range(n_labels):  # labels land between purchases, some users relabeled
        pos = int(rng.integers(len(events) + 1))
        personas = tuple(int(p) for p in rng.choice(M, size=int(rng.integers(1, 3)), replace=False))
        events.insert(pos, ("label", f"u{rng.integers(n_users)}", personas))
    return events


def _relative_errors(approx: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """‖Ψ̂_raw[u] − Ψ_raw[u]‖₁ / ‖Ψ_raw[u]‖₁ per user (0 where both rows are zero)."""
    err = np.abs(approx - exact).sum(axis=1)
    mass = exact.sum(axis=1)
    return np.where(mass > 0, err / np.where(mass > 0, mass, 1.0), np.where(err > 0, np.inf, 0.0))


def _distribution_errors(approx: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """L1 distance between each user's normalised streamed and exact persona distributions."""
    def norm(x):
        s = x.sum(axis=1, keepdims=True)
        return np.divide(x, s, out=np.zeros_like(x), where=s > 0)

    return np.abs(norm(approx) - norm(exact)).sum(axis=1)


def _check(net, events, eps):
    """The restated bound: ‖Ψ̂_raw[u] − Ψ_raw[u]‖₁ ≤ (ε/2)‖Ψ_raw[u]‖₁ for every user, so the
    normalised distributions are within ε, and (‖Ψ_raw‖₁ ≤ 1) every entry within ε/2."""
    users, graph, exact = _exact(events)
    approx = net.psi_raw(users)
    theta = threshold(eps)
    assert np.max(_relative_errors(approx, exact)) <= theta + 1e-9
    assert np.max(_distribution_errors(approx, exact)) <= eps + 1e-9
    assert np.max(np.abs(approx - exact)) <= theta + 1e-12
    assert all(item.relative_residual <= theta + 1e-9 for item in net.items.values())
    assert [net.users[u].degree for u in users] == graph.user_degree.tolist()
    assert all(it.seq >= 0 for u in users for it in net.users[u].items.values())
    return exact, approx


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("eps", [0.02, 0.2])
def test_fifo_stream_matches_exact_within_theta(seed, eps):
    rng = np.random.default_rng(seed)
    events = _random_events(rng)
    net = _drive(events, eps, seed=seed)
    _check(net, events, eps)


@pytest.mark.parametrize("seed", range(4))
def test_any_order_with_duplicates_matches_exact(seed):
    """Messages shuffled across users/items and ~30% delivered twice: same guarantee."""
    rng = np.random.default_rng(100 + seed)
    events = _random_events(rng)
    net = _drive(events, 0.1, rng=np.random.default_rng(seed), dup=0.3, seed=seed)
    _check(net, events, 0.1)


def test_pushes_make_the_error_vanish_at_tiny_eps():
    rng = np.random.default_rng(7)
    events = _random_events(rng)
    net = _drive(events, 1e-9)
    users, _, exact = _exact(events)
    np.testing.assert_allclose(net.psi_raw(users), exact, atol=1e-9)


def test_coarse_eps_sends_fewer_messages_but_keeps_bound():
    events = _random_events(np.random.default_rng(3), n_buys=600)
    fine, coarse = _drive(events, 0.01), _drive(events, 0.4)
    assert coarse.messages < fine.messages
    _, approx_c = _check(coarse, events, 0.4)
    exact, approx_f = _check(fine, events, 0.01)
    assert np.abs(approx_f - exact).max() <= np.abs(approx_c - exact).max() + 1e-12


def test_hand_worked_example():
    """u0 (prototype, persona 0) and u1 buy item a; u1 also buys b, bought by nobody labeled.

    M[a] = L[u0]/2 = (0.5, 0, ..), M[b] = 0 → Ψ_raw[u1] = (M[a] + M[b]) / 2 = (0.25, 0, ..),
    Ψ_raw[u0] = M[a] = (0.5, 0, ..).
    """
    net = LocalNetwork(M, eps=1e-6)
    net.label("u0", [0])
    for u, i in [("u0", "a"), ("u1", "a"), ("u1", "b"), ("u1", "a")]:
        net.purchase(u, i)
    net.deliver()
    np.testing.assert_allclose(net.psi_raw(["u0", "u1"])[:, 0], [0.5, 0.25])
    assert net.users["u1"].items["a"].count == 2  # repeat counted, not an edge
    assert net.users["u1"].degree == 2 and net.items["a"].degree == 2


def test_repeat_purchase_is_not_a_new_edge():
    state = UserState(M)
    assert user_purchase(state, "a") is True
    assert user_purchase(state, "a") is False
    assert state.items["a"].count == 2 and state.events == 2


def test_value_application_is_idempotent_and_ignores_stale():
    state = UserState(M)
    user_purchase(state, "a")
    v1, v2 = np.array([0.5, 0, 0, 0]), np.array([0.2, 0.3, 0, 0])
    assert user_apply_value(state, "a", 1, v1)
    assert not user_apply_value(state, "a", 1, v1)  # duplicate
    assert user_apply_value(state, "a", 3, v2)
    assert not user_apply_value(state, "a", 2, v1)  # overtaken by seq 3
    np.testing.assert_allclose(psi_raw(state), v2)
    assert not user_apply_value(state, "zz", 1, v1)  # never bought: ignored


def test_item_upsert_duplicate_and_stale_label_change_nothing():
    item = ItemState(M)
    lab = label_vector([1], M)
    out = item_upsert(item, "a", Membership("u", "a", 1, lab), theta=0.1)
    assert out.told.users == ("u",) and out.pushed and item.seq == 1  # 0 → 1 in persona 1 crosses θ
    s_before = item.s.copy()
    again = item_upsert(item, "a", Membership("u", "a", 1, lab), 0.1)
    assert again.told.users == ("u",) and not again.pushed
    assert item_upsert(item, "a", Membership("u", "a", 0, None), 0.1).told.seq == 1
    np.testing.assert_array_equal(item.s, s_before)
    assert item.degree == 1


def test_item_pushes_only_over_relative_threshold():
    """Push iff ‖M − M̃‖₁ > θ‖M‖₁ (θ = 0.6 here)."""
    item = ItemState(M)
    lab = label_vector([0], M)
    item_upsert(item, "a", Membership("p", "a", 1, lab), theta=0.6)  # M = 1, M̃ = 0 → push
    assert item.seq == 1
    out = item_upsert(item, "a", Membership("x", "a", 0, None), 0.6)  # M = 1/2: 1/2 > 0.3 → push
    assert item.seq == 2 and out.pushed and set(out.told.users) == {"p", "x"}
    out = item_upsert(item, "a", Membership("y", "a", 0, None), 0.6)  # M = 1/3: 1/6 ≤ 0.2 → keep
    assert item.seq == 2 and not out.pushed and out.told.users == ("y",)
    assert item.residual == pytest.approx(0.5 - 1 / 3)
    assert item.relative_residual == pytest.approx(0.5)
    out = item_upsert(item, "a", Membership("z", "a", 0, None), 0.6)  # M = 1/4: 1/4 > 0.15 → push
    assert item.seq == 3 and out.pushed and len(out.told.users) == 4 and item.residual == 0


def test_push_rule_is_scale_free():
    """The same buyers with labels 1000× smaller (a sparse shop's mass) push at the same moments."""
    def pushes(scale: float) -> list[int]:
        item = ItemState(M)
        seqs = []
        for n in range(30):
            label = label_vector([n % M], M) * scale if n % 7 == 0 else None
            item_upsert(item, "a", Membership(f"u{n}", "a", 1, label), theta=0.123)
            seqs.append(item.seq)
        return seqs

    assert pushes(1.0) == pushes(1e-3)
    assert not must_push(np.zeros(M), np.zeros(M), 0.1)
    assert must_push(np.zeros(M), np.full(M, 1e-12), 0.1)  # stale mass on an emptied item


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 6), st.integers(0, 5)), min_size=1, max_size=40),
    st.dictionaries(st.integers(0, 6), st.lists(st.integers(0, M - 1), min_size=1, max_size=3), max_size=4),
    st.floats(0.01, 0.5),
    st.integers(0, 2**16),
)
def test_property_bound_holds_for_any_graph_and_order(pairs, labels, eps, seed):
    events = [("buy", f"u{u}", f"i{i}") for u, i in pairs]
    rng = np.random.default_rng(seed)
    for u, personas in labels.items():
        events.insert(int(rng.integers(len(events) + 1)), ("label", f"u{u}", tuple(personas)))
    net = _drive(events, eps, rng=np.random.default_rng(seed), dup=0.2, seed=seed)
    _check(net, events, eps)


def _max_relative_error(pairs, labels, eps, seed, theta=None) -> float:
    """Largest ‖Ψ̂_raw[u] − Ψ_raw[u]‖₁ / ‖Ψ_raw[u]‖₁ of a run whose items push at `theta`."""
    events = [("buy", f"u{u}", f"i{i}") for u, i in pairs]
    rng = np.random.default_rng(seed)
    for u, personas in labels.items():
        events.insert(int(rng.integers(len(events) + 1)), ("label", f"u{u}", tuple(personas)))
    net = LocalNetwork(M, eps)
    if theta is not None:
        net.theta = theta
    for kind, user, arg in events:
        net.purchase(user, arg) if kind == "buy" else net.label(user, arg)
        net.deliver(limit=int(rng.integers(0, 3)))
    net.deliver()
    users, _, exact = _exact(events)
    return float(np.max(_relative_errors(net.psi_raw(users), exact)))


_GRAPHS = st.tuples(
    st.lists(st.tuples(st.integers(0, 6), st.integers(0, 3)), min_size=1, max_size=60),
    st.dictionaries(st.integers(0, 6), st.lists(st.integers(0, M - 1), min_size=1, max_size=3),
                    min_size=1, max_size=3),
    st.integers(0, 2**16),
)


@settings(max_examples=60, deadline=None)
@given(_GRAPHS, st.floats(0.05, 0.5))
def test_property_relative_bound_holds(graph, eps):
    pairs, labels, seed = graph
    assert _max_relative_error(pairs, labels, eps, seed) <= threshold(eps) + 1e-9


def test_property_doubled_threshold_breaks_the_bound():
    """The bound is tight: items pushing at 2θ leave some user more than θ off, so the property
    tests above would fail if the threshold were doubled. The witness is the graph hypothesis'
    `find` returned over `_GRAPHS` (seed 0); fixed here so the test cannot depend on a search's luck."""
    eps = 0.2
    theta = threshold(eps)
    pairs = [(0, 0), (0, 0), (0, 0), (1, 0), (2, 0), (3, 0)]
    labels = {0: [3], 3: [3], 1: [3]}
    assert _max_relative_error(pairs, labels, eps, 0) <= theta + 1e-9
    assert _max_relative_error(pairs, labels, eps, 0, theta=2 * theta) > theta + 1e-9


def test_rank_personas_applies_debias_and_drops_zeros():
    snap = rank_personas(np.array([0.4, 0.0, 0.3, 0.1]), np.array([0.5, 1.0, 1.0, 1.0]), k=3)
    assert snap.personas == (2, 0, 3)
    assert snap.scores == pytest.approx((0.3, 0.2, 0.1))
    assert rank_personas(np.zeros(M), None, 2).personas == ()


def test_rank_personas_falls_back_to_the_prior_like_batch_assignment():
    from core.gplr import assign_personas

    prior = np.array([0.1, 0.5, 0.0, 0.4])
    unreached = rank_personas(np.zeros(4), np.ones(4), k=2, prior=prior)
    assert unreached.personas == (1, 3)
    batch = assign_personas(np.zeros((1, 4)), k=2, prior=prior)
    assert unreached.personas == batch.personas_of(0)
    reached = rank_personas(np.array([0.0, 0.0, 0.2, 0.0]), None, k=2, prior=prior)
    assert reached.personas == (2,)  # a real affinity wins over the prior


def test_persona_change_hysteresis():
    first = rank_personas(np.array([0.5, 0.2, 0, 0]), None, 2)
    assert persona_change({}, first, 0.05)
    published = dict(zip(first.personas, first.scores))
    wobble = rank_personas(np.array([0.52, 0.19, 0.0, 0.0]), None, 2)
    assert not persona_change(published, wobble, 0.05)
    swap = rank_personas(np.array([0.5, 0.2, 0.3, 0]), None, 2)  # persona 2 enters by 0.3
    assert persona_change(published, swap, 0.05)
    assert not persona_change({}, rank_personas(np.zeros(M), None, 2), 0.05)


def test_persona_change_is_scale_free_and_publishes_set_changes():
    """The margin is a share of the user's total score: the same shares 1000× smaller decide alike;
    a new persona set is always published, however small the move."""
    for scale in (1.0, 1e-3):
        first = rank_personas(np.array([0.5, 0.3, 0.2, 0.0]) * scale, None, 2)
        assert first.scale == pytest.approx(scale)
        published = dict(zip(first.personas, first.scores))
        small = rank_personas(np.array([0.51, 0.29, 0.2, 0.0]) * scale, None, 2)  # shares move 0.01
        assert not persona_change(published, small, 0.02)
        big = rank_personas(np.array([0.55, 0.25, 0.2, 0.0]) * scale, None, 2)  # shares move 0.05
        assert persona_change(published, big, 0.02)
        flip = rank_personas(np.array([0.5, 0.249, 0.251, 0.0]) * scale, None, 2)  # set {0, 2}
        assert persona_change(published, flip, 0.5)


def test_user_text_sum_is_incremental_and_recomputed_per_model_version():
    """Σ s(v) over distinct items: new edges add only their own vector; a new version recomputes."""
    from core.incremental import user_text_sum

    calls: list[list[str]] = []

    def vectors(scale):
        def add(text, names):  # the state: a running sum of per-name vectors
            calls.append(list(names))
            rows = np.array([[len(n) * scale, 1.0] for n in names]).reshape(-1, 2)
            return (0.0 if text is None else text) + rows.sum(axis=0)
        return add

    state = UserState(M)
    np.testing.assert_array_equal(user_text_sum(state, vectors(1.0), 1), [0.0, 0.0])
    for item in ("ab", "cde", "ab"):
        user_purchase(state, item, name=item)
    np.testing.assert_array_equal(user_text_sum(state, vectors(1.0), 1), [5.0, 2.0])
    user_purchase(state, "f", name="f")
    calls.clear()
    np.testing.assert_array_equal(user_text_sum(state, vectors(1.0), 1), [6.0, 3.0])
    assert calls == [["f"]]  # only the new item was scored
    calls.clear()
    np.testing.assert_array_equal(user_text_sum(state, vectors(10.0), 2), [60.0, 3.0])
    assert calls == [["ab", "cde", "f"]]  # a new model version: one full recomputation
