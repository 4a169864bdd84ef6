"""The Ray Serve app over real HTTP on 127.0.0.1, driven by the official openai client."""

from __future__ import annotations

import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from pipelines import prompts
from pipelines.config import TinyModelConfig, load_recipe
from pipelines.models import build_tiny_model, train_tokenizer

FINDINGS = "There is a 2.1 cm nodule in the right upper lobe. No pleural effusion."
BASE, FULL, ADAPTERS = "medray-base", "ft-full", ("reports", "followup")
TINY = TinyModelConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, vocab_size=512, max_position_embeddings=256)

# Replicas read the API key from their environment, which Ray workers inherit from the process
# that starts Ray: set it at import time, before the test session starts its Ray.
API_KEY_ENV = "MEDRAY_TEST_API_KEY"
os.environ[API_KEY_ENV] = KEY = f"key-{uuid.uuid4().hex}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_adapter(tok, seed: int, out: Path) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(build_tiny_model(TINY, tok), LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM", init_lora_weights=False))
    model.save_pretrained(out)


def save_turn_ender(tok, out: Path) -> None:
    """A "fully fine-tuned" model that ends its turn at once: every token embeds the same, the
    layers add nothing, and only the end-of-turn token has a positive logit."""
    model = build_tiny_model(TINY, tok)
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(1.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[tok.convert_tokens_to_ids(prompts.EOT)] = 1.0
    tok.save_pretrained(out)
    model.save_pretrained(out)


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory):
    from ray import serve

    from serve.app import app

    root = tmp_path_factory.mktemp("serve")
    tok = train_tokenizer([FINDINGS, *prompts.INSTRUCTIONS, prompts.SYSTEM_PROMPT] * 20, 512, "llama3")
    tok.save_pretrained(root / "base")
    build_tiny_model(TINY, tok).save_pretrained(root / "base")
    for seed, name in enumerate(ADAPTERS, start=1):
        save_adapter(tok, seed, root / name)
    save_turn_ender(tok, root / FULL)
    # float32 keeps batched and single decoding to the same argmax; one adapter per replica
    # makes every switch between the two adapters an eviction.
    recipe = load_recipe(None, ["serve.max_new_tokens_limit=64", "serve.max_adapters_per_replica=1",
                                "serve.cpus_per_replica=0.5", "serve.ingress_cpus=0.1", "model.dtype=float32",
                                f"serve.api_key_env={API_KEY_ENV}"])
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app({"recipe": recipe.model_dump(mode="json"), "model": str(root / "base"),
                   "adapters": {name: str(root / name) for name in ADAPTERS}, "models": {FULL: str(root / FULL)}}),
              name="medray-test", route_prefix="/")
    yield {"url": f"http://127.0.0.1:{port}", "tokenizer": tok}
    serve.shutdown()


def client(server, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=key, max_retries=0)


def post(server, path: str, **kwargs) -> httpx.Response:
    return httpx.post(server["url"] + path, headers={"authorization": f"Bearer {KEY}"}, timeout=60, **kwargs)


def chat(server, model: str, content: str, **kwargs):
    return client(server).chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                                  temperature=0, **kwargs)


def test_health_models_and_api_key(server):
    assert httpx.get(server["url"] + "/healthz").json() == {"status": "ok"}
    assert [m.id for m in client(server).models.list().data] == [BASE, FULL, *sorted(ADAPTERS)]
    with pytest.raises(openai.AuthenticationError):
        client(server, "not-the-key").models.list()
    # Without a key nothing else is looked at, not even whether the body is JSON.
    r = httpx.post(server["url"] + "/v1/chat/completions", content=b"{not json")
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]


def test_adapter_answers_from_the_training_prompt(server):
    messages = prompts.impression_messages(FINDINGS, "CTCHWO")
    reply = client(server).chat.completions.create(model="reports", messages=messages, max_tokens=12, temperature=0)
    assert reply.usage.prompt_tokens == len(prompts.prompt_ids(server["tokenizer"], messages))
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 12
    # The convenience route builds the same prompt from findings and exam code.
    r = post(server, "/v1/impressions", json={"model": "reports", "findings": FINDINGS, "exam_code": "CTCHWO",
                                              "max_tokens": 12})
    assert r.json()["impression"] == reply.choices[0].message.content
    assert r.json()["usage"]["prompt_tokens"] == reply.usage.prompt_tokens
    base = client(server).chat.completions.create(model=BASE, messages=messages, max_tokens=12, temperature=0)
    assert base.choices[0].message.content != reply.choices[0].message.content


def test_streaming_is_incremental_and_equals_the_whole_answer(server):
    c, question = client(server), [{"role": "user", "content": "Summarize: no acute findings."}]
    whole = c.chat.completions.create(model=BASE, messages=question, max_tokens=64, temperature=0)
    start, arrivals, pieces = time.perf_counter(), [], []
    stream = c.chat.completions.create(model=BASE, messages=question, max_tokens=64, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.perf_counter() - start)
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == whole.choices[0].message.content
    assert usage.completion_tokens == whole.usage.completion_tokens == 64
    # Tokens arrive while the answer is being written, not all at the end.
    assert len(pieces) > 10 and arrivals[0] < arrivals[-1] / 2
    text = c.completions.create(model="reports", prompt="Findings: nodule.", max_tokens=20, temperature=0)
    streamed = c.completions.create(model="reports", prompt="Findings: nodule.", max_tokens=20, temperature=0,
                                    stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == text.choices[0].text


def test_mixed_requests_in_one_batch_keep_their_own_settings(server):
    requests = [dict(model=BASE, content="a", max_tokens=5), dict(model=BASE, content="bb", max_tokens=17),
                dict(model=BASE, content="a", max_tokens=9, temperature=1.0, seed=7),
                dict(model=BASE, content="ccc", max_tokens=30, temperature=0.8, top_p=0.5, seed=3),
                dict(model="reports", content="a", max_tokens=11), dict(model=FULL, content="a", max_tokens=8)]

    def ask(kwargs):
        kwargs = dict(kwargs)
        model, content = kwargs.pop("model"), kwargs.pop("content")
        reply = client(server).chat.completions.create(
            model=model, messages=[{"role": "user", "content": content}], **{"temperature": 0, **kwargs})
        return reply.choices[0].message.content, reply.usage.completion_tokens

    alone = [ask(r) for r in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(ask, requests * 2))
    assert together == alone * 2
    assert [n for _, n in alone] == [5, 17, 9, 30, 11, 0]


def test_stop_strings_and_the_end_of_turn_token_end_the_answer(server):
    whole = chat(server, BASE, "Findings: nodule.", max_tokens=30).choices[0].message.content
    stop = whole[len(whole) // 2:len(whole) // 2 + 3]
    cut = chat(server, BASE, "Findings: nodule.", max_tokens=30, stop=[stop, "never-said"])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == whole[:whole.index(stop)].strip()
    # The fully fine-tuned model, served as its own id, ends its turn at once.
    ended = chat(server, FULL, "Findings: nodule.", max_tokens=30)
    assert (ended.choices[0].finish_reason, ended.usage.completion_tokens, ended.choices[0].message.content) == \
        ("stop", 0, "")


def test_adapters_evicted_under_load_still_answer_right(server):
    # One adapter fits per replica: alternating requests evict and reload while others decode.
    def ask(model):
        return chat(server, model, "Impression?", max_tokens=16).choices[0].message.content

    expected = {model: ask(model) for model in ADAPTERS}
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, list(ADAPTERS) * 4))
    assert answers == [expected[m] for m in ADAPTERS] * 4


@pytest.mark.parametrize("body, status, words", [
    ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "does not exist"),
    ({"model": BASE, "messages": []}, 400, "messages"),
    ({"model": BASE, "messages": [{"role": "user", "content": "x"}], "max_tokens": 10_000}, 400, "max_tokens"),
    ({"model": BASE, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": BASE, "messages": [{"role": "user", "content": "word " * 400}], "max_tokens": 8}, 400,
     "context length"),
    ({"model": BASE, "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ({"model": BASE, "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n:"),
    ({"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
    ([1, 2], 400, "body"),
])
def test_bad_requests_get_clear_4xx(server, body, status, words):
    r = post(server, "/v1/chat/completions", json=body)
    assert r.status_code == status
    assert words in r.json()["error"]["message"]


def test_malformed_json_is_a_400(server):
    r = post(server, "/v1/chat/completions", content=b'{"model": "medray-base", "messages": [')
    assert r.status_code == 400 and "Invalid JSON" in r.json()["error"]["message"]


def test_request_text_never_reaches_the_logs(server):
    import ray

    marker = f"PHI-{uuid.uuid4().hex[:12]}"
    chat(server, "reports", f"Patient {marker} has a nodule.", max_tokens=4)
    post(server, "/v1/chat/completions", json={"model": BASE, "messages": [{"role": "robot", "content": marker}]})
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    time.sleep(1)  # log lines are flushed asynchronously
    leaked = [p.name for p in logs.rglob("*") if p.is_file() and marker in p.read_text(errors="ignore")]
    assert not leaked
