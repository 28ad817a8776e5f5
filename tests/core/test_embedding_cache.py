"""Exact, persistent sentence embeddings (`core.embedding_cache`): a hit is the bits a miss computes,
a bad file is recomputed (never an error), the key follows the model and the text, and a text's
MiniLM vector does not depend on what it is encoded with."""
from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from core.embedding_cache import ROWS, EmbeddingCache, EmbeddingCacheConfig, embed, encode_exact, model_key

DIM = 6


def vector(text: str) -> np.ndarray:
    """A text's fake embedding: unit float32 from its hash."""
    seed = int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


class FakeModel:
    """A sentence model whose vector is a function of the text; records every call's batch."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def preprocess(self, texts: list[str]) -> dict:
        import torch

        lengths = [len(t.split()) + 2 for t in texts]
        width = max(lengths)
        return {"attention_mask": torch.tensor([[1] * n + [0] * (width - n) for n in lengths])}

    def encode(self, texts: list[str], batch_size: int, **_: object) -> np.ndarray:
        assert batch_size == len(texts)
        self.calls.append(list(texts))
        return np.stack([vector(t) for t in texts])


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "weights.bin").write_bytes(b"\x01" * 1000)
    (folder / "sub" / "config.json").write_text("{}")
    return folder


def config(tmp_path: Path) -> EmbeddingCacheConfig:
    return EmbeddingCacheConfig(str(tmp_path / "cache"))


TEXTS = ["cake tin", "garden hose reel", "dog bowl", "red glass vase with a long name", "tin", "rake"]


def test_every_model_call_has_one_shape_and_a_text_gets_its_own_vector() -> None:
    model = FakeModel()
    texts = [f"item {'word ' * (i % 4)}{i}" for i in range(50)]
    out = encode_exact(model, texts)
    np.testing.assert_array_equal(out, np.stack([vector(t) for t in texts]))
    for batch in model.calls:  # (ROWS, one token count): no padding, whatever else is encoded
        assert len(batch) == ROWS and len({len(t.split()) for t in batch}) == 1
    assert sum(len(set(b)) for b in model.calls) == len(texts)
    np.testing.assert_array_equal(encode_exact(FakeModel(), texts[7:8])[0], out[7])


def test_a_miss_is_computed_and_stored_and_a_hit_never_loads_the_model(tmp_path: Path, model_dir: Path) -> None:
    loads: list[FakeModel] = []

    def load() -> FakeModel:
        loads.append(FakeModel())
        return loads[-1]

    cfg = config(tmp_path)
    first = embed(TEXTS[:4], model_dir, load, cfg)
    assert len(loads) == 1 and sorted(first) == sorted(TEXTS[:4])
    (path,) = (tmp_path / "cache").glob("*.sqlite")
    again = EmbeddingCache(path).get(TEXTS)  # another process: the file alone
    assert sorted(again) == sorted(TEXTS[:4])
    for text in TEXTS[:4]:
        assert again[text].dtype == np.float32 and again[text].tobytes() == first[text].tobytes()
    hit = embed(TEXTS[:4], model_dir, lambda: pytest.fail("the model was loaded on a full hit"), cfg)
    assert all(hit[t].tobytes() == first[t].tobytes() for t in TEXTS[:4])
    mixed = embed(TEXTS, model_dir, load, cfg)  # only the two new texts go to the model
    assert len(loads) == 2 and sorted(t for b in loads[1].calls for t in set(b)) == sorted(TEXTS[4:])
    assert all(mixed[t].tobytes() == vector(t).tobytes() for t in TEXTS)


def test_the_key_follows_the_model_files_the_text_and_the_folder(tmp_path: Path, model_dir: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in model_dir.rglob("*"):
        if f.is_file():
            (copy / f.relative_to(model_dir)).parent.mkdir(parents=True, exist_ok=True)
            (copy / f.relative_to(model_dir)).write_bytes(f.read_bytes())
    assert model_key(copy) == model_key(model_dir)  # the content, not where it is installed
    other = tmp_path / "other"
    other.mkdir()
    (other / "weights.bin").write_bytes(b"\x01" * 999 + b"\x02")
    (other / "sub").mkdir()
    (other / "sub" / "config.json").write_text("{}")
    assert model_key(other) != model_key(model_dir)
    embed(TEXTS[:2], model_dir, FakeModel, config(tmp_path))
    loaded: list[int] = []
    embed(TEXTS[:2], other, lambda: loaded.append(1) or FakeModel(), config(tmp_path))  # another model: a miss
    assert loaded == [1] and len(list((tmp_path / "cache").glob("*.sqlite"))) == 2
    (path,) = [p for p in (tmp_path / "cache").glob("*.sqlite") if model_key(model_dir) in p.name]
    assert EmbeddingCache(path).get(["cake tin ", "Cake tin"]) == {}  # another text: a miss


@pytest.mark.parametrize("damage", ["garbage", "truncated", "bad row"])
def test_a_damaged_file_is_recomputed_not_an_error(tmp_path: Path, model_dir: Path, damage: str) -> None:
    cfg = config(tmp_path)
    many = TEXTS + [f"filler item number {i}" for i in range(400)]  # a file of several pages
    embed(many, model_dir, FakeModel, cfg)
    (path,) = (tmp_path / "cache").glob("*.sqlite")
    if damage == "garbage":
        path.write_bytes(b"not a database at all" * 300)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        with sqlite3.connect(path) as db:
            db.execute("UPDATE vectors SET vec = ? WHERE text = ?", (b"\x00\x01\x02", TEXTS[0]))
    cache = EmbeddingCache(path)
    found = cache.get(TEXTS)  # never raises; whatever it returns is right
    assert TEXTS[0] not in found
    assert all(v.tobytes() == vector(t).tobytes() for t, v in found.items())
    loads: list[int] = []
    fresh = embed(TEXTS, model_dir, lambda: loads.append(1) or FakeModel(), EmbeddingCacheConfig(str(path.parent)))
    assert loads == [1] and all(fresh[t].tobytes() == vector(t).tobytes() for t in TEXTS)
    assert sorted(EmbeddingCache(path).get(TEXTS)) == sorted(TEXTS)  # repaired and stored again


def test_a_text_sqlite_cannot_key_is_computed_every_time(tmp_path: Path, model_dir: Path) -> None:
    odd = "caf\udce9 mug"  # a lone surrogate (bytes decoded with surrogateescape)
    for _ in range(2):
        out = embed([odd, "mug"], model_dir, FakeModel, config(tmp_path))
        assert out[odd].tobytes() == vector(odd).tobytes() and out["mug"].tobytes() == vector("mug").tobytes()
    loads: list[int] = []
    embed([odd, "mug"], model_dir, lambda: loads.append(1) or FakeModel(), config(tmp_path))
    assert loads == [1]  # the odd text again; "mug" from the cache


def test_an_unusable_folder_or_off_means_no_cache(tmp_path: Path, model_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = embed(TEXTS[:2], model_dir, FakeModel, EmbeddingCacheConfig(str(blocker / "cache")))
    assert all(out[t].tobytes() == vector(t).tobytes() for t in TEXTS[:2])
    assert EmbeddingCacheConfig("off").directory() is None and EmbeddingCacheConfig("OFF").directory() is None
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert EmbeddingCacheConfig("").directory() == tmp_path / "xdg" / "gplr"
    assert EmbeddingCacheConfig.from_env({"GPLR_EMBEDDING_CACHE": " ~/e "}).directory() == Path.home() / "e"


def test_minilm_vectors_and_votes_are_the_same_bits_alone_in_a_catalogue_and_from_the_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from core.labelers.embedding import EmbeddingLabeler, _load_model
    from core.personas import Persona, PersonaSet

    names = ["round cake tin", "garden hose reel 20m", "dog lead", "cat scratching post tall", "tea cosy",
             "a very long product name of a wooden kitchen spoon rest set", "vase"]
    model = _load_model(None)
    together = encode_exact(model, names)
    for i in (0, 2, 5):
        assert encode_exact(model, [names[i]])[0].tobytes() == together[i].tobytes()
    assert encode_exact(model, names[::-1])[::-1].tobytes() == together.tobytes()

    personas = PersonaSet([Persona("Home Bakers", "people who bake at home"),
                           Persona("Gardeners", "people who grow plants"), Persona("Pet Owners", "dogs and cats")])
    votes = {}
    for setting in ("off", str(tmp_path / "a"), str(tmp_path / "a")):  # computed, stored, then read back
        monkeypatch.setenv("GPLR_EMBEDDING_CACHE", setting)
        labeler = EmbeddingLabeler(personas, calibration=0.0, catalogue=names)
        votes[setting] = labeler.item_persona_scores(names)
        alone = EmbeddingLabeler(personas, calibration=0.0, catalogue=names).item_persona_scores(names[3:4])
        assert alone.tobytes() == votes[setting][3:4].tobytes()
    assert votes["off"].tobytes() == votes[str(tmp_path / "a")].tobytes()


def test_a_stand_in_encoder_never_touches_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache is keyed by the model folder's files, so vectors of a replaced `_load_model`
    (tests' fake encoders) must not be stored under the real model's key."""
    import core.labelers.embedding as emb
    from core.personas import Persona, PersonaSet

    monkeypatch.setenv("GPLR_EMBEDDING_CACHE", str(tmp_path / "c"))
    monkeypatch.setattr(emb, "_load_model", lambda path: FakeModel())
    labeler = emb.EmbeddingLabeler(PersonaSet([Persona("a", "cake"), Persona("b", "dog")]))
    np.testing.assert_array_equal(labeler.encode(TEXTS), np.stack([vector(t) for t in TEXTS]))
    assert not (tmp_path / "c").exists()
