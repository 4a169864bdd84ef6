import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipelines.decontam import (  # noqa: E402
    accuracy_with_without, find_contamination, load_encoder, nearest_training_example,
)

TRAIN = [
    "Translate the following sentence into French: the weather is nice today.",
    "A 45-year-old man presents with crushing substernal chest pain radiating to the left arm "
    "for 30 minutes. ECG shows ST elevation in leads II, III and aVF. Which coronary artery is "
    "most likely occluded?",
    "Write a haiku about autumn leaves.",
    "List three common side effects of metformin.",
]
NEAR_COPY = (
    "A 45 year old man presents with crushing substernal chest pain that radiates to his left arm "
    "for 30 minutes. The ECG shows ST elevations in leads II, III, and aVF. Which coronary artery "
    "is most likely occluded?"
)
UNRELATED = "Which enzyme deficiency causes phenylketonuria? A. Tyrosinase B. Phenylalanine hydroxylase"


@pytest.fixture(scope="module")
def encoder():
    return load_encoder(device="cpu")


def test_near_copy_is_flagged_and_unrelated_is_not(encoder):
    result = find_contamination(iter(TRAIN), [NEAR_COPY, UNRELATED], encoder=encoder, train_chunk=3)
    assert result.flagged == [True, False]
    assert result.nearest_train_index[0] == 1
    assert result.max_similarity[0] > 0.8 > result.max_similarity[1]
    # streaming the training side in chunks gives the same answer as one chunk
    whole = find_contamination(TRAIN, [NEAR_COPY, UNRELATED], encoder=encoder)
    assert whole.nearest_train_index == result.nearest_train_index
    assert whole.max_similarity == pytest.approx(result.max_similarity, abs=1e-5)
    # the threshold is strict
    exact = find_contamination(TRAIN, [NEAR_COPY], encoder=encoder, threshold=whole.max_similarity[0])
    assert exact.flagged == [False]


def test_empty_sides(encoder):
    assert find_contamination(TRAIN, [], encoder=encoder).flagged == []
    none = find_contamination([], [UNRELATED], encoder=encoder)
    assert none.flagged == [False] and none.nearest_train_index == [-1]


def test_chunked_max_equals_brute_force():
    torch.manual_seed(0)
    train = torch.nn.functional.normalize(torch.randn(103, 16), dim=1)
    evals = torch.nn.functional.normalize(torch.randn(37, 16), dim=1)
    evals[5] = train[77]  # an exact copy
    best, index = nearest_training_example(evals, train, train_chunk=10, eval_chunk=7)
    expected_best, expected_index = (evals @ train.T).max(dim=1)
    assert torch.allclose(best, expected_best, atol=1e-6)
    assert torch.equal(index, expected_index)
    assert index[5] == 77 and best[5] == pytest.approx(1.0, abs=1e-6)


def test_accuracy_with_and_without_flagged_items():
    table = accuracy_with_without(
        benchmarks=["medqa", "medqa", "medqa", "medqa", "pubmedqa"],
        correct=[True, True, False, False, True],
        flagged=[True, False, False, False, True],
    )
    assert table["medqa"] == {"items": 4, "flagged": 1, "flagged_share": 0.25, "accuracy": 0.5,
                              "accuracy_clean": 1 / 3, "items_clean": 3}
    assert table["pubmedqa"]["accuracy_clean"] is None
    assert table["all"]["flagged"] == 2 and table["all"]["items"] == 5
    with pytest.raises(ValueError):
        accuracy_with_without(["a"], [True, False], [False])
