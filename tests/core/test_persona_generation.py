"""Three-stage persona generation end to end against the fake OpenAI server (and the CLI)."""
from __future__ import annotations

import argparse
import json

import pytest

from core import batch_cli
from core.labelers.base import UserHistory
from core.labelers.openai_labeler import LLMConfig
from core.labelers.prompts import PRODUCTS_BEGIN, PRODUCTS_END, ReplyParseError, read_block
from core.persona_generation import (
    CANDIDATES_BEGIN,
    CANDIDATES_END,
    PersonaGenerationError,
    generate_persona_set,
    parse_persona_list,
)
from core.personas import load_personas
from core.synthetic import make_shop

HISTORIES = [
    UserHistory("a", (("GARDEN TROWEL", 3), ("SEED PACKETS", 1))),
    UserHistory("b", (("GREEN TEA", 4),)),
    UserHistory("c", (("ROSE SEEDS", 2), ("TEAPOT", 1))),
]


def _personas(rows):
    return json.dumps({"personas": [{"name": n, "definition": f"Buys {n.lower()} things."} for n in rows]})


class StagedModel:
    """Answers each stage from its input: stage 1 names personas after products, 2 and 3 keep
    the first names they are shown. Records what each stage saw."""

    def __init__(self):
        self.seen = {1: [], 2: [], 3: []}

    def __call__(self, body):
        prompt = body["messages"][-1]["content"]
        if prompt.startswith("STAGE 1"):
            products = [row[0] for row in read_block(prompt, PRODUCTS_BEGIN, PRODUCTS_END)]
            self.seen[1].append(products)
            return _personas([f"{p.split()[-1].title()} Fan" for p in products][:2])
        rows = [row[0] for row in read_block(prompt, CANDIDATES_BEGIN, CANDIDATES_END)]
        stage = 2 if prompt.startswith("STAGE 2") else 3
        self.seen[stage].append(rows)
        unique = list(dict.fromkeys(rows))
        marker = "Return exactly " if stage == 3 else "return at most "
        n = int(prompt.split(marker)[1].split()[0])
        return _personas(unique[:n])


def config(fake, **kw):
    base = dict(base_url=fake.base_url, api_key="k", backoff_s=0.001, max_retries=1, concurrency=2)
    base.update(kw)
    return LLMConfig(**base)


def test_three_stages_produce_exactly_n_personas(fake_openai):
    model = StagedModel()
    fake_openai.default = model
    personas = generate_persona_set(config(fake_openai), HISTORIES, n_personas=3, per_user=2)
    assert len(personas) == 3
    assert sorted(model.seen[1]) == sorted([["GARDEN TROWEL", "SEED PACKETS"], ["GREEN TEA"], ["ROSE SEEDS", "TEAPOT"]])
    assert sorted(model.seen[2][0]) == sorted(["Trowel Fan", "Packets Fan", "Tea Fan", "Seeds Fan", "Teapot Fan"])
    assert model.seen[3] == [model.seen[2][0]]
    assert personas.names == model.seen[3][0][:3]
    assert all(p.definition.startswith("Buys ") for p in personas)
    assert len(fake_openai.requests) == 5  # 3 describe + 1 merge + 1 refine
    assert fake_openai.requests[-1]["body"]["max_tokens"] == 120 + 80 * 3


def test_large_stage_one_output_is_merged_in_chunks(fake_openai):
    model = StagedModel()
    fake_openai.default = model
    histories = [UserHistory(str(i), ((f"ITEM{i} WIDGET{i}", 1),)) for i in range(30)]
    personas = generate_persona_set(config(fake_openai), histories, n_personas=2, per_user=1, merge_chunk=10)
    assert len(personas) == 2
    # 30 -> 3 chunks of 10 -> 12 candidates -> 2 chunks (10 + 2) -> 4 + 2 -> one final merge
    assert [len(rows) for rows in model.seen[2]] == [10, 10, 10, 10, 2, 6]


def test_failed_users_are_skipped_but_stage_errors_stop(fake_openai):
    fake_openai.default = StagedModel()
    fake_openai.script(fake_openai.text("not json"))
    cfg = config(fake_openai, concurrency=1)
    personas = generate_persona_set(cfg, HISTORIES, n_personas=2, per_user=2)
    assert len(personas) == 2
    # stage 3 answering the wrong number of personas is an error, not a shorter set
    fake_openai.script(*[fake_openai.text(_personas(["A"]))] * 3,
                       fake_openai.text(_personas(["A", "B"])), fake_openai.text(_personas(["A"])))
    with pytest.raises(PersonaGenerationError, match="expected 3..3 personas, got 1"):
        generate_persona_set(cfg, HISTORIES, n_personas=3, per_user=2)


def test_every_stage_one_failure_is_an_error(fake_openai):
    fake_openai.script(*fake_openai.fail(500, times=6))
    with pytest.raises(PersonaGenerationError, match="stage 1 produced no personas"):
        generate_persona_set(config(fake_openai, concurrency=1), HISTORIES, n_personas=2)


def test_budget_exhaustion_stops_generation(fake_openai):
    fake_openai.default = StagedModel()
    with pytest.raises(PersonaGenerationError, match="budget_exhausted"):
        generate_persona_set(config(fake_openai, max_calls=3), HISTORIES, n_personas=2)
    assert len(fake_openai.requests) == 3


@pytest.mark.parametrize("reply", [
    '{"personas": [{"name": "A"}]}',
    '{"personas": [{"name": "A", "definition": "d", "admin": 1}]}',
    '{"personas": [{"name": "", "definition": "d"}]}',
    '{"personas": [{"name": "A", "definition": 3}]}',
    '{"personas": []}',
    '{"personas": [{"name": "A", "definition": "d"}], "extra": 1}',
    'Here: {"personas": [{"name": "A", "definition": "d"}]}',
])
def test_strict_persona_list_parsing(reply):
    with pytest.raises(ReplyParseError):
        parse_persona_list(reply)


def test_duplicate_final_names_rejected():
    reply = _personas(["Tea Fan", "tea fan"])
    assert len(parse_persona_list(reply)) == 2
    with pytest.raises(ReplyParseError, match="distinct"):
        parse_persona_list(reply, unique=True)


def test_cli_writes_a_loadable_persona_file(fake_openai, tmp_path, monkeypatch, capsys):
    shop = make_shop(n_users=40, n_items=50, n_personas=4, seed=2)
    data = tmp_path / "purchases.csv"
    shop.frame.to_csv(data, index=False)
    out = tmp_path / "personas.json"
    fake_openai.default = StagedModel()
    monkeypatch.setenv("OPENAI_BASE_URL", fake_openai.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-cli-secret")
    monkeypatch.setenv("GPLR_LLM_BACKOFF_S", "0.001")
    parser = argparse.ArgumentParser(prog="gplr")
    batch_cli.register(parser.add_subparsers(dest="command", required=True))  # registers ours too
    args = parser.parse_args(["personas-generate", "--data", str(data), "--out", str(out),
                              "--n-personas", "4", "--users", "6", "--seed", "1"])
    assert args.func(args) == 0
    personas = load_personas(out)
    assert len(personas) == 4
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["personas"] == 4 and summary["users"] == 6 and summary["calls"] == 6 + 2
    assert "sk-cli-secret" not in out.read_text()
