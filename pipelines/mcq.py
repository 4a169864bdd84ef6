"""Multiple-choice medical benchmarks: loading, zero-shot scoring and accuracy.

Two scoring modes:
- log-likelihood (lm-evaluation-harness style): each option is a continuation of one zero-shot
  prompt; the prediction is the option with the highest summed token log-probability (`acc`),
  or the highest log-probability per character of the option string (`acc_norm`); unlike the
  harness's default, the tokenizer's BOS token is prepended to every context;
- generative: greedy decoding, then the answer-extraction chain for models not tuned to the
  answer format (option letter, else option text, else the Levenshtein-closest option to the
  first output line), or exact match for tuned models. Any `generate_fn(prompts) -> outputs`
  works, so an OpenAI-compatible endpoint can be scored too.

Accuracy comes per benchmark and per subject with a 95 % Wilson interval.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein
from rapidfuzz.utils import default_process
from scipy import stats

log = logging.getLogger(__name__)

PUBMEDQA_OPTIONS = {"A": "yes", "B": "no", "C": "maybe"}
GENERATIVE_INSTRUCTION = "Answer the following multiple-choice question with the letter of the correct option."
_LETTER = re.compile(r"^[A-Z]$")

GenerateFn = Callable[[list[str]], list[str]]
Target = Literal["letter", "text"]


@dataclass(frozen=True)
class MCQItem:
    id: str
    dataset: str
    subject: str | None
    question: str
    options: dict[str, str]  # letter -> text, in letter order
    answer: str  # letter
    context: str | None = None  # PubMedQA abstract

    def as_text(self) -> str:
        """Question, context and options as one string (for decontamination)."""
        parts = [self.context or "", self.question, *self.options.values()]
        return "\n".join(p for p in parts if p)


@dataclass
class LoadReport:
    path: str
    kept: int = 0
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> count


# --- loading -----------------------------------------------------------------------------------


def load_mcq(path: str | Path, splits: Collection[str] | None = None) -> tuple[list[MCQItem], LoadReport]:
    """Load a benchmark file in the shared schema, or PubMedQA's own schema.

    Shared schema: id, dataset, split, subject, question, options {letter: text}, answer_idx
    (letter), answer_text. Questions flagged `has_image` (HEAD-QA) are excluded. PubMedQA rows
    (question, contexts, final_decision) become options A yes / B no / C maybe with the joined
    contexts as `context`. Rows with a missing answer, unknown option letters or other defects
    are skipped and counted by reason in the report; `splits` keeps only rows of those splits.
    """
    report = LoadReport(str(path))
    items: list[MCQItem] = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                report.skipped["invalid json"] += 1
                continue
            if splits is not None and row.get("split") not in splits:
                continue
            parsed = _parse_pubmedqa(row, line_no) if "final_decision" in row else _parse_shared(row, line_no)
            if isinstance(parsed, str):
                report.skipped[parsed] += 1
            else:
                items.append(parsed)
    report.kept = len(items)
    if report.skipped:
        log.warning("%s: kept %d, skipped %s", Path(path).name, report.kept, dict(report.skipped))
    return items, report


def _parse_shared(row: dict, line_no: int) -> MCQItem | str:
    """An item, or the reason the row is skipped."""
    if row.get("has_image"):
        return "has image"
    question, options, answer = row.get("question"), row.get("options"), row.get("answer_idx")
    if not isinstance(question, str) or not question.strip():
        return "missing question"
    if not isinstance(options, dict) or len(options) < 2:
        return "fewer than two options"
    if not all(isinstance(k, str) and _LETTER.match(k) for k in options):
        return "unknown option letter"
    if not all(isinstance(v, str) and v.strip() for v in options.values()):
        return "empty option text"
    if answer is None or answer == "":
        return "missing answer"
    if answer not in options:
        return "answer not among options"
    return MCQItem(
        id=str(row.get("id") or f"line-{line_no}"),
        dataset=str(row.get("dataset") or "unknown"),
        subject=row.get("subject"),
        question=question.strip(),
        options={k: options[k].strip() for k in sorted(options)},
        answer=answer,
    )


def _parse_pubmedqa(row: dict, line_no: int) -> MCQItem | str:
    decision, question = row.get("final_decision"), row.get("question")
    if not isinstance(question, str) or not question.strip():
        return "missing question"
    if not decision:
        return "missing answer"
    letters = {text: letter for letter, text in PUBMEDQA_OPTIONS.items()}
    if str(decision).lower() not in letters:
        return "answer not among options"
    contexts = row.get("contexts") or []
    return MCQItem(
        id=f"pubmedqa-{row.get('pmid') or line_no}",
        dataset="pubmedqa",
        subject=None,
        question=question.strip(),
        options=dict(PUBMEDQA_OPTIONS),
        answer=letters[str(decision).lower()],
        context="\n".join(contexts) if isinstance(contexts, list) else str(contexts),
    )


# --- prompts -----------------------------------------------------------------------------------


def format_prompt(item: MCQItem, list_options: bool = True) -> str:
    """Zero-shot prompt ending in "Answer:" (the lm-evaluation-harness layout)."""
    lines = [f"Context: {item.context}"] if item.context else []
    lines.append(f"Question: {item.question}")
    if list_options:
        lines += [f"{letter}. {text}" for letter, text in item.options.items()]
    lines.append("Answer:")
    return "\n".join(lines)


def option_continuations(item: MCQItem, target: Target) -> dict[str, str]:
    """letter -> continuation: " B" when options are listed, else " <option text>"."""
    return {letter: f" {letter if target == 'letter' else text}" for letter, text in item.options.items()}


# --- log-likelihood scoring --------------------------------------------------------------------


@dataclass(frozen=True)
class LoglikScore:
    item_id: str
    logliks: dict[str, float]  # letter -> summed log-probability of its continuation
    pred: str  # argmax of logliks (acc)
    pred_norm: str  # argmax of logliks per character of the option string (acc_norm)
    correct: bool
    correct_norm: bool


def _encode(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    # Models are trained with BOS; prepend it ourselves so tokenizers that also append EOS
    # cannot put it between the context and the continuation.
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids as lm-evaluation-harness splits them: encode the whole
    string and cut at the context's length, so merges across the boundary stay as in the
    whole text; trailing context spaces move to the continuation."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = _encode(tokenizer, context + continuation)
    n_context = len(_encode(tokenizer, context))
    return whole[:n_context], whole[n_context:]


@torch.no_grad()
def continuation_logliks(model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 8,
                         max_length: int | None = None) -> list[float]:
    """Summed log p(continuation | context) for each (context, continuation) pair.

    Batches are left-padded with explicit position ids (so every row sees the same positions as
    when run alone), longest first, and only the continuation positions' logits are kept.
    Contexts longer than `max_length` are cut from the left.
    """
    max_length = max_length or getattr(model.config, "max_position_embeddings", 2048)
    encoded = []
    for context, continuation in pairs:
        ctx, cont = encode_pair(tokenizer, context, continuation)
        if not cont:
            raise ValueError(f"empty continuation for {continuation!r}")
        encoded.append(((ctx + cont)[-(max_length + 1):], len(cont)))
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    results = [0.0] * len(encoded)
    for start in range(0, len(order), batch_size):
        batch = [encoded[i] for i in order[start:start + batch_size]]
        width = max(len(seq) for seq, _ in batch) - 1
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (seq, _) in enumerate(batch):
            inputs = seq[:-1]
            input_ids[row, width - len(inputs):] = torch.tensor(inputs)
            mask[row, width - len(inputs):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        keep = max(n for _, n in batch)
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                       position_ids=positions.to(device), logits_to_keep=keep).logits
        for row, (seq, n_cont) in enumerate(batch):
            logprobs = torch.log_softmax(logits[row, keep - n_cont:].float(), dim=-1)
            targets = torch.tensor(seq[-n_cont:], device=logprobs.device)
            results[order[start + row]] = logprobs.gather(-1, targets[:, None]).sum().item()
    return results


def score_loglik(model, tokenizer, items: Sequence[MCQItem], target: Target = "letter",
                 batch_size: int = 8) -> list[LoglikScore]:
    """Zero-shot log-likelihood scoring of every option of every item (acc and acc_norm)."""
    pairs, owners = [], []
    for item in items:
        prompt = format_prompt(item, list_options=target == "letter")
        for letter, continuation in option_continuations(item, target).items():
            pairs.append((prompt, continuation))
            owners.append((item.id, letter))
    logliks = continuation_logliks(model, tokenizer, pairs, batch_size=batch_size)
    per_item: dict[str, dict[str, float]] = defaultdict(dict)
    for (item_id, letter), value in zip(owners, logliks):
        per_item[item_id][letter] = value
    scores = []
    for item in items:
        ll = per_item[item.id]
        lengths = {k: len(c.strip()) for k, c in option_continuations(item, target).items()}
        pred = max(ll, key=ll.get)
        pred_norm = max(ll, key=lambda k: ll[k] / lengths[k])
        scores.append(LoglikScore(item.id, ll, pred, pred_norm, pred == item.answer, pred_norm == item.answer))
    return scores


# --- generative scoring ------------------------------------------------------------------------


@dataclass(frozen=True)
class Extraction:
    letter: str | None
    method: Literal["letter", "text", "levenshtein", "exact", "none"]


def extract_answer(output: str, options: Mapping[str, str], exact: bool = False) -> Extraction:
    """Map a free-text answer to an option letter.

    exact=True (models tuned to the format): the output must be the letter itself.
    Otherwise the chain: (1) an option letter stated as the answer ("B", "(B)", "B. ...",
    "Answer: B", "the correct option is B"); (2) an option text found in the output, case-
    insensitively (the longest wins, so "X and Y" beats "X"); (3) the option whose text is
    closest by Levenshtein distance to the first non-empty output line.
    """
    text = output.strip()
    if exact:
        letter = text.rstrip(".").strip()
        return Extraction(letter, "exact") if letter in options else Extraction(None, "none")
    letters = "".join(re.escape(k) for k in options)
    plain = re.sub(r"[*_#`]", "", text)
    first_line = next((ln.strip() for ln in plain.splitlines() if ln.strip()), "")
    stated = re.search(rf"\b(?i:answer|option|choice)(?:\s+is)?\s*[:\-]?\s*\(?([{letters}])(?![A-Za-z0-9])", plain)
    leading = re.match(rf"\(?([{letters}])(?:[.):]|\s+-|\s*$)", first_line)
    for match in (stated, leading):
        if match:
            return Extraction(match.group(1), "letter")

    haystack = " ".join(plain.casefold().split())
    found = []
    for letter, option in options.items():
        needle = " ".join(option.casefold().strip(" .;:").split())
        hit = re.search(rf"(?<!\w){re.escape(needle)}(?!\w)", haystack) if needle else None
        if hit:
            found.append((-len(needle), hit.start(), letter))
    if found:
        return Extraction(min(found)[2], "text")

    if first_line:
        best = process.extractOne(first_line, dict(options), scorer=Levenshtein.distance,
                                  processor=default_process)
        return Extraction(best[2], "levenshtein")
    return Extraction(None, "none")


@dataclass(frozen=True)
class GenerativeScore:
    item_id: str
    output: str
    pred: str | None
    method: str
    correct: bool


def generative_prompt(item: MCQItem) -> str:
    return f"{GENERATIVE_INSTRUCTION}\n\n{format_prompt(item)}"


def score_generative(items: Sequence[MCQItem], generate_fn: GenerateFn, batch_size: int = 32,
                     exact: bool = False) -> list[GenerativeScore]:
    """Generate an answer per item with `generate_fn` (called per batch) and extract the letter."""
    scores = []
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        outputs = generate_fn([generative_prompt(item) for item in batch])
        if len(outputs) != len(batch):
            raise ValueError(f"generate_fn returned {len(outputs)} outputs for {len(batch)} prompts")
        for item, output in zip(batch, outputs):
            got = extract_answer(output, item.options, exact=exact)
            scores.append(GenerativeScore(item.id, output, got.letter, got.method, got.letter == item.answer))
    return scores


def hf_generate_fn(model, tokenizer, max_new_tokens: int = 256, chat: bool = False) -> GenerateFn:
    """Greedy decoding with a Hugging Face causal LM; `chat` wraps each prompt in the
    tokenizer's chat template as one user turn."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device

    def encode(prompt: str) -> list[int]:
        if not chat:
            return _encode(tokenizer, prompt)
        templated = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                  add_generation_prompt=True, tokenize=False)
        return tokenizer(templated, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def generate(prompts: list[str]) -> list[str]:
        encoded = [encode(p) for p in prompts]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, ids in enumerate(encoded):  # left padding: generation continues every row's end
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            mask[row, width - len(ids):] = 1
        out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
        return tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)

    return generate


# --- accuracy ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Accuracy:
    correct: int
    total: int
    accuracy: float
    ci_low: float  # 95 % Wilson interval
    ci_high: float


def wilson_accuracy(correct: int, total: int, confidence: float = 0.95) -> Accuracy:
    ci = stats.binomtest(correct, total).proportion_ci(confidence_level=confidence, method="wilson")
    return Accuracy(correct, total, correct / total, float(ci.low), float(ci.high))


def accuracy_table(items: Sequence[MCQItem], correct: Sequence[bool]) -> dict[str, dict]:
    """{dataset: {"overall": Accuracy, "subjects": {subject: Accuracy}}}; items without a
    subject count only in "overall"."""
    if len(items) != len(correct):
        raise ValueError(f"{len(correct)} results for {len(items)} items")
    overall: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # dataset -> [correct, total]
    by_subject: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for item, ok in zip(items, correct):
        tallies = [overall[item.dataset]]
        if item.subject:
            tallies.append(by_subject[item.dataset][item.subject])
        for tally in tallies:
            tally[0] += bool(ok)
            tally[1] += 1
    table = {}
    for dataset in sorted(overall):
        subjects = by_subject.get(dataset, {})
        table[dataset] = {
            "overall": wilson_accuracy(*overall[dataset]),
            "subjects": {s: wilson_accuracy(*subjects[s]) for s in sorted(subjects)},
        }
    return table
