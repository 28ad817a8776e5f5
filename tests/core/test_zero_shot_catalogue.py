"""The zero-shot channel as shipped (`core.zero_shot.CatalogueVotes`: catalogue statistics, not
per-item lifts) votes as the labeler pinned to the catalogue, for known and new names (real MiniLM)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from core.labelers.embedding import EmbeddingLabeler
from core.personas import Persona, PersonaSet
from core.zero_shot import CALIBRATION, TEMPERATURE, CatalogueVotes, ZeroShotChannel, _labeler, zero_shot_channel

PERSONAS = PersonaSet([Persona("Home Bakers", "people who bake cakes and bread at home"),
                       Persona("Gardeners", "people who grow plants and flowers in their garden"),
                       Persona("Pet Owners", "people who care for dogs and cats")])
NAMES = ["cake tin round", "cake stand glass", "icing bag set", "bread tin", "garden hose reel",
         "garden gnome", "flower pot terracotta", "rake set", "dog bowl steel", "cat collar red",
         "dog lead leather", "cat toy mouse", "red glass vase", "steel kitchen scales"]


@pytest.fixture(scope="module")
def channel() -> ZeroShotChannel:
    return zero_shot_channel(NAMES, PERSONAS)


def test_the_votes_are_the_pinned_labelers_for_known_and_new_names(channel: ZeroShotChannel) -> None:
    pinned = EmbeddingLabeler(PERSONAS, temperature=TEMPERATURE, calibration=CALIBRATION, catalogue=NAMES)
    votes = pinned.item_persona_scores(NAMES)
    base = votes.mean(axis=0)
    # bit for bit: a name's vector does not depend on what it is embedded with (core.embedding_cache)
    np.testing.assert_array_equal(channel.lift, votes / base)
    np.testing.assert_array_equal(channel.base, base)
    assert np.argmax(channel.lift[NAMES.index("dog bowl steel")]) == 2
    new = ["puppy chew bone", "sourdough bread flour"]  # never in the catalogue: voted, not neutral
    np.testing.assert_array_equal(channel.item_lifts(new), pinned.item_persona_scores(new) / base)
    assert np.argmax(channel.item_lifts(new)[0]) == 2 and np.argmax(channel.item_lifts(new)[1]) == 0


def test_the_shipped_channel_is_small_and_computes_the_same_lifts(channel: ZeroShotChannel) -> None:
    shipped = ZeroShotChannel.from_dict(json.loads(json.dumps(channel.shipped().to_dict())))
    assert shipped.names == () and "lift" not in json.dumps(shipped.catalogue.to_dict())
    np.testing.assert_array_equal(shipped.item_lifts(NAMES), channel.lift)  # the same cached votes, bit for bit
    np.testing.assert_array_equal(shipped.base, channel.base)
    assert shipped.catalogue == channel.catalogue and shipped.catalogue.key == channel.catalogue.key
    shipped.warm()  # what a worker runs in a thread when the model arrives: MiniLM and the personas loaded
    assert _labeler(shipped.catalogue)[0]._persona_vectors is not None  # noqa: SLF001
    words = {w for n in NAMES for w in n.split()}
    assert len(shipped.catalogue.words) == len(words)  # per word its count: no per-item floats
    assert dict(shipped.catalogue.words)["cake"] == 2 and dict(shipped.catalogue.words)["red"] == 2


def test_the_catalogue_key_follows_its_statistics_and_bad_records_fail() -> None:
    a = CatalogueVotes.of(NAMES, PERSONAS)
    assert CatalogueVotes.of(list(reversed(NAMES)), PERSONAS) == a  # order does not matter
    assert CatalogueVotes.of(NAMES + ["dog basket"], PERSONAS).key != a.key
    other = PersonaSet([Persona(p.name, p.definition + ".") for p in PERSONAS])
    assert CatalogueVotes.of(NAMES, other).key != a.key
    with pytest.raises(ValueError, match="differ in length"):
        CatalogueVotes.from_dict(a.to_dict() | {"counts": [1]})
    body = ZeroShotChannel((), np.zeros((0, 3)), a, np.ones(3)).to_dict()
    with pytest.raises(ValueError, match="positive"):
        ZeroShotChannel.from_dict(body | {"base": [1.0, 0.0, 1.0]})
