"""One contract suite over every registered model, plus brute-force checks of each forward."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from recsys.graph import build_graph
from recsys.models import MODELS, BPRBatch, make_model
from recsys.models.afd import afd_loss, dimension_correlation
from recsys.models.ease import ease_weights
from recsys.train import TrainConfig, fit

TRAINED = sorted(n for n, s in MODELS.items() if s.cls.trainable)
CLOSED = sorted(n for n, s in MODELS.items() if not s.cls.trainable)


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(0)
    return _tiny(rng)


def _tiny(rng):
    ui = sp.csr_matrix((rng.random((12, 9)) < 0.35).astype(float))
    up = sp.csr_matrix((rng.random((12, 4)) < 0.4).astype(float))
    ip = sp.csr_matrix((rng.random((9, 4)) < 0.4).astype(float))
    return build_graph(ui), build_graph(ui, up, ip), ui, up, ip


SMALL = {"LightGCN": {"n_layers": 2}, "LGCN": {"n_eigen": 6}}


def _model(name: str, tiny, seed: int = 0):
    spec = MODELS[name]
    graph = tiny[1] if spec.personas else tiny[0]
    if not spec.cls.trainable:
        return make_model(name, graph, seed=seed, device="cpu").solve(tiny[2])
    return make_model(name, graph, dim=8, seed=seed, **SMALL.get(spec.cls.__name__, {}))


def _batch() -> BPRBatch:
    return BPRBatch(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6, 7]))


@pytest.mark.parametrize("name", TRAINED)
def test_contract(name: str, tiny) -> None:
    model = _model(name, tiny)
    loss = model.calculate_loss(_batch())
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert model.embedding.grad is not None and model.embedding.grad.abs().sum() > 0
    scores = model.full_sort_scores(torch.tensor([0, 5]))
    assert scores.shape == (2, 9)
    # seeded: the same seed gives the same loss, another seed a different one
    same = _model(name, tiny).calculate_loss(_batch()).detach()
    other = _model(name, tiny, seed=1).calculate_loss(_batch()).detach()
    assert float(same) == pytest.approx(float(loss.detach()))
    assert float(other) != pytest.approx(float(loss.detach()))


@pytest.mark.parametrize("name", TRAINED)
def test_eval_cache_follows_training(name: str, tiny) -> None:
    model = _model(name, tiny)
    model.eval()
    before = model.full_sort_scores(torch.tensor([0])).clone()
    model.train()
    with torch.no_grad():
        model.embedding.add_(1.0)
    model.eval()
    assert not torch.allclose(before, model.full_sort_scores(torch.tensor([0])))


def test_lightgcn_is_mean_of_propagated_layers(tiny) -> None:
    plain = tiny[0]
    model = make_model("lightgcn", plain, dim=4, n_layers=3)
    a = torch.tensor(plain.norm_adj.toarray(), dtype=torch.float32)
    e = model.embedding.detach()
    expected = (e + a @ e + a @ a @ e + a @ a @ a @ e) / 4
    model.eval()
    torch.testing.assert_close(model.final_embeddings(), expected, rtol=1e-5, atol=1e-6)
    scores = model.full_sort_scores(torch.tensor([2]))
    torch.testing.assert_close(scores[0], expected[2] @ expected[12:].T, rtol=1e-5, atol=1e-6)


def test_lgcn_is_a_low_pass_filter(tiny) -> None:
    personas = tiny[1]
    model = make_model("lgcn3", personas, dim=4, n_eigen=5)
    with torch.no_grad():
        model.kernel.copy_(torch.linspace(0.5, 1.5, 5))
    vals, vecs = np.linalg.eigh(personas.norm_adj.toarray())
    u = vecs[:, np.argsort(-vals)[:5]]
    e = model.embedding.detach().double().numpy()
    theta = np.linspace(0.5, 1.5, 5)
    expected = u @ np.diag(theta) @ u.T @ e  # the projector is sign-invariant, so eigh vs eigsh agree
    model.eval()
    np.testing.assert_allclose(model.final_embeddings().numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(model.eigvals.numpy(), np.sort(vals)[::-1][:5], atol=1e-6)


def test_plain_and_persona_models_need_the_right_graph(tiny) -> None:
    plain, personas = tiny[:2]
    with pytest.raises(ValueError, match="persona nodes"):
        make_model("lgcn3", plain)
    with pytest.raises(ValueError, match="without personas"):
        make_model("lightgcn", personas)
    with pytest.raises(ValueError, match="unknown model"):
        make_model("ngcf", plain)


def test_dimension_correlation_matches_numpy() -> None:
    x = torch.randn(50, 6, dtype=torch.float64)
    x[:, 1] = 2 * x[:, 0] + 0.1 * x[:, 1]
    c = np.corrcoef(x.numpy(), rowvar=False)
    off = c[~np.eye(6, dtype=bool)]
    assert float(dimension_correlation(x)) == pytest.approx(float(np.mean(off ** 2)), rel=1e-6)
    assert float(dimension_correlation(torch.eye(8, dtype=torch.float64))) < 0.05


def test_afd_weights_are_detached_and_proportional() -> None:
    torch.manual_seed(0)
    layers = [torch.randn(10, 4, requires_grad=True) for _ in range(2)]
    users, items = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2])
    loss = afd_loss(layers, users, items, n_users=5)
    rho = [dimension_correlation(e[:4]) + dimension_correlation(e[5:8]) for e in layers]
    w = torch.stack(rho).detach()
    expected = (w / w.sum() * torch.stack(rho)).sum()
    torch.testing.assert_close(loss, expected)
    # gradient as if the weights were constants
    loss.backward()
    g_afd = layers[0].grad.clone()
    layers[0].grad = None
    (w[0] / w.sum() * rho[0]).backward()
    torch.testing.assert_close(layers[0].grad, g_afd)


def test_afd_penalty_reduces_correlation(tiny) -> None:
    """Training on the penalty alone de-correlates the propagated dimensions."""
    plain = tiny[0]
    model = make_model("afd-lightgcn", plain, dim=6, afd_weight=1.0, n_layers=2)
    with torch.no_grad():
        before = sum(float(dimension_correlation(e[:12])) for e in model.layers())
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    users, items = torch.arange(12), torch.arange(9)
    for _ in range(60):
        opt.zero_grad()
        afd_loss(model.layers(), users, items, 12).backward()
        opt.step()
    with torch.no_grad():
        after = sum(float(dimension_correlation(e[:12])) for e in model.layers())
    assert after < 0.5 * before


# -- closed-form (item–item) models ------------------------------------------------------------
def _dense_ease(a: np.ndarray, lam: float) -> np.ndarray:
    """Steck's closed form in float64 numpy: B = I − P diag(1/diag P), P = (AᵀA + λI)⁻¹."""
    p = np.linalg.inv(a.T @ a + lam * np.eye(a.shape[1]))
    return np.eye(a.shape[1]) - p / np.diag(p)[None, :]


@pytest.mark.parametrize("name", CLOSED)
def test_closed_form_contract(name: str, tiny) -> None:
    model = make_model(name, tiny[1] if MODELS[name].personas else tiny[0], device="cpu")
    assert not model.trainable
    with pytest.raises(RuntimeError, match="not solved"):
        model.full_sort_scores(torch.tensor([0]))
    model.solve(tiny[2])
    scores = model.full_sort_scores(torch.tensor([0, 5]))
    assert scores.shape == (2, 9) and torch.isfinite(scores).all()
    # the weights never let an item recommend itself
    assert float(model.weights_.diagonal().abs().max()) == 0.0
    with pytest.raises(ValueError, match="no hyper-parameters"):
        model.configure(dim=3)
    if MODELS[name].personas:
        assert model.cold_user_scores([1, 2]).shape == (9,)
        assert model.cold_item_scores([0]).shape == (12,)
        with pytest.raises(ValueError, match="out of range"):
            model.cold_user_scores([4])
    else:
        with pytest.raises(ValueError, match="without persona nodes"):
            model.cold_user_scores([0])


def test_ease_matches_dense_closed_form(tiny) -> None:
    plain, _, ui, _, _ = tiny
    model = make_model("ease", plain, lam=3.0, device="cpu").solve(ui)
    x = ui.toarray()
    expected = _dense_ease(x, 3.0)
    np.testing.assert_allclose(model.weights_.numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(model.full_sort_scores(torch.arange(12)).numpy(), x @ expected, atol=1e-5)


def test_ease_weights_of_a_larger_random_matrix_match_numpy() -> None:
    x = (np.random.default_rng(3).random((300, 120)) < 0.05).astype(np.float64)
    got = ease_weights(torch.as_tensor(x.T @ x, dtype=torch.float64), 10.0)
    np.testing.assert_allclose(got.numpy(), _dense_ease(x, 10.0), atol=1e-10)
    with pytest.raises(ValueError, match="λ > 0"):
        ease_weights(torch.eye(3), 0.0)


def test_ease_persona_solves_the_augmented_matrix(tiny) -> None:
    """Persona EASE = dense EASE on [[X, a·Φu], [b·Φiᵀ, b·I]], scored from [X | a·Φu]."""
    _, personas, ui, up, ip = tiny
    a, b, lam = 0.5, 2.0, 4.0
    model = make_model("ease-persona", personas, lam=lam, persona_weight=a, pseudo_weight=b, device="cpu").solve(ui)
    history = np.hstack([ui.toarray(), a * up.toarray()])
    design = np.vstack([history, np.hstack([b * ip.toarray().T, b * np.eye(4)])])
    expected = _dense_ease(design, lam)
    np.testing.assert_allclose(model.weights_.numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(model.full_sort_scores(torch.arange(12)).numpy(), history @ expected[:, :9], atol=1e-5)
    np.testing.assert_allclose(model.cold_user_scores([1, 3]).numpy(), a * expected[[9 + 1, 9 + 3], :9].sum(0),
                               atol=1e-5)
    np.testing.assert_allclose(model.cold_item_scores([0, 2]).numpy(), history @ expected[:, [9, 11]].mean(1),
                               atol=1e-5)
    # with b = 0 the pseudo-users are gone: the design matrix is the history alone
    model.configure(pseudo_weight=0.0).solve(ui)
    np.testing.assert_allclose(model.weights_.numpy(), _dense_ease(history, lam), atol=1e-5)


def test_rp3beta_matches_the_random_walk(tiny) -> None:
    plain, _, ui, _, _ = tiny
    alpha, beta = 0.8, 0.4
    model = make_model("rp3beta", plain, alpha=alpha, beta=beta, device="cpu").solve(ui)
    x = ui.toarray()
    du, di = x.sum(1), x.sum(0)
    p_ui = np.divide(x, du[:, None], out=np.zeros_like(x), where=du[:, None] > 0) ** alpha
    p_iu = np.divide(x.T, di[:, None], out=np.zeros_like(x.T), where=di[:, None] > 0) ** alpha
    w = p_iu @ p_ui
    w = w * np.divide(1.0, di ** beta, out=np.zeros_like(di), where=di > 0)[None, :]
    np.fill_diagonal(w, 0.0)
    np.testing.assert_allclose(model.weights_.numpy(), w, atol=1e-6)


def test_selection_keeps_the_best_validation_point(tiny) -> None:
    """`fit` on a closed-form model: the chosen λ scores best on validation among those tried,
    and the model is left solved at it."""
    rng = np.random.default_rng(5)
    x = sp.csr_matrix((rng.random((80, 30)) < 0.2).astype(float))
    valid = sp.csr_matrix((rng.random((80, 30)) < 0.05).astype(float))
    valid = (valid - valid.multiply(x)).tocsr()
    valid.eliminate_zeros()
    graph = build_graph(x)
    model = make_model("ease", graph, device="cpu")
    result = fit(model, x, valid, TrainConfig(valid_k=5))
    tried = {row["lam"]: row["valid_ndcg"] for row in result.history}
    assert set(tried) == set(model.search_space()["lam"])
    assert result.best_valid_ndcg == max(tried.values()) == tried[result.best_params["lam"]]
    assert model.lam == result.best_params["lam"]
    expected = _dense_ease(x.toarray(), model.lam)
    np.testing.assert_allclose(model.weights_.numpy(), expected, atol=1e-5)


def test_ease_update_equals_a_fresh_solve() -> None:
    """Changed and new users' rows through Woodbury give the W of a full re-solve."""
    rng = np.random.default_rng(8)
    x = (rng.random((40, 15)) < 0.25).astype(float)
    up = (rng.random((40, 3)) < 0.4).astype(float)
    ip = (rng.random((15, 3)) < 0.4).astype(float)
    old = make_model("ease-persona", build_graph(sp.csr_matrix(x), sp.csr_matrix(up), sp.csr_matrix(ip)),
                     lam=2.0, device="cpu", dtype=torch.float64).solve(sp.csr_matrix(x))
    grown = np.vstack([x, (rng.random((3, 15)) < 0.3).astype(float)])  # 3 new users
    grown[[1, 7], [2, 4]] = 1.0 - grown[[1, 7], [2, 4]]                  # two users changed
    up2 = np.vstack([up, np.eye(3)])
    graph = build_graph(sp.csr_matrix(grown), sp.csr_matrix(up2), sp.csr_matrix(ip))
    updated = make_model("ease-persona", graph, lam=2.0, device="cpu", dtype=torch.float64)
    updated.solve_from(old, sp.csr_matrix(grown), max_rank=1.0)
    assert updated.weights_ is not old.weights_
    fresh = make_model("ease-persona", graph, lam=2.0, device="cpu", dtype=torch.float64).solve(sp.csr_matrix(grown))
    np.testing.assert_allclose(updated.weights_.numpy(), fresh.weights_.numpy(), atol=1e-9)
    np.testing.assert_allclose(updated.full_sort_scores(torch.arange(43)).numpy(),
                               fresh.full_sort_scores(torch.arange(43)).numpy(), atol=1e-9)
    # nothing changed: the weights are reused as they are; another λ: a full solve
    same = make_model("ease-persona", graph, lam=2.0, device="cpu", dtype=torch.float64)
    assert same.solve_from(updated, sp.csr_matrix(grown)).weights_ is updated.weights_
    other = make_model("ease-persona", graph, lam=3.0, device="cpu", dtype=torch.float64)
    other.solve_from(updated, sp.csr_matrix(grown))
    np.testing.assert_allclose(other.weights_.numpy(), _dense_ease(
        np.vstack([np.hstack([grown, up2]), np.hstack([ip.T, np.eye(3)])]), 3.0), atol=1e-9)
