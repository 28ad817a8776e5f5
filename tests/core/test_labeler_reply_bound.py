"""Issue 9: an LLM reply naming more personas than asked for is malformed (rejected, not cut)."""
from __future__ import annotations

from core.labelers.openai_labeler import OpenAILabeler
from tests.core.test_labelers_openai import GARDEN, PERSONAS, config


def test_reply_with_more_than_max_personas_is_rejected(fake_openai):
    many = ["Gardener", "Baker", "Tea Lover"] * 2  # 6 names, 3 distinct known ones
    fake_openai.script(fake_openai.good(many), fake_openai.good(many[:3]))
    labeler = OpenAILabeler(PERSONAS, config(fake_openai, max_personas=5, concurrency=1))
    rejected, accepted = labeler.label([GARDEN, GARDEN])
    assert not rejected.ok and rejected.error == "parse_error" and rejected.personas == ()
    assert accepted.ok and accepted.personas == (1, 2, 0)  # exactly max or fewer: accepted


def test_reply_at_the_bound_is_accepted(fake_openai):
    fake_openai.script(fake_openai.good(["Gardener", "Baker"]))
    [result] = OpenAILabeler(PERSONAS, config(fake_openai, max_personas=2)).label([GARDEN])
    assert result.ok and result.personas == (1, 2)
