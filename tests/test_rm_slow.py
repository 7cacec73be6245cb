"""The default MiniLM reward model trained and evaluated on real prepared Reddit data (slow: minutes)."""

from __future__ import annotations

import json
import math

import pytest

from karma.paths import shared_data_dir

SHARED = shared_data_dir()
COLLEGE = SHARED / "reddit" / "college_2011_2022"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (COLLEGE / "RC_college.zst").exists(), reason=f"needs the shared college dumps in {COLLEGE}"
    ),
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from karma.data.prepare import prepare

    out = tmp_path_factory.mktemp("college") / "prepared"
    prepare(
        comments=[str(COLLEGE / "RC_college.zst")],
        submissions=[str(COLLEGE / "RS_college.zst")],
        out=str(out),
    )
    return out


def test_minilm_on_real_college_data_reports_against_the_length_baseline(prepared, tmp_path):
    from karma.rm.evaluate import evaluate_rm
    from karma.rm.model import RewardModel
    from karma.rm.train import train_rm

    rm_dir = train_rm(
        prepared,
        tmp_path / "rm",
        variant="context",
        objective="pairwise",
        max_train=128,
        max_eval=100,
        progress=False,
    )
    cfg = json.loads((rm_dir / "karma_rm.json").read_text())
    assert cfg["backbone"] == "minilm" and cfg["metrics"]["train"]["subsampled"]
    assert cfg["metrics"]["train"]["items"] == 128 and cfg["metrics"]["train"]["steps"] == 8
    assert cfg["data_card_sha256"] and cfg["karma_normalization"] == "log1p"
    assert RewardModel.load(rm_dir).config.version == cfg["version"]

    r = evaluate_rm(
        rm_dir, prepared, "test", tmp_path / "eval", max_examples=200, max_pairs=200, max_set_pairs=200
    )
    assert set(r["systems"]) == {"rm:context", "length", "bow_ridge", "earliness", "lateness"}
    sets = r["pair_sets"]["sets"]
    # the prepared pairs obey SHP's rule (chosen never earlier); the natural pairs of the same split do not
    assert sets["rule"]["chosen_later"] > 0.99 and sets["natural"]["chosen_later"] < 0.3
    assert sets["balanced"]["chosen_later"] == 0.5 and sets["rule"]["systems"]["lateness"]["accuracy"] > 0.99
    assert all(d["n"] == 200 for d in sets.values())
    for name, m in r["systems"].items():
        o = m["overall"]
        for key in ("spearman", "pearson"):
            assert math.isfinite(o[key]) and -1 <= o[key] <= 1, (name, key)
        assert 0 <= o["pairwise_accuracy"] <= 1 and o["n_pairs"] == 200
        assert 0 <= o["ndcg@1"] <= 1 and 0 <= o["ndcg@5"] <= 1
        assert len(m["by_subreddit"]) >= 2
    report = (tmp_path / "eval" / "report.md").read_text()
    rm_acc, len_acc = (r["systems"][k]["overall"]["pairwise_accuracy"] for k in ("rm:context", "length"))
    verdict = "BEATS" if rm_acc > len_acc else "does NOT beat"
    assert (
        f"`rm:context` {verdict} the length baseline on pairwise accuracy ({rm_acc:.3f} vs {len_acc:.3f})"
        in report
    )
    assert (tmp_path / "eval" / "accuracy_vs_score_ratio.png").stat().st_size > 1000
    print(f"\nreal college data: rm:context pairwise acc {rm_acc:.3f} vs length {len_acc:.3f} ({verdict})")
