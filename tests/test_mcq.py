import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pipelines.mcq import (
    MCQItem, accuracy_table, encode_pair, extract_answer, format_prompt, hf_generate_fn, load_mcq,
    option_continuations, score_generative, score_loglik, wilson_accuracy,
)

SHARED_MCQA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mcqa"

ITEMS = [
    MCQItem("q1", "toy", "biology", "Form extracellular fibers with high tensile strength:",
            {"A": "Fibronectin", "B": "Collagen", "C": "Integrins", "D": "Proteoglycans"}, "B"),
    MCQItem("q2", "toy", "anatomy", "Which nerve supplies the diaphragm?",
            {"A": "Vagus nerve", "B": "Phrenic nerve", "C": "Intercostal nerves", "D": "Accessory nerve"}, "B"),
    MCQItem("q3", "pubmedqa", None, "Does aspirin reduce mortality after myocardial infarction?",
            {"A": "yes", "B": "no", "C": "maybe"}, "A", context="Patients were randomised to aspirin."),
]


@pytest.fixture(scope="module")
def tiny_lm():
    corpus = [format_prompt(item) + " " + " ".join(item.options.values()) for item in ITEMS] * 20
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = (
        "{% for m in messages %}<s>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %} =>{% endif %}"
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=len(tokenizer), max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)).eval()
    return model, tokenizer


def hand_loglik(model, tokenizer, context: str, continuation: str) -> float:
    ctx, cont = encode_pair(tokenizer, context, continuation)
    with torch.no_grad():
        logits = model(torch.tensor([ctx + cont])).logits[0]
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    return sum(logprobs[len(ctx) - 1 + j, token].item() for j, token in enumerate(cont))


@pytest.mark.parametrize("target", ["letter", "text"])
def test_loglik_matches_hand_computation(tiny_lm, target):
    model, tokenizer = tiny_lm
    scores = score_loglik(model, tokenizer, ITEMS, target=target, batch_size=5)  # mixed lengths per batch
    for item, score in zip(ITEMS, scores):
        prompt = format_prompt(item, list_options=target == "letter")
        for letter, continuation in option_continuations(item, target).items():
            assert score.logliks[letter] == pytest.approx(hand_loglik(model, tokenizer, prompt, continuation), abs=1e-4)
        assert score.pred == max(score.logliks, key=score.logliks.get)
        lengths = {k: len(v.strip()) for k, v in option_continuations(item, target).items()}
        assert score.pred_norm == max(score.logliks, key=lambda k: score.logliks[k] / lengths[k])
        assert score.correct == (score.pred == item.answer)
    if target == "text":  # multi-token continuations really are sums over several tokens
        assert len(encode_pair(tokenizer, format_prompt(ITEMS[1], False), " Intercostal nerves")[1]) > 1


def test_encode_pair_moves_trailing_space_to_continuation(tiny_lm):
    _, tokenizer = tiny_lm
    ctx, cont = encode_pair(tokenizer, "Answer: ", "B")
    assert (ctx, cont) == encode_pair(tokenizer, "Answer:", " B")
    assert ctx[0] == tokenizer.bos_token_id


def test_hf_generate_batched_matches_alone(tiny_lm):
    model, tokenizer = tiny_lm
    generate = hf_generate_fn(model, tokenizer, max_new_tokens=6)
    prompts = ["Question: short?\nAnswer:", format_prompt(ITEMS[0])]
    assert generate(prompts) == [generate([p])[0] for p in prompts]
    chat = hf_generate_fn(model, tokenizer, max_new_tokens=3, chat=True)
    assert len(chat(prompts)) == 2
    scores = score_generative(ITEMS, generate, batch_size=2)
    assert [s.item_id for s in scores] == ["q1", "q2", "q3"]
    assert all(s.method in {"letter", "text", "levenshtein", "none"} for s in scores)


OPTIONS = {"A": "Fibronectin", "B": "Collagen", "C": "Integrins", "D": "Proteoglycans"}
NESTED = {"A": "paralysis of the facial muscles.", "B": "paralysis of the facial muscles and loss of taste.",
          "C": "loss of taste only", "D": "none of the above"}


@pytest.mark.parametrize("output, options, letter, method", [
    ("B", OPTIONS, "B", "letter"),
    ("(C) Integrins", OPTIONS, "C", "letter"),
    ("**D**", OPTIONS, "D", "letter"),
    ("D. Proteoglycans, since they bind water", OPTIONS, "D", "letter"),
    ("After thinking it over, the answer is (A).", OPTIONS, "A", "letter"),
    ("Correct option: C", OPTIONS, "C", "letter"),
    ("A fibrous protein, COLLAGEN, gives tensile strength.", OPTIONS, "B", "text"),
    ("Paralysis of the facial muscles and loss of taste", NESTED, "B", "text"),
    ("The best option is integrins", OPTIONS, "C", "text"),
    ("Colagen\nbecause of triple helices", OPTIONS, "B", "levenshtein"),
    ("proteoglycan-rich matrix", OPTIONS, "D", "levenshtein"),
    ("No, the evidence is against it.", {"A": "yes", "B": "no", "C": "maybe"}, "B", "text"),
    ("   ", OPTIONS, None, "none"),
])
def test_extraction_chain(output, options, letter, method):
    got = extract_answer(output, options)
    assert (got.letter, got.method) == (letter, method)


@pytest.mark.parametrize("output, letter", [("B", "B"), (" B. ", "B"), ("The answer is B", None), ("E", None)])
def test_exact_match_for_tuned_models(output, letter):
    assert extract_answer(output, OPTIONS, exact=True).letter == letter


def test_score_generative_with_any_generate_fn():
    scores = score_generative(ITEMS, lambda prompts: ["B"] * len(prompts), batch_size=2)
    assert [s.correct for s in scores] == [True, True, False]
    with pytest.raises(ValueError):
        score_generative(ITEMS, lambda prompts: ["B"])


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def row(**overrides):
    base = {"id": "x", "dataset": "headqa_en", "split": "test", "subject": "biology", "question": "Q?",
            "options": {"A": "one", "B": "two", "C": "three", "D": "four"}, "answer_idx": "C",
            "answer_text": "three"}
    return {**base, **overrides}


def test_loader_skips_and_counts_bad_rows(tmp_path):
    no_key = row(id="no-key")
    del no_key["answer_idx"]
    path = write_jsonl(tmp_path / "mcq.jsonl", [
        row(id="ok", options={"B": "two", "A": "one"}, answer_idx="B"),
        row(id="img", has_image=True),
        row(id="noanswer", answer_idx=None),
        no_key,
        row(id="bad-letter", answer_idx="E"),
        row(id="digits", options={"1": "one", "2": "two"}, answer_idx="1"),
        row(id="blank-option", options={"A": "one", "B": " "}),
        row(id="noq", question=""),
        row(id="dev", split="dev"),
        "{not json",
        "",
    ])

    items, report = load_mcq(path, splits={"test"})
    assert [i.id for i in items] == ["ok"]
    assert list(items[0].options) == ["A", "B"] and items[0].answer == "B"
    assert report.kept == 1
    assert report.skipped == {
        "has image": 1, "missing answer": 2, "answer not among options": 1,
        "unknown option letter": 1, "empty option text": 1, "missing question": 1, "invalid json": 1,
    }
    assert len(load_mcq(path)[0]) == 2  # without the split filter the dev row is kept


def test_loader_maps_pubmedqa_schema(tmp_path):
    path = write_jsonl(tmp_path / "pqa.jsonl", [
        {"pmid": "1", "split": "test", "question": "Does X help?", "contexts": ["Background.", "Results."],
         "final_decision": "maybe"},
        {"pmid": "2", "split": "train_cv", "question": "Does Y help?", "contexts": [], "final_decision": "NO"},
        {"pmid": "3", "split": "test", "question": "Does Z help?", "contexts": [], "final_decision": "perhaps"},
        {"pmid": "4", "split": "test", "question": "Does W help?", "contexts": [], "final_decision": None},
    ])
    items, report = load_mcq(path)
    assert [(i.id, i.answer) for i in items] == [("pubmedqa-1", "C"), ("pubmedqa-2", "B")]
    assert items[0].options == {"A": "yes", "B": "no", "C": "maybe"}
    assert items[0].context == "Background.\nResults." and items[0].dataset == "pubmedqa"
    assert "Context: Background." in format_prompt(items[0])
    assert report.skipped == {"answer not among options": 1, "missing answer": 1}
    assert [i.id for i in load_mcq(path, splits={"test"})[0]] == ["pubmedqa-1"]


def test_wilson_interval_and_table():
    acc = wilson_accuracy(7, 10)
    assert acc.accuracy == 0.7
    assert acc.ci_low == pytest.approx(0.3968, abs=1e-4) and acc.ci_high == pytest.approx(0.8922, abs=1e-4)
    table = accuracy_table(ITEMS, [True, False, True])
    assert table["toy"]["overall"].correct == 1 and table["toy"]["overall"].total == 2
    assert set(table["toy"]["subjects"]) == {"anatomy", "biology"}
    assert table["pubmedqa"]["subjects"] == {} and table["pubmedqa"]["overall"].accuracy == 1.0
    with pytest.raises(ValueError):
        accuracy_table(ITEMS, [True])


@pytest.mark.skipif(not SHARED_MCQA.is_dir(),
                    reason="../shared/data/mcqa is absent (the real data lives beside the checkout)")
def test_shared_benchmarks_load():
    headqa, report = load_mcq(SHARED_MCQA / "headqa_en_test.jsonl")
    assert report.skipped == {"has image": 67} and len(headqa) == 2742 - 67
    pubmedqa, _ = load_mcq(SHARED_MCQA / "pubmedqa_pqal.jsonl", splits={"test"})
    assert len(pubmedqa) == 500 and {i.answer for i in pubmedqa} == {"A", "B", "C"}
    for name in ("medqa_usmle_4opt_test", "medmcqa_dev", "mmlu_medical6_test"):
        items, report = load_mcq(SHARED_MCQA / f"{name}.jsonl")
        assert items and not report.skipped, name
