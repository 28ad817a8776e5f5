"""The stream's push arithmetic (ℓ̂ = 1) as plain state and pure-ish functions, without Kafka.

Design: /work/shared/design/incremental-affinity.md. With P[u,v] = 1/d_u, P'[v,u] = 1/d_v and
L[w] the row-normalised prototype label (‖L[w]‖₁ = 1),

    Ψ_raw[u] = (1/d_u) Σ_{v∈N(u)} M[v],   M[v] = S[v] / d_v,   S[v] = Σ_{w∈N(v)} L[w].

Item v keeps S[v], its buyers and M̃[v] (the value its buyers were last told); user u keeps
T[u] = Σ_v M̃[v] so Ψ̂_raw[u] = T[u] / d_u.

The guarantee is relative (scale-free): item v pushes when ‖M[v] − M̃[v]‖₁ > θ·‖M[v]‖₁ with
θ = ε/2 (`threshold`). Since M ≥ 0, ‖Σ_v M[v]‖₁ = Σ_v ‖M[v]‖₁, so for every user

    ‖Ψ̂_raw[u] − Ψ_raw[u]‖₁ ≤ (1/d_u) Σ_v ‖M[v] − M̃[v]‖₁ ≤ (θ/d_u) Σ_v ‖M[v]‖₁ = (ε/2)·‖Ψ_raw[u]‖₁,

and the user's persona distribution Q_u = Ψ_raw[u] / ‖Ψ_raw[u]‖₁ is within ε in L1
(‖a/|a| − b/|b|‖₁ ≤ 2‖a − b‖₁/|a|). After de-bias (Ψ = c ⊙ Ψ_raw, 0 < c_m ≤ 1) the absolute
error is still ≤ (ε/2)‖Ψ_raw[u]‖₁ ≤ ε/2 (‖Ψ_raw[u]‖₁ ≤ 1), and the de-biased distribution is
within ε / min_m c_m. None of this depends on degrees, density or the number of personas: a
sparse catalogue whose scores are 100× smaller gets the same relative accuracy, at the same
cost — a new buyer moves M[v] by ‖M[v]‖₁/(d_v+1) (unlabeled) so about θ·d_v buyers pass
between two pushes of d_v messages: O(1/θ) amortised per purchase.

Why absolute values instead of the note's deltas: the stream is at-least-once, so any message
may arrive twice or be re-sent after a crash. Every message here is therefore *idempotent and
order-free*:

* user → item `Membership(user, item, version, label)` is an upsert: the item stores each
  buyer's label with its version and keeps the newest (a duplicate or an older one is a no-op);
* item → user `ItemValue(item, seq, value)` carries the absolute M̃[v] with the item's push
  sequence number; the user stores, per item, the value it counted and its seq, and applies
  T += value − stored only when the seq is newer. The reply to a new buyer and a push are the
  same message, so a push that overtakes a reply, a duplicate, or a lost-then-resent value all
  converge to the same T.

Only purchase counts are not idempotent; the stream guards them with bounded per-user state
(`core.stream_protocol`: offsets, and the last event ids).
The de-bias c_m is applied at ranking time (`rank_personas`), never to pushed state; the
hysteresis (`persona_change`) compares score moves relative to the user's total score, so it too
is scale-free.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

__all__ = [
    "Membership",
    "ItemValue",
    "UserItem",
    "UserState",
    "ItemState",
    "PersonaSnapshot",
    "with_prior",
    "threshold",
    "must_push",
    "told_value",
    "TOLD_F32_MIN_THETA",
    "label_vector",
    "user_purchase",
    "user_history",
    "user_membership",
    "user_set_label",
    "user_apply_value",
    "Upsert",
    "item_upsert",
    "item_value",
    "psi_raw",
    "user_text_sum",
    "rank_personas",
    "top_personas",
    "persona_change",
    "decide",
    "LocalNetwork",
]

logger = logging.getLogger(__name__)


def threshold(eps: float, hops: int = 1) -> float:
    """Relative per-hop residual threshold θ = ε / (2ℓ̂): an item pushes when
    ‖M − M̃‖₁ > θ‖M‖₁ (the paper's ε/(2ℓ̂) rule, stated relative to the item's own mass)."""
    if not 0 < eps:
        raise ValueError("eps must be positive")
    return eps / (2 * hops)


def must_push(exact: np.ndarray, told: np.ndarray, theta: float) -> bool:
    """The relative push rule ‖exact − told‖₁ > θ‖exact‖₁ (an item with M = M̃ = 0 never pushes)."""
    return float(np.abs(exact - told).sum()) > theta * float(np.abs(exact).sum())


#: Above this θ an item tells M rounded to float32 (`told_value`); at or below it, exactly.
TOLD_F32_MIN_THETA = 1e-6


def told_value(exact: np.ndarray, theta: float) -> np.ndarray:
    """M̃ as an item tells it: M rounded to float32 (as float64), unless θ ≤ `TOLD_F32_MIN_THETA`.

    Why: every buyer's row keeps the m values it was told, re-written on each change; float32
    values take half the bytes there (`core.row_codec`), and a buyer stores exactly what it was
    told, so T[u] stays the sum of its stored values. The guarantee is unchanged: the push rule
    measures the real residual ‖M − M̃‖₁, rounding included, and the rounding (≤ 2⁻²⁴‖M‖₁ ≈
    6·10⁻⁸‖M‖₁) is far inside θ‖M‖₁ for θ > 10⁻⁶, so it never triggers a push by itself. A finer θ
    (tests that want M̃ = M) keeps float64."""
    exact = np.asarray(exact, dtype=np.float64)
    if theta <= TOLD_F32_MIN_THETA:
        return exact.copy()
    out: np.ndarray = exact.astype(np.float32).astype(np.float64)
    return out


def label_vector(personas: Sequence[int], n_personas: int) -> np.ndarray:
    """Row-normalised prototype label L[u]: unit mass split evenly over `personas` (as the batch
    code's L), so labeler scores never change propagation."""
    vec = np.zeros(n_personas, dtype=np.float64)
    idx = [int(p) for p in personas if 0 <= int(p) < n_personas]
    if not idx:
        return vec
    vec[idx] = 1.0
    out: np.ndarray = vec / vec.sum()
    return out


# -- messages ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Membership:
    """u is a buyer of v with label version `version` (label None = not a prototype)."""

    user: str
    item: str
    version: int
    label: np.ndarray | None


@dataclass(frozen=True, slots=True)
class ItemValue:
    """M̃[item] after push number `seq`, addressed to `users`."""

    item: str
    seq: int
    value: np.ndarray
    users: tuple[str, ...]


# -- state ------------------------------------------------------------------------------
def _unset() -> np.ndarray:
    """Default of an always-set vector field: `__post_init__` replaces it with zeros of the right length."""
    return np.empty(0, dtype=np.float64)


@dataclass(slots=True)
class UserItem:
    """One item of a user: purchase events, and the M̃ it counted (seq −1 = reply pending)."""

    count: int = 0
    seq: int = -1
    value: np.ndarray | None = None
    quantity: int = 0
    name: str = ""


@dataclass(slots=True)
class UserState:
    """User side: N(u) with counts, label L[u] (+version), T[u] and what was last published."""

    n_personas: int
    items: dict[str, UserItem] = field(default_factory=dict)
    label: np.ndarray | None = None
    label_personas: tuple[int, ...] = ()
    label_version: int = 0
    total: np.ndarray = field(default_factory=_unset)  # T[u] (zeros when not given)
    events: int = 0
    applied_offset: int = -1  # highest source offset whose effect is in this state
    published: dict[int, float] = field(default_factory=dict)  # persona -> score last published
    requested: bool = False  # a label request was sent
    recent_ids: list[int] = field(default_factory=list)  # hashes of the last event ids (core.stream_protocol)
    publishes: int = 0  # propagated persona updates published for this user
    quiet: int = 0  # Ψ̂ changes since the last one (how long thresholds kept it unpublished)
    text: np.ndarray | None = None  # text state of the first `text_items` items (core.item_channel)
    text_items: int = 0
    text_version: int = -1  # persona-model version the sum was computed with
    confirmed: int = field(default=0, init=False)  # edges whose item has answered (derived)

    def __post_init__(self) -> None:
        if self.total.size == 0:
            self.total = np.zeros(self.n_personas, dtype=np.float64)
        self.confirmed = sum(1 for it in self.items.values() if it.seq >= 0)

    @property
    def degree(self) -> int:
        """d_u counted on confirmed edges (those whose item has answered); O(1), kept by
        `user_apply_value` (a heavy buyer's Ψ̂ is read on every push)."""
        return self.confirmed


@dataclass(slots=True)
class ItemState:
    """Item side: buyers with their label (version, vector), S[v], told value M̃[v], push seq."""

    n_personas: int
    buyers: dict[str, tuple[int, np.ndarray | None]] = field(default_factory=dict)
    s: np.ndarray = field(default_factory=_unset)  # zeros when not given
    told: np.ndarray = field(default_factory=_unset)  # zeros when not given
    seq: int = 0
    applied_offset: int = -1

    def __post_init__(self) -> None:
        if self.s.size == 0:
            self.s = np.zeros(self.n_personas, dtype=np.float64)
        if self.told.size == 0:
            self.told = np.zeros(self.n_personas, dtype=np.float64)

    @property
    def degree(self) -> int:
        return len(self.buyers)

    @property
    def exact(self) -> np.ndarray:
        """M[v] = S[v] / d_v."""
        out: np.ndarray = self.s / max(self.degree, 1)
        return out

    @property
    def residual(self) -> float:
        """‖M[v] − M̃[v]‖₁, the error mass this item lends each of its buyers."""
        return float(np.abs(self.exact - self.told).sum()) if self.degree else 0.0

    @property
    def relative_residual(self) -> float:
        """‖M[v] − M̃[v]‖₁ / ‖M[v]‖₁ (0 when both are 0, inf when only M̃ has mass)."""
        mass = float(self.exact.sum()) if self.degree else 0.0
        res = self.residual
        return res / mass if mass > 0 else (0.0 if res == 0 else float("inf"))


# -- user side --------------------------------------------------------------------------
def user_purchase(state: UserState, item: str, quantity: int = 1, name: str = "") -> bool:
    """Count one (de-duplicated) purchase event; True when it is a new edge (u, item)."""
    state.events += 1
    entry = state.items.get(item)
    if entry is not None:
        entry.count += 1
        entry.quantity += quantity
        return False
    state.items[item] = UserItem(count=1, quantity=quantity, name=name or item)
    return True


def user_history(state: UserState) -> list[tuple[str, int]]:
    """(item name, quantity) most bought first: what a labeler may see."""
    rows = sorted(state.items.values(), key=lambda it: -it.quantity)
    return [(it.name, it.quantity) for it in rows]


def user_membership(state: UserState, user: str, item: str) -> Membership:
    """The upsert telling `item` about this buyer and its current label."""
    return Membership(user, item, state.label_version, state.label)


def user_set_label(state: UserState, user: str, label: np.ndarray) -> list[Membership]:
    """u becomes a prototype (or is relabeled): new version, one upsert per item it bought."""
    state.label = np.asarray(label, dtype=np.float64)
    state.label_version += 1
    return [user_membership(state, user, item) for item in state.items]


def user_apply_value(state: UserState, item: str, seq: int, value: np.ndarray) -> bool:
    """Apply M̃[item] with sequence `seq`; False (no change) for stale/duplicate/unknown items."""
    entry = state.items.get(item)
    if entry is None:
        logger.warning("value for item %s the user never bought; ignored", item)
        return False
    if seq <= entry.seq:
        return False
    value = np.asarray(value, dtype=np.float64)
    if entry.value is not None:
        state.total += value - entry.value
    else:
        state.total += value
    if entry.seq < 0:
        state.confirmed += 1
    entry.seq, entry.value = seq, value
    return True


def user_text_sum(state: UserState, add: Callable[[np.ndarray | None, list[str]], np.ndarray], version: int
                  ) -> np.ndarray:
    """The user's text state over its distinct items, for persona-model `version`.

    `add(text, names)` returns the state after the new items `names` (None: no state yet;
    `core.item_channel.ItemChannel.add_text`): items are never removed and `items` keeps
    insertion order, so a new edge adds only its own item; a new model version recomputes the
    state once, from the user's item names (O(d_u))."""
    if state.text is None or state.text_version != version:
        state.text, state.text_items, state.text_version = None, 0, version
    names = [it.name for it in list(state.items.values())[state.text_items:]]
    if names or state.text is None:
        state.text = np.asarray(add(state.text, names), dtype=np.float64)
        state.text_items = len(state.items)
    return state.text


def psi_raw(state: UserState) -> np.ndarray:
    """Ψ̂_raw[u] = T[u] / d_u (zeros for a user with no confirmed edge)."""
    d = state.degree
    if not d:
        return np.zeros(state.n_personas)
    out: np.ndarray = state.total / d
    return out


# -- item side --------------------------------------------------------------------------
def item_value(state: ItemState, item: str, users: Iterable[str]) -> ItemValue:
    """The current told value addressed to `users`."""
    return ItemValue(item, state.seq, state.told.copy(), tuple(users))


class Upsert(NamedTuple):
    """What a buyer upsert did at the item: the value to send (None: nothing), and whether the
    item pushed (then `told` is addressed to every buyer)."""

    told: ItemValue | None
    pushed: bool


def item_upsert(state: ItemState, item: str, msg: Membership, theta: float) -> Upsert:
    """Apply a buyer upsert at the item; return the value to send (reply or push) and whether it pushed.

    New buyer: d_v += 1, S += L. Newer label: S += L_new − L_old. If ‖M − M̃‖₁ > θ‖M‖₁ afterwards,
    M̃ := M (`told_value`), seq += 1 and every buyer (the new one included) is told; else only a new buyer is
    told the shared M̃. A duplicate or stale upsert changes nothing and re-tells its sender, which
    the sender ignores unless its earlier reply was lost.
    """
    old = state.buyers.get(msg.user)
    is_new = old is None
    if old is not None and msg.version <= old[0]:
        return Upsert(item_value(state, item, (msg.user,)), False)
    if old is not None and old[1] is not None:
        state.s -= old[1]
    if msg.label is not None:
        state.s += msg.label
    state.buyers[msg.user] = (msg.version, None if msg.label is None else np.asarray(msg.label, dtype=np.float64))
    if state.degree and must_push(state.exact, state.told, theta):
        state.told = told_value(state.exact, theta)
        state.seq += 1
        return Upsert(item_value(state, item, state.buyers), True)
    return Upsert(item_value(state, item, (msg.user,)) if is_new else None, False)


# -- ranking ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PersonaSnapshot:
    """Top personas (best first) with their scores; `scale` is what a score is measured against
    (the user's total de-biased score, so score/scale is a share in [0, 1]; 1 for scores that
    already are probabilities)."""

    personas: tuple[int, ...]
    scores: tuple[float, ...]
    scale: float = 1.0


def with_prior(scores: np.ndarray, prior: np.ndarray | None, empty: np.ndarray) -> np.ndarray:
    """`scores` with the rows marked `empty` (no evidence at all) replaced by `prior`.

    The one no-evidence fallback: batch (`core.gplr.assign_personas`), the decoder and the stream
    (`rank_personas`).
    """
    scores = np.asarray(scores, dtype=np.float64)
    empty = np.asarray(empty, dtype=bool)
    if prior is None or not empty.any():
        return scores
    out = scores.copy()
    out[empty] = np.asarray(prior, dtype=np.float64).ravel()
    return out


def top_personas(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of `scores` (users × personas): the k highest personas, ties broken by persona
    index, and their scores. The ranking of `rank_personas`, for many rows at once."""
    ranked = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return ranked, np.take_along_axis(scores, ranked, axis=1)


def rank_personas(psi: np.ndarray, debias: np.ndarray | None, k: int,
                  prior: np.ndarray | None = None) -> PersonaSnapshot:
    """Top-k of Ψ = Ψ_raw · c (only positive scores; ties broken by persona index).

    A user no prototype reaches yet (no positive score) gets the top of `prior` instead, e.g. Q̂,
    the label distribution: the same fallback as batch `core.gplr.assign_personas(prior=...)`.
    The snapshot's scale is the sum of all positive scores (the user's distribution's normaliser).
    """
    scores = np.asarray(psi, dtype=np.float64)
    if debias is not None:
        scores = scores * debias
    scores = with_prior(scores[None, :], prior, np.array([not np.any(scores > 0)]))[0]
    ranked, _ = top_personas(scores[None, :], k)
    order = [int(m) for m in ranked[0] if scores[m] > 0]
    scale = float(scores[scores > 0].sum())
    return PersonaSnapshot(tuple(order), tuple(float(scores[m]) for m in order), scale or 1.0)


def persona_change(
    published: Mapping[int, float], snapshot: PersonaSnapshot, hysteresis: float
) -> bool:
    """Should the snapshot be published, given the scores last published?

    Yes on the first non-empty snapshot, whenever the persona *set* changes, and when some
    persona's score moved by more than `hysteresis` × `snapshot.scale` — a move of the user's
    share, so one margin serves shops whose raw scores differ by orders of magnitude. Small
    wobbles of the propagated scores then do not flood persona-updates.
    """
    if not snapshot.personas:
        return False
    if not published:
        return True
    new = dict(zip(snapshot.personas, snapshot.scores))
    if set(new) != set(published):
        return True
    margin = hysteresis * snapshot.scale
    return any(abs(new[m] - published[m]) > margin for m in new)


def decide(state: UserState, snapshot: PersonaSnapshot, hysteresis: float) -> bool:
    """Publish `snapshot` for this (unlabeled) user? Applies `persona_change`, records what was
    published, and counts publications and silent Ψ̂ changes (`publishes`, `quiet`: how long the
    thresholds kept the user unpublished). The worker and `LocalNetwork` both decide here."""
    publish = persona_change(state.published, snapshot, hysteresis)
    if publish:
        state.published = dict(zip(snapshot.personas, snapshot.scores))
        state.publishes += 1
        state.quiet = 0
    elif state.publishes:
        state.quiet += 1
    return publish


# -- reference: all partitions in one process ---------------------------------------------
class LocalNetwork:
    """Users, items and the messages between them in memory: the stream without Kafka.

    Messages wait in one queue; `deliver` hands them over in FIFO order, or in a random order
    and with random duplicates when given an `rng` (the arithmetic must not care). Tests drive
    it against the exact batch affinity; the stream must agree with it within ε.

    >>> net = LocalNetwork(2, eps=0.01)
    >>> net.label("p", [0]); net.purchase("p", "mug"); net.purchase("u", "mug")
    >>> _ = net.deliver()
    >>> net.psi_raw(["u"]).round(2).tolist()  # M[mug] = L[p] / 2
    [[0.5, 0.0]]
    """

    def __init__(self, n_personas: int, eps: float, hysteresis: float | None = None, k: int = 5,
                 beta: float = 0.5) -> None:
        self.n_personas = n_personas
        self.theta = threshold(eps)
        self.hysteresis, self.k, self.beta = hysteresis, k, beta  # hysteresis None: no decisions
        self.label_counts = np.zeros(n_personas)
        self.published_updates = 0
        self._weights_key: bytes | None = None
        self._weights: tuple[np.ndarray, np.ndarray] = (np.zeros(n_personas), np.ones(n_personas))
        self.users: dict[str, UserState] = {}
        self.items: dict[str, ItemState] = {}
        self.queue: list[Membership | ItemValue] = []
        self.messages = 0

    def user(self, user: str) -> UserState:
        return self.users.setdefault(user, UserState(self.n_personas))

    def item(self, item: str) -> ItemState:
        return self.items.setdefault(item, ItemState(self.n_personas))

    def purchase(self, user: str, item: str) -> None:
        state = self.user(user)
        if user_purchase(state, item):
            self.queue.append(user_membership(state, user, item))

    def label(self, user: str, personas: Sequence[int]) -> None:
        state = self.user(user)
        self.label_counts[list(state.label_personas)] -= 1
        state.label_personas = tuple(int(p) for p in personas)
        self.label_counts[list(state.label_personas)] += 1
        self.queue.extend(user_set_label(state, user, label_vector(personas, self.n_personas)))

    def _handle(self, msg: Membership | ItemValue) -> None:
        """One message, through the stream's own protocol code (`core.stream_protocol`, as a
        batch of one at a fresh offset: the network never replays, it duplicates and reorders)."""
        from core.stream_protocol import UserBatch, apply_item_batch  # (it builds on this module)

        self.messages += 1
        if isinstance(msg, Membership):
            done = apply_item_batch(self.items.get, [(self.messages, [(msg, 0.0)])], self.n_personas, self.theta)
            self.items.update(done.rows)
            self.queue.extend(value for value, _ in done.values)
            return
        work = UserBatch(self.users.get, self.n_personas)
        work.value(self.messages, msg.item, msg.seq, msg.value, msg.users, 0.0)
        self.users.update(work.rows_to_write())
        if self.hysteresis is not None:
            for user in work.changed:
                self._decide(self.users[user], self.hysteresis)

    def _decide(self, state: UserState, hysteresis: float) -> None:
        """The worker's decision for an unlabeled user whose Ψ̂ moved (`streams.agents`)."""
        if state.label is not None:
            return
        key = self.label_counts.tobytes()
        if self._weights_key != key:
            from core.affinity import debias_weights, label_distribution  # (core.affinity imports numba)

            q_hat = label_distribution(self.label_counts[None, :])
            self._weights, self._weights_key = (q_hat, debias_weights(q_hat, self.beta)), key
        q_hat, debias = self._weights
        psi = psi_raw(state)
        prior = None if np.any(psi > 0) or not self.label_counts.any() else q_hat
        snap = rank_personas(psi, debias, self.k, prior)
        self.published_updates += decide(state, snap, hysteresis)

    def personas(self, user_ids: Sequence[str]) -> list[tuple[int, ...]]:
        """The persona set each user last had published (prototypes: their label)."""
        out: list[tuple[int, ...]] = []
        for user in user_ids:
            state = self.users.get(user)
            if state is None:
                out.append(())
            elif state.label is not None:
                out.append(state.label_personas)
            else:
                out.append(tuple(state.published))
        return out

    def deliver(self, rng: np.random.Generator | None = None, dup: float = 0.0, limit: int | None = None) -> int:
        """Deliver up to `limit` queued messages (all when None); returns how many were handled."""
        handled = 0
        if rng is None and limit is None:  # FIFO, everything: swap queues instead of pop(0)
            while self.queue:
                batch, self.queue = self.queue, []
                for msg in batch:
                    self._handle(msg)
                handled += len(batch)
            return handled
        while self.queue and (limit is None or handled < limit):
            if rng is None:
                msg = self.queue.pop(0)
            else:
                msg = self.queue.pop(int(rng.integers(len(self.queue))))
                if dup and rng.random() < dup:
                    self.queue.append(msg)
            self._handle(msg)
            handled += 1
        return handled

    def psi_raw(self, user_ids: Sequence[str]) -> np.ndarray:
        """Ψ̂_raw rows in the order of `user_ids` (zeros for unseen users)."""
        out = np.zeros((len(user_ids), self.n_personas))
        for row, user in enumerate(user_ids):
            if user in self.users:
                out[row] = psi_raw(self.users[user])
        return out
