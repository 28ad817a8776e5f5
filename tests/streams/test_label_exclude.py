"""GPLR_LABEL_EXCLUDE: users listed in the file are never chosen as prototypes (a held-out set)."""
from __future__ import annotations

import numpy as np
import pytest

from core.incremental import UserState, user_purchase
from streams.config import ConfigError, StreamConfig
from streams.labeling import LabelPolicy


def _user() -> UserState:
    state = UserState(4)
    for i in range(3):
        user_purchase(state, f"i{i}")
    return state


def test_excluded_users_are_never_requested(tmp_path):
    path = tmp_path / "held.txt"
    path.write_text("17850\n13047\n")
    config = StreamConfig(labeler="embedding", label_budget=1.0, label_min_purchases=1, du_quantile=0.0,
                          label_rate_per_min=0, label_exclude=path)
    policy = LabelPolicy(config)
    psi, q, stats = np.array([0.5, 0.5, 0, 0]), np.full(4, 0.25), {"seen": 10, "requested": 0}
    assert policy.consider("17850", _user(), psi, q, stats) is None
    assert policy.consider("13047", _user(), psi, q, stats) is None
    assert policy.consider("12345", _user(), psi, q, stats)["user"] == "12345"
    assert StreamConfig.from_env({"GPLR_LABEL_EXCLUDE": str(path)}).label_exclude == path
    assert config.as_env()["GPLR_LABEL_EXCLUDE"] == str(path)


def test_missing_exclusion_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="GPLR_LABEL_EXCLUDE"):
        StreamConfig(label_exclude=tmp_path / "absent.txt")
