"""The evaluation job end to end: prediction files, local models on Ray Data, an endpoint, a
judge over real HTTP, benchmark files with defects, and the report files with their rows."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from pipelines import prompts
from pipelines.config import TinyModelConfig, load_recipe
from pipelines.eval_inputs import first_sentence, parse_benchmark
from pipelines.evaluate import evaluate, main, run
from pipelines.mcq import GENERATIVE_INSTRUCTION
from pipelines.models import build_tiny_model, train_tokenizer

SECRET = "sk-test-NEVER-IN-A-REPORT-42"
NORMAL_FINDINGS = ("The lungs are clear. Heart size is normal. No pleural effusion or pneumothorax. "
                   "The mediastinal contours are unremarkable.")
NORMAL = "No acute cardiopulmonary abnormality."
ABNORMAL = [
    ("There is a 2.1 cm nodule in the right upper lobe. No pleural effusion. Heart size is normal.",
     "Right upper lobe nodule."),
    ("Small left pleural effusion with adjacent atelectasis. Heart size is normal. No pneumothorax.",
     "Small left pleural effusion."),
    ("The heart is enlarged. Pulmonary vascular congestion is present. No focal consolidation.",
     "Cardiomegaly with vascular congestion."),
    ("Patchy opacity in the left lower lobe concerning for pneumonia. No pleural effusion seen.",
     "Left lower lobe pneumonia."),
]
PLANTED = {"id": "med-planted", "dataset": "medbench", "split": "test", "subject": "anatomy",
           "question": "Which nerve innervates the diaphragm in adult humans?",
           "options": {"A": "Phrenic nerve", "B": "Vagus nerve", "C": "Radial nerve", "D": "Ulnar nerve"},
           "answer_idx": "A", "answer_text": "Phrenic nerve"}


def mcq_row(i: int, subject: str, dataset: str) -> dict:
    return {"id": f"{dataset}-{i}", "dataset": dataset, "split": "test", "subject": subject,
            "question": f"Question {i} about {subject}: which option is correct?",
            "options": {"A": f"first {i}", "B": f"second {i}", "C": f"third {i}", "D": f"fourth {i}"},
            "answer_idx": "B", "answer_text": f"second {i}"}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write_records(folder: Path, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    columns = ["id", "exam_code", "modality", "findings", "impression", "text", "source"]
    table = pa.table({c: pa.array([r.get(c) for r in rows], pa.string()) for c in columns})
    pq.write_table(table, folder / "part-0.parquet")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    """Prepared data (records only, as pipelines.prepare lays them out), benchmark files, a model."""
    root = tmp_path_factory.mktemp("eval")
    train = [{"id": f"tr-{i}", "exam_code": "XR CHEST 2V", "findings": NORMAL_FINDINGS, "impression": NORMAL}
             for i in range(12)]
    train += [{"id": f"tr-a{i}", "exam_code": "XR CHEST 2V", "findings": f, "impression": imp}
              for i, (f, imp) in enumerate(ABNORMAL[:2])]
    planted_text = "\n".join([PLANTED["question"], *PLANTED["options"].values()])
    train.append({"id": "tr-planted", "text": planted_text})  # a benchmark question leaked into training
    test = [{"id": f"te-n{i}", "exam_code": "XR CHEST 2V", "findings": NORMAL_FINDINGS, "impression": NORMAL}
            for i in range(3)]
    test += [{"id": f"te-a{i}", "exam_code": "XR CHEST 2V", "findings": f, "impression": imp}
             for i, (f, imp) in enumerate(ABNORMAL)]
    data = root / "data"
    write_records(data / "records" / "split=train", train)
    write_records(data / "records" / "split=test", test)

    medical = [mcq_row(i, "anatomy" if i % 2 else "pharmacology", "medbench") for i in range(5)] + [PLANTED]
    defects = [{**mcq_row(90, "anatomy", "medbench"), "answer_idx": None},
               {**mcq_row(91, "anatomy", "medbench"), "options": {"A": "x", "1": "y"}},
               "{not json"]
    bench = write_jsonl(root / "medbench.jsonl", medical + defects)
    general = write_jsonl(root / "general.jsonl", [mcq_row(i, "philosophy", "mmlu") for i in range(4)])

    texts = [NORMAL_FINDINGS, NORMAL, *[t for pair in ABNORMAL for t in pair], *prompts.INSTRUCTIONS,
             prompts.SYSTEM_PROMPT, GENERATIVE_INSTRUCTION, planted_text, "Question Answer: A B C D"] * 10
    tok = train_tokenizer(texts, 512, "llama3")
    cfg = TinyModelConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=1, vocab_size=512, max_position_embeddings=512)
    model = build_tiny_model(cfg, tok)
    for name in ("model", "checkpoints/step_2/model", "checkpoints/step_10/model"):
        tok.save_pretrained(root / name)
        model.save_pretrained(root / name)
    # Loaded from disk, so that the adapter names its base directory.
    base = AutoModelForCausalLM.from_pretrained(root / "model")
    get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM",
                                    init_lora_weights=False)).save_pretrained(root / "adapter")
    return {"root": root, "data": data, "test": test, "model": root / "model", "adapter": root / "adapter",
            "bench": bench, "general": general}


def judge_answer(user: str) -> tuple[int, str]:
    candidate = user.split("CANDIDATE impression:")[1]
    if "pneumothorax" in candidate.lower():
        return 200, "I would rather not grade this one."  # unparseable: a missing judgment
    return 200, "**Score:** 7/10\nExplanation: close to the reference."


class FakeOpenAI:
    """A local OpenAI-compatible server: the judge, and a 'served model' that answers impressions
    and multiple-choice questions; a report whose findings mention 'atelectasis' always fails."""

    def __init__(self):
        self.auth: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self._send(200, {"object": "list", "data": [{"id": "served", "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.auth.append(self.headers.get("Authorization", ""))
                user = body["messages"][-1]["content"]
                if "Grade the CANDIDATE" in user:
                    status, content = judge_answer(user)
                elif GENERATIVE_INSTRUCTION in user:
                    status, content = 200, "The answer is (B)."
                elif "atelectasis" in user:
                    status, content = 500, ""
                else:
                    status, content = 200, NORMAL
                if status != 200:
                    return self._send(status, {"error": {"message": "boom"}})
                self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": content}}],
                                 "usage": {"prompt_tokens": 50, "completion_tokens": 10, "total_tokens": 60}})

            def _send(self, status: int, payload: dict):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 64

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with FakeOpenAI() as fake:
        yield fake


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def predictions_file(workspace, path: Path) -> Path:
    """A 'model' that copies normals and, for one abnormal report, states a finding never seen."""
    rows = []
    for r in workspace["test"]:
        pred = "Large right pneumothorax." if r["id"] == "te-a0" else r["impression"]
        rows.append({"id": r["id"], "prediction": pred, "reference": r["impression"], "findings": r["findings"]})
    return write_jsonl(path, rows)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_no_secret(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


# ----------------------------------------------------------------------------- prediction files


def test_predictions_scored_without_a_model(workspace, server, tmp_path, capsys, caplog):
    preds = predictions_file(workspace, tmp_path / "mine.jsonl")
    out = tmp_path / "out"
    code = main(["--predictions", f"mine={preds}", "--data", str(workspace["data"]), "--output", str(out),
                 "--tasks", "generation", "judge", "grounding", "--set", f"evaluation.judge.base_url={server.url}",
                 "--set", "evaluation.judge.model=judge-x", "--set", "evaluation.judge.max_retries=0"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    rows = {r["model"]: r for r in report["generation"]}
    assert set(rows) == {"mine", "baseline: most frequent impression", "baseline: first findings sentence"}
    n = len(workspace["test"])
    assert rows["mine"]["n"] == n and 0 < rows["mine"]["rouge_l"] < 1
    assert rows["mine"]["abnormal"]["n"] == len(ABNORMAL)
    # The constant baseline is the training mode; it is perfect on normals and poor on abnormals.
    assert rows["baseline: most frequent impression"]["abnormal"]["rouge_l"] < 0.2
    assert 0 < rows["mine"]["bertscore_f1"] <= 1
    assert report["generation_setup"]["bertscore"]["num_layers"] >= 1

    judge = report["judge"]
    assert judge["summary"]["missing"] == 1  # the garbage answer about the pneumothorax
    assert judge["summary"]["missing_reasons"] == {"no score in answer": 1}
    # Identical prompts (a normal reference with the constant answer) are sent once.
    assert judge["summary"]["items"] == 3 * n and 0 < judge["summary"]["usage"]["calls"] < 3 * n
    assert judge["summary"]["cost_usd"] > 0
    judged = {r["model"]: r for r in judge["rows"]}
    assert judged["mine"]["n"] == n - 1 and judged["mine"]["missing"] == 1 and judged["mine"]["mean"] == 7.0
    assert any(p["task"] == "judge" and "missing" in p["message"] for p in report["problems"])

    per_example = {(r["model"], r["id"]): r for r in read_jsonl(out / "predictions.jsonl")}
    invented = per_example[("mine", "te-a0")]
    assert invented["grounding_flagged"] and "pneumothorax" in invented["grounding_unsupported"]
    assert invented["judge_score"] is None and invented["judge_missing"] == "no score in answer"
    assert not per_example[("mine", "te-a1")]["grounding_flagged"]
    grounding = {r["model"]: r for r in report["grounding"]["rows"]}
    assert grounding["mine"]["examples_flagged"] == 1 and "reference impressions" in grounding

    md = (out / "report.md").read_text()
    assert "## Impressions (Table 1)" in md and "| mine | 7 |" in md
    assert "encoder `sentence-transformers/all-MiniLM-L6-v2`, layer 6 of 6" in md
    assert "## Impressions: abnormal subset" in md and "## LLM judge" in md and "## What is missing" in md
    html = (out / "report.html").read_text()
    assert "<table>" in html and 'src="plots/generation.png"' in html
    assert (out / "plots" / "generation.png").stat().st_size > 1000
    assert all(a == f"Bearer {SECRET}" for a in server.auth)
    assert_no_secret(out)
    assert SECRET not in capsys.readouterr().out + caplog.text

    # A rerun costs nothing: every judgment comes from the cache.
    main(["--predictions", f"mine={preds}", "--data", str(workspace["data"]), "--output", str(out), "--tasks",
          "judge", "--set", f"evaluation.judge.base_url={server.url}", "--set", "evaluation.judge.model=judge-x"])
    usage = json.loads((out / "report.json").read_text())["judge"]["summary"]["usage"]
    assert usage["calls"] == 0 and usage["cache_hits"] == 3 * n


def test_judge_down_is_reported_and_the_rest_goes_on(workspace, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    preds = predictions_file(workspace, tmp_path / "mine.jsonl")
    out = tmp_path / "out"
    main(["--predictions", str(preds), "--output", str(out), "--tasks", "judge", "grounding",
          "--set", f"evaluation.judge.base_url={closed_port_url()}", "--set", "evaluation.judge.max_retries=0"])
    report = json.loads((out / "report.json").read_text())
    summary = report["judge"]["summary"]
    assert summary["scored"] == 0 and summary["missing_reasons"] == {"connection error": summary["items"]}
    assert all(r["mean"] is None for r in report["judge"]["rows"])
    assert report["grounding"]["rows"][0]["model"] == "baseline: most frequent impression"
    # No training data named: the constant comes from the references, and the report says so.
    messages = " ".join(p["message"] for p in report["problems"])
    assert "REFERENCE impression (optimistic)" in messages and "connection error" in messages
    assert "n/a" in (out / "report.md").read_text()
    assert_no_secret(out)


@pytest.mark.parametrize("case, expected", [
    ("unknown-task", "--tasks summarize: unknown"),
    ("bad-model", "expected NAME=PATH_OR_ENDPOINT"),
    ("no-reference", "line 2: missing or empty 'reference'"),
    ("empty-test-split", "the test split is empty"),
    ("nothing", "nothing to evaluate"),
    ("unusable-benchmarks", "missing: cannot read"),
])
def test_user_mistakes_end_in_one_line(case, expected, workspace, tmp_path, capsys):
    argv = ["--output", str(tmp_path / "out")]
    if case == "unknown-task":
        argv += ["--predictions", str(predictions_file(workspace, tmp_path / "p.jsonl")), "--tasks", "summarize"]
    elif case == "bad-model":
        argv += ["--model", "just-a-path"]
    elif case == "no-reference":
        argv += ["--predictions", str(write_jsonl(tmp_path / "p.jsonl", [
            {"id": "1", "prediction": "a", "reference": "b"}, {"id": "2", "prediction": "a"}]))]
    elif case == "unusable-benchmarks":
        no_answers = write_jsonl(tmp_path / "bad.jsonl", [{**mcq_row(1, "x", "bad"), "answer_idx": "Z"}])
        argv += ["--predictions", str(predictions_file(workspace, tmp_path / "p.jsonl")), "--tasks", "mcq",
                 "--set", f"evaluation.mcq_files=[{tmp_path / 'missing.jsonl'}, {no_answers}]"]
    elif case == "empty-test-split":
        data = tmp_path / "data"
        write_records(data / "records" / "split=test", [])
        argv += ["--model", f"m={workspace['model']}", "--data", str(data), "--tasks", "generation"]
    with pytest.raises(SystemExit) as exit_info:
        run(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and expected in err
    if case == "unusable-benchmarks":
        assert "bad: no usable questions" in err


def test_remote_judge_without_a_key_is_reported(workspace, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    out = tmp_path / "out"
    main(["--predictions", str(predictions_file(workspace, tmp_path / "p.jsonl")), "--output", str(out),
          "--tasks", "judge", "grounding", "--set", "evaluation.judge.base_url=https://judge.invalid/v1"])
    report = json.loads((out / "report.json").read_text())
    assert report["judge"] is None and report["grounding"]
    assert any(p["task"] == "judge" and "OPENAI_API_KEY is not set" in p["message"] for p in report["problems"])


def test_small_parsers():
    assert first_sentence("Heart is normal. Lungs are clear.") == "Heart is normal."
    b = parse_benchmark("/x/pubmedqa_pqal.jsonl#test")
    assert (b.name, b.splits) == ("pubmedqa_pqal", ("test",))


# ----------------------------------------------------------------------------- models


def recipe_for(workspace, judge_url: str, *extra: str):
    return load_recipe(None, [
        f"evaluation.mcq_files=[{workspace['bench']}]", f"evaluation.forgetting_file={workspace['general']}",
        "evaluation.mcq_max_new_tokens=4", "evaluation.max_new_tokens=6", "evaluation.batch_size=8",
        "evaluation.cpus_per_actor=0.5", f"evaluation.judge.base_url={judge_url}", "model.dtype=float32", *extra])


def test_local_adapter_and_endpoint_models_every_task(workspace, server, ray_session, tmp_path):
    checkpoints = workspace["root"] / "checkpoints" / "step_*"
    recipe = recipe_for(workspace, server.url, f"evaluation.forgetting_checkpoints=[{checkpoints}]")
    out = tmp_path / "out"
    models = [f"base={workspace['model']}", f"tuned={workspace['adapter']}", f"served={server.url}"]
    report = evaluate(recipe, models, workspace["data"], out,
                      tasks=["generation", "judge", "grounding", "mcq", "decontamination", "forgetting"])
    assert [m["kind"] for m in report["models"]] == ["local", "adapter", "endpoint"]
    assert report["models"][2]["location"] == server.url
    rows = {r["model"]: r for r in report["generation"]}
    assert set(rows) == {"base", "tuned", "served", "baseline: most frequent impression",
                         "baseline: first findings sentence"}
    assert rows["base"]["n"] == rows["tuned"]["n"] == len(workspace["test"])
    assert rows["served"]["missing"] == 1  # the report that made the endpoint answer HTTP 500
    problems = " ".join(p["message"] for p in report["problems"])
    assert "served: 1 of 17 answers missing {'HTTP 500': 1}" in problems and "scored generatively only" in problems

    mcq = {(r["model"], r["benchmark"], r["mode"]): r for r in report["mcq"]["rows"]}
    for model, mode in [("base", "loglik"), ("base", "generative"), ("tuned", "loglik"), ("served", "generative")]:
        row = mcq[(model, "medbench", mode)]
        assert row["total"] == 6 and row["ci_low"] <= row["accuracy"] <= row["ci_high"]
        assert set(row["subjects"]) == {"anatomy", "pharmacology"}
    assert ("served", "medbench", "loglik") not in mcq
    assert mcq[("served", "medbench", "generative")]["accuracy"] == pytest.approx(5 / 6)  # "B"; the planted is "A"
    assert report["mcq"]["files"][0]["skipped"] == {"missing answer": 1, "unknown option letter": 1,
                                                    "invalid json": 1}

    decontam = report["decontamination"]
    assert decontam["benchmarks"]["medbench"]["flagged"] == 1  # the planted question
    assert decontam["benchmarks"]["held-out reports"]["flagged"] >= 3  # normal reports repeat training ones
    clean = {(r["model"], r["mode"], r["benchmark"]): r for r in decontam["accuracy"]}
    assert clean[("served", "generative", "medbench")]["accuracy_clean"] == 1.0
    flagged = [r for r in read_jsonl(out / "decontamination.jsonl") if r["id"] == "med-planted"]
    assert flagged[0]["flagged"] and flagged[0]["nearest_train_id"] == "tr-planted"

    forgetting = report["forgetting"]
    assert forgetting["reference_model"] == "base"
    assert {(r["model"], r["mode"]) for r in forgetting["rows"]} == {
        ("base", "loglik"), ("base", "generative"), ("tuned", "loglik"), ("tuned", "generative"),
        ("served", "generative")}
    assert [c["checkpoint"] for c in forgetting["checkpoints"] if c["mode"] == "loglik"] == [
        "checkpoints/step_2", "checkpoints/step_10"]
    assert forgetting["checkpoints"][0]["medical"]["accuracy"] is not None

    md = (out / "report.md").read_text()
    for heading in ("Impressions (Table 1)", "LLM judge", "Grounding in the findings", "Multiple-choice benchmarks",
                    "Decontamination", "Forgetting of general knowledge"):
        assert f"## {heading}" in md
    assert {p.name for p in (out / "plots").iterdir()} == {"generation.png", "mcq.png", "forgetting.png",
                                                          "decontamination.png"}
    assert (out / "mcq.jsonl").is_file() and (out / "report.html").is_file()
    assert_no_secret(out)
