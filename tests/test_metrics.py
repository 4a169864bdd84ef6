import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipelines.metrics import (  # noqa: E402
    bertscore, describe_bertscore, is_normal_impression, resolve_encoder_dir, rouge_l, summarize,
)


def test_rouge_l_uses_stemming_and_f_measure():
    scores = rouge_l(
        ["Small pleural effusions.", "cardiomegaly", "left lower lobe atelectasis"],
        ["Small pleural effusion.", "pneumothorax", "atelectasis"],
    )
    assert scores[0] == pytest.approx(1.0)
    assert scores[1] == 0.0
    assert scores[2] == pytest.approx(2 * (1 / 4) * 1 / (1 / 4 + 1))  # P=1/4, R=1
    with pytest.raises(ValueError):
        rouge_l(["a"], [])


def test_describe_bertscore_defaults_to_last_layer_of_bundled_minilm():
    setup = describe_bertscore()
    assert setup["num_layers"] == setup["total_layers"] == 6
    assert "MiniLM" in setup["encoder"]
    assert describe_bertscore(num_layers=4)["num_layers"] == 4
    with pytest.raises(ValueError):
        describe_bertscore(num_layers=7)


def test_resolve_encoder_dir_follows_modules_json(tmp_path):
    (tmp_path / "0_Transformer").mkdir()
    (tmp_path / "0_Transformer" / "config.json").write_text("{}")
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))
    assert resolve_encoder_dir(tmp_path) == tmp_path / "0_Transformer"
    with pytest.raises(FileNotFoundError):
        resolve_encoder_dir(tmp_path / "0_Transformer" / "missing")


def test_bertscore_on_local_encoder_ranks_pairs():
    refs = ["No acute cardiopulmonary process.", "No acute cardiopulmonary process.",
            "Moderate right pleural effusion."]
    preds = ["No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality.",
             "The patient enjoys gardening on weekends."]
    out = bertscore(preds, refs, batch_size=2)
    assert set(out) == {"precision", "recall", "f1"}
    assert all(len(v) == 3 for v in out.values())
    assert out["f1"][0] == pytest.approx(1.0, abs=1e-4)
    assert out["f1"][0] > out["f1"][1] > out["f1"][2]
    assert bertscore([], []) == {"precision": [], "recall": [], "f1": []}
    empty = bertscore(["", "no acute disease"], ["normal chest", "no acute disease"], batch_size=2)
    assert empty["f1"][0] == 0.0 and empty["f1"][1] > 0.9


@pytest.mark.parametrize("text", [
    "No acute cardiopulmonary abnormality.",
    "1. No acute cardiopulmonary process.",
    "Normal chest x-XXXX.",
    "Heart size normal. Lungs are clear.",
    "Negative for acute abnormality.",
    "No evidence of active disease.",
])
def test_normal_impressions(text):
    assert is_normal_impression(text)


@pytest.mark.parametrize("text", [
    "Mild cardiomegaly.",
    "No acute disease. Stable calcified granuloma.",
    "Low lung volumes with bibasilar atelectasis.",
    "1. No acute cardiopulmonary abnormality. 2. Degenerative changes of the thoracic spine.",
])
def test_abnormal_impressions(text):
    assert not is_normal_impression(text)


def test_summarize_skips_missing_and_brackets_mean():
    s = summarize([1.0, 2.0, None, 3.0, 4.0, 5.0])
    assert s["n"] == 5 and s["missing"] == 1 and s["mean"] == pytest.approx(3.0)
    assert s["ci_low"] < 3.0 < s["ci_high"]
    assert 1.0 <= s["ci_low"] and s["ci_high"] <= 5.0
    assert summarize([2.0])["ci_low"] is None
    assert summarize([None, None]) == {"n": 0, "missing": 2, "mean": None, "ci_low": None, "ci_high": None}
    assert summarize([1.0, 2.0, 3.0]) == summarize([1.0, 2.0, 3.0])  # seeded
