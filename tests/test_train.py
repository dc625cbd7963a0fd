"""Training from scratch (moe_build.train) and its quality bench, on the "cpu-test" preset: seconds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

from bench import chat_quality, model_quality
from moe_build import instruct, train
from moe_build.checkpoint import IM_END, IM_START
from moe_core.engine import FinishReason, GenerationRequest, SamplingParams
from moe_core.loader import inspect_model, load_model
from moe_core.torch_engine import TorchEngine
from tests.conftest import private_stack

STEPS = 40
INSTRUCT_STEPS = 60


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, train.TrainingReport]:
    out = tmp_path_factory.mktemp("train") / "model"
    report = train.train(
        out, device="cpu", size="cpu-test", max_steps=STEPS, instruct_steps=INSTRUCT_STEPS, progress=False
    )
    return out, report


def test_loss_goes_down_and_held_out_is_evaluated(trained: tuple[Path, train.TrainingReport]) -> None:
    _, report = trained
    losses = report.train_losses
    assert report.steps == STEPS == len(losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert [e.step for e in report.evaluations] == [0, 10, 20, 30, 40]
    assert report.best is not None and report.best.mixed < report.evaluations[0].mixed
    assert report.best.code > 0 and report.best.prose > 0
    assert report.corpus["held_out"]["code_tokens"] > 0 and report.corpus["train"]["prose_tokens"] > 0


def test_checkpoint_loads_and_generates(trained: tuple[Path, train.TrainingReport]) -> None:
    path = trained[0]
    info = inspect_model(path)
    assert (info.arch, info.num_experts, info.experts_per_token) == ("mixtral", 8, 2)
    record = json.loads((path / "training.json").read_text())
    assert record["steps"] == STEPS and record["split"]["held_out"]["code"]
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []
    model, tokenizer = load_model(path)
    ids = tokenizer("def main():\n", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 8


def test_refuses_to_overwrite_without_asking(trained: tuple[Path, train.TrainingReport]) -> None:
    with pytest.raises(FileExistsError):
        train.train(trained[0], device="cpu", size="cpu-test", max_steps=1, progress=False)


def test_split_is_by_package() -> None:
    assert train.unit_of("asyncio/events.py") == train.unit_of("asyncio/base_events.py") == "stdlib:asyncio"
    assert train.unit_of("site:pip/_vendor/urllib3/util.py") == train.unit_of("site:urllib3/util.py")
    assert train.unit_of("os.py") == "stdlib:os"
    names = [f"site:pkg{i}/mod.py" for i in range(2000)]
    held = [n for n in names if train.is_held_out(n)]
    assert 0.02 < len(held) / len(names) < 0.08
    assert all(train.is_held_out(n.replace("mod.py", "other.py")) for n in held)


def test_parse_checks() -> None:
    body = "    return x + 1\n\ndef g"  # cut mid-line: the partial "def g" is dropped
    assert model_quality.parse_checks("def f(x):", body, finished=False) == (True, True)
    nested = "    if x:\n        return 1\n    return 2\n"
    assert model_quality.parse_checks("def f(x):", nested, finished=True) == (True, False)
    assert model_quality.parse_checks("def f(x):", "    retu", finished=False) == (False, False)
    dangling = "    return 1\ndef g():\n"  # a block left open at the cut is not completed
    assert model_quality.parse_checks("def f(x):", dangling, finished=False) == (False, False)
    method = "        return self\n\nx = 1\n"  # a method may be followed by module-level code
    assert model_quality.parse_checks("    def f(self):", method, finished=True) == (True, True)


def test_quality_bench_runs(trained: tuple[Path, train.TrainingReport]) -> None:
    q = model_quality.measure(
        trained[0],
        headers=3,
        sequences=4,
        baseline_random=True,
        held_out_bytes=300_000,
        unigram_bytes=300_000,
    )
    assert q.headers == 3 and 0 <= q.strict <= q.lenient <= 1
    assert set(q.perplexity) == {"model", "unigram", "random"}
    assert q.perplexity["model"]["code"] < q.perplexity["random"]["code"]
    assert len(q.jsd) == 2 and all(0 <= d <= 1 for d in q.jsd)
    for use in q.expert_use.values():
        assert torch.allclose(torch.tensor(use).sum(dim=-1), torch.ones(2), atol=1e-3)


def test_per_layer_balance_loss() -> None:
    """1.0 for even routing; large for a layer that sends every token to the same two experts, even when
    another layer makes up for it — which the pooled loss cannot see."""
    tokens, experts = 64, 8
    even = torch.zeros(tokens, experts)
    collapsed = torch.full((tokens, experts), -20.0)
    collapsed[:, :2] = 10.0
    mirrored = torch.full((tokens, experts), -20.0)
    mirrored[:, 2:] = 10.0  # spread evenly over the other six
    assert train.per_layer_balance_loss((even, even), top_k=2).item() == pytest.approx(1.0)
    assert train.per_layer_balance_loss((collapsed, collapsed), top_k=2).item() == pytest.approx(
        4.0, rel=1e-3
    )
    assert train.per_layer_balance_loss((collapsed, mirrored), top_k=2).item() > 2.5


def pretrain(out: Path, **settings: Any) -> train.TrainingReport:
    """The cpu-test preset on the CPU, pre-training alone (the tests of other things)."""
    return train.train(out, size="cpu-test", instruct_minutes=0, device="cpu", progress=False, **settings)


def test_training_with_the_per_layer_balance(tmp_path: Path) -> None:
    report = pretrain(tmp_path / "m", max_steps=20, balance="per_layer")
    assert report.balance == "per_layer"
    assert sum(report.train_losses[-5:]) < sum(report.train_losses[:5])
    with pytest.raises(ValueError, match="unknown balance"):
        train.train(tmp_path / "n", size="cpu-test", balance="global")


def test_a_run_that_dies_leaves_its_best_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoints: new best weights go to <out>.checkpoint as training goes; a run that dies (here:
    its data runs dry at step 25) leaves them there, loadable; a finished run removes them."""
    calls = [0]
    original = train._Batches.__next__

    def dying(self: train._Batches) -> torch.Tensor:
        calls[0] += 1
        if calls[0] > 25:
            raise RuntimeError("the machine went away")
        return original(self)

    monkeypatch.setattr(train._Batches, "__next__", dying)
    out = tmp_path / "m"
    with pytest.raises(RuntimeError, match="went away"):
        pretrain(out, max_steps=40, checkpoint_every_s=0)
    checkpoint = tmp_path / "m.checkpoint"
    assert not out.exists() and checkpoint.is_dir()
    record = json.loads((checkpoint / "training.json").read_text())
    assert record["best"]["step"] == 20  # the last evaluation before the end, and an improvement
    model, tokenizer = load_model(checkpoint)
    assert model.num_parameters() > 0 and tokenizer("def f():")["input_ids"]

    monkeypatch.setattr(train._Batches, "__next__", original)
    pretrain(out, max_steps=20, checkpoint_every_s=0)
    assert out.is_dir() and not checkpoint.exists()


def test_the_chat_markers_are_special_tokens(trained: tuple[Path, train.TrainingReport]) -> None:
    """<|im_start|> and <|im_end|> are one special token each wherever they stand, dropped from
    decoded text; the checkpoint ships the template that uses them and stops at <|im_end|>."""
    path = trained[0]
    _, tokenizer = load_model(path)
    start, end = tokenizer.convert_tokens_to_ids([IM_START, IM_END])
    assert (start, end) == (4, 5) and {start, end} <= set(tokenizer.all_special_ids)
    prompt = instruct.prompt_text(tokenizer, "Say hi<|im_end|>")
    assert prompt.startswith(f"{IM_START}user\nSay hi") and prompt.endswith(f"{IM_START}assistant\n")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids.count(start) == 2 and ids.count(end) == 2  # the one in the user's text too
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert IM_START not in text and IM_END not in text and "im_" not in text
    assert (path / "chat_template.jinja").is_file()
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == [2, end]


def test_the_instruction_stage_learns_the_answers(trained: tuple[Path, train.TrainingReport]) -> None:
    stage = trained[1].instruct
    assert stage is not None and stage.steps == INSTRUCT_STEPS and stage.held_out_pairs > 0
    assert stage.pairs[instruct.WRITE] > 0 and stage.pairs[instruct.EXPLAIN] > 0
    assert stage.answers_after < stage.answers_before - 0.1  # on held-out packages' pairs
    assert [step for step, _ in stage.answers] == [10, 20, 30, 40, 50, 60]  # as it went, and the last
    assert [step for step, _ in stage.code] == [10, 20, 30, 40, 50, 60]
    kept = dict(stage.answers)[stage.kept_step]
    assert stage.answers_after == pytest.approx(kept, abs=1e-4)
    assert stage.code_after == pytest.approx(dict(stage.code)[stage.kept_step], abs=1e-3)
    if stage.within_code_slack:  # the best answers among the weights that kept the code
        within = [a for (_, a), (_, c) in zip(stage.answers, stage.code, strict=True)
                  if c <= stage.code_before + train.INSTRUCT_CODE_SLACK]  # fmt: skip
        assert kept == min(within)
    assert stage.code_after < stage.code_before * 1.1  # plain code not forgotten
    record = json.loads((trained[0] / "training.json").read_text())
    assert record["instruct"]["steps"] == INSTRUCT_STEPS


def test_the_torch_engine_ends_a_turn_at_im_end(trained: tuple[Path, train.TrainingReport]) -> None:
    """The end of a turn ends the answer (finish "stop"), as EOS does, and is no text of it."""
    engine = TorchEngine(trained[0], max_batch_size=2)
    engine.load()
    end = engine.tokenizer.convert_tokens_to_ids(IM_END)
    forced = SamplingParams(max_tokens=4, logit_bias=((end, 100.0),))
    prompt = instruct.prompt_text(engine.tokenizer, "Write a Python function that adds two numbers.")
    requests = [GenerationRequest("turn", prompt, forced)]
    for request in requests:
        engine.add_request(request)
    got: dict[str, tuple[str, list[int], FinishReason | None]] = {}
    while engine.has_unfinished():
        for d in engine.step():
            text, ids, _ = got.get(d.request_id, ("", [], None))
            got[d.request_id] = (text + d.text, ids + d.token_ids, d.finish_reason)
    assert got["turn"] == ("", [end], FinishReason.STOP)


SOURCE = '''
import os


def add(a, b):
    """Return the sum of two numbers.

    Works for anything with +.
    """
    total = a + b
    return total


def undocumented(x):
    return x


def one_liner(x):
    """Compute (x) squared: a signature-like summary is no request."""
    return x * x


class Box:
    def method(self):
        """Return the box."""
        return self
'''


def test_function_pairs() -> None:
    pairs = instruct.function_pairs(SOURCE)
    code = SOURCE[SOURCE.index("def add") : SOURCE.index("\n\n\ndef undocumented")]
    bare = "def add(a, b):\n    total = a + b\n    return total"
    assert pairs == [
        instruct.Pair(
            instruct.WRITE,
            "Write a Python function that returns the sum of two numbers.",
            f"```python\n{code}\n```",
        ),
        instruct.Pair(
            instruct.EXPLAIN,
            f"What does this function do?\n```python\n{bare}\n```",
            "Return the sum of two numbers.",
        ),
        instruct.Pair(
            instruct.EXPLAIN,
            "What does this function do?\n```python\ndef one_liner(x):\n    return x * x\n```",
            "Compute (x) squared: a signature-like summary is no request.",
        ),
    ]
    assert instruct.function_pairs("def broken(:\n") == []
    assert [instruct._third_person(w) for w in ("Return", "Returns", "Pass", "Apply", "Say")] == [
        "returns",
        "returns",
        "passes",
        "applies",
        "says",
    ]


def test_prose_pairs() -> None:
    text = (
        "# Getting started quickly\n\nInstall the package, then start the service with one command.\n\n"
        "Mixed syntax\n============\n\nRead `this` first: it has markup, so it is left out.\n\n"
        "Running the tests\n-----------------\n\nThe tests need a Redis server and take about a minute.\n"
        "They run on any machine.\n"
    )
    assert instruct.prose_pairs(text) == [
        instruct.Pair(
            instruct.PROSE,
            "Tell me about Getting started quickly.",
            "Install the package, then start the service with one command.",
        ),
        instruct.Pair(
            instruct.PROSE,
            "Tell me about Running the tests.",
            "The tests need a Redis server and take about a minute. They run on any machine.",
        ),
    ]


def test_encode_learns_the_answers_only(trained: tuple[Path, train.TrainingReport]) -> None:
    _, tokenizer = load_model(trained[0])
    pairs = [
        instruct.Pair(instruct.PROSE, "Tell me about x.", "It is a letter."),
        instruct.Pair(instruct.PROSE, "Tell me about y.", "Another letter."),
    ]
    x, y = instruct.encode(tokenizer, pairs, 64)
    assert x.shape == y.shape == (1, 64)  # both pairs in one row
    learned = tokenizer.decode([t for t in y[0].tolist() if t != instruct.IGNORE], skip_special_tokens=False)
    assert learned == f"It is a letter.{IM_END}Another letter.{IM_END}"
    assert (x[0][y[0] != instruct.IGNORE] == y[0][y[0] != instruct.IGNORE]).all()
    assert len(instruct.encode(tokenizer, pairs, 16)[0]) == 0  # a pair longer than a row is left out


def test_chat_quality_bench_runs(trained: tuple[Path, train.TrainingReport]) -> None:
    q = chat_quality.measure(trained[0], requests=4, others=4, max_tokens=16, held_out_bytes=300_000)
    assert q.template == "model"  # the trained checkpoint's own template, not the fallback
    assert q.write_requests == 4 and 0 < q.other_requests <= 4
    assert 0 <= q.parses <= 1 and 0 <= q.stopped <= 1 and 0 <= q.leaked <= 8
    assert q.samples[0]["prompt"].startswith(instruct.WRITE_PREFIX)


def test_chat_quality_checks() -> None:
    assert chat_quality.defines_a_function("Here:\n```python\ndef f(x):\n    return x\n```\nDone.")
    assert chat_quality.defines_a_function("def f():\n    pass\n")
    assert not chat_quality.defines_a_function("```python\nx = 1\n```")  # no function
    assert not chat_quality.defines_a_function("```python\ndef f(:\n```")
    assert chat_quality.leaks("done<|im_start|") and chat_quality.leaks("| im_end_|>")
    assert not chat_quality.leaks("def image_start(): pass")


def test_a_chat_through_the_service_ends_at_the_turn(
    trained: tuple[Path, train.TrainingReport], service_env: dict[str, str]
) -> None:
    """The trained model served: a chat is rendered by its own template (the markers as the special
    tokens, no stop string added) and the engine ends the answer at <|im_end|> (finish "stop")."""
    path = trained[0]
    with private_stack(service_env, worker=True, LOCALMOE_MODEL_DIR=str(path)) as stack:
        client = openai.OpenAI(base_url=f"{stack.api}/v1", api_key=stack.admin_key, max_retries=0, timeout=60)
        messages = [{"role": "user", "content": "Write a Python function that adds two numbers."}]
        done = client.chat.completions.create(
            model=path.name,
            messages=messages,
            max_tokens=4,
            logit_bias={"5": 100},  # type: ignore[arg-type]
        )
        [choice] = done.choices
        assert choice.finish_reason == "stop" and not choice.message.content
        assert done.usage is not None and done.usage.completion_tokens == 1
        with stack.http() as http:
            spec = http.get(f"/v1/jobs/{done.id.split('-', 1)[1]}").json()["spec"]
        assert spec["prompt"] == f"{IM_START}user\n{messages[0]['content']}{IM_END}\n{IM_START}assistant\n"
        assert not spec["stop"]  # the end of the turn is a token, not a string to look for
        free = client.chat.completions.create(
            model=path.name, messages=messages, max_tokens=24, temperature=0
        )
        assert not chat_quality.leaks(free.choices[0].message.content or "")


def test_the_instruction_stage_stops_when_the_answers_stop_improving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held-out answers that only get worse: the stage ends after INSTRUCT_PATIENCE evaluations."""
    real = train.held_out_loss
    seen: list[float] = []

    def worsening(model: Any, rows: torch.Tensor, device: str, batch: int, labels: Any = None) -> float:
        if labels is None:
            return real(model, rows, device, batch)
        seen.append(1.0 + len(seen))  # every evaluation of the answers worse than the one before
        return seen[-1]

    monkeypatch.setattr(train, "held_out_loss", worsening)
    report = train.train(
        tmp_path / "m", size="cpu-test", max_steps=10, instruct_steps=200, device="cpu", progress=False
    )
    stage = report.instruct
    assert stage is not None and stage.steps == 10 * train.INSTRUCT_PATIENCE
    assert "no better weights for 3 evaluations" in stage.stopped_because
    assert stage.answers_before == 1.0 and [loss for _, loss in stage.answers] == [2.0, 3.0, 4.0]
    assert stage.kept_step == 0 and stage.answers_after == 1.0  # the pre-trained weights stay


def test_the_instruction_stage_keeps_weights_that_keep_the_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Answers that improve at every evaluation while held-out code drifts past INSTRUCT_CODE_SLACK:
    kept are the best-answering weights still within it (step 30), and they are the model saved."""
    real = train.held_out_loss
    answers = iter([3.0, 2.5, 2.0, 1.5, 1.2, 1.1, 1.0])  # before, then steps 10 … 60
    code = iter([2.0, 2.0, 2.01, 2.015, 2.05, 2.06, 2.07])
    instructing = [False]  # the instruction stage's code evaluations follow its answers' ones

    def scripted(model: Any, rows: torch.Tensor, device: str, batch: int, labels: Any = None) -> float:
        if labels is not None:
            instructing[0] = True
            return next(answers)
        if instructing[0]:
            instructing[0] = False
            return next(code)
        return real(model, rows, device, batch)

    monkeypatch.setattr(train, "held_out_loss", scripted)
    saved: dict[int, dict[str, torch.Tensor]] = {}
    weights = train._weights
    monkeypatch.setattr(train, "_weights", lambda model: saved.setdefault(len(saved), weights(model)))
    report = train.train(
        tmp_path / "m", size="cpu-test", max_steps=10, instruct_steps=60, device="cpu", progress=False
    )
    stage = report.instruct
    assert stage is not None and stage.steps == 60
    assert [step for step, _ in stage.code] == [10, 20, 30, 40, 50, 60]
    assert stage.kept_step == 30 and stage.answers_after == 1.5 and stage.within_code_slack
    model, _ = load_model(tmp_path / "m", device="cpu")
    kept = saved[max(saved)]  # the last copy taken: step 30's (later steps were not better)
    assert all(torch.equal(v, kept[k]) for k, v in model.state_dict().items() if k in kept)


def test_the_instruction_stage_alone_on_a_pre_trained_model(tmp_path: Path) -> None:
    """`localmoe model train --from DIR`: the stage on DIR's weights and split (pre-training not
    repeated), the result a chat model whose training.json keeps DIR's record; a model that had a
    stage already is refused."""
    pre = tmp_path / "pre"
    record = pretrain(pre, max_steps=10)
    assert record.instruct is None
    stage = train.instruct_from(pre, tmp_path / "chat", device="cpu", instruct_steps=20, progress=False)
    assert stage.steps == 20 and stage.answers_after < stage.answers_before
    saved = json.loads((tmp_path / "chat" / "training.json").read_text())
    assert (
        saved["steps"] == 10
        and saved["evaluations"] == json.loads((pre / "training.json").read_text())["evaluations"]
    )
    assert saved["instruct"]["steps"] == 20 and saved["instruct"]["kept_step"] == stage.kept_step
    model, tokenizer = load_model(tmp_path / "chat", device="cpu")
    assert tokenizer.convert_tokens_to_ids(IM_END) in model.generation_config.eos_token_id
    assert (tmp_path / "chat" / "chat_template.jinja").is_file()
    before, _ = load_model(pre, device="cpu")
    assert any(not torch.equal(v, before.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="instruction stage already"):
        train.instruct_from(
            tmp_path / "chat", tmp_path / "again", device="cpu", instruct_steps=2, progress=False
        )


def test_the_stage_alone_runs_with_the_settings_it_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """instruct_from with other InstructSettings (as a sweep of the stage tries them): a patience of
    one ends the stage at its first evaluation without better weights (the recipe's three would go
    on), and the model's training.json records the settings it ran with."""
    pre = tmp_path / "pre"
    pretrain(pre, max_steps=10)
    real = train.held_out_loss
    answers = iter([1.0, 2.0, 3.0, 4.0])  # before, then every evaluation worse

    def worsening(model: Any, rows: torch.Tensor, device: str, batch: int, labels: Any = None) -> float:
        return real(model, rows, device, batch) if labels is None else next(answers)

    monkeypatch.setattr(train, "held_out_loss", worsening)
    settings = train.InstructSettings(code_share=0.25, code_slack=0.05, patience=1, lr=0.1)
    stage = train.instruct_from(
        pre, tmp_path / "chat", device="cpu", instruct_steps=200, progress=False, settings=settings
    )
    assert stage.steps == 10 and stage.stopped_because == "no better weights for 1 evaluations"
    saved = json.loads((tmp_path / "chat" / "training.json").read_text())["instruct"]["settings"]
    assert saved == {"code_share": 0.25, "code_slack": 0.05, "patience": 1, "lr": 0.1, "keep": "best_answers"}


def test_the_stage_may_keep_its_latest_weights_within_the_code_slack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held-out answers best at step 20 and worse after (the code within its slack throughout):
    the recipe keeps step 20's weights and ends three evaluations later; keep="last" keeps the
    latest evaluated weights (step 50), never ending early while the code stays within the slack."""
    pre = tmp_path / "pre"
    pretrain(pre, max_steps=10)
    real = train.held_out_loss
    script: list[float] = []

    def scripted(model: Any, rows: torch.Tensor, device: str, batch: int, labels: Any = None) -> float:
        return real(model, rows, device, batch) if labels is None else script.pop(0)

    monkeypatch.setattr(train, "held_out_loss", scripted)
    kept = {}
    for keep in ("best_answers", "last"):
        script[:] = [3.0, 2.0, 1.5, 1.8, 1.9, 1.95, 2.5]  # before, then steps 10 … 60
        settings = train.InstructSettings(code_slack=10.0, keep=keep)
        stage = train.instruct_from(
            pre, tmp_path / keep, device="cpu", instruct_steps=50, progress=False, settings=settings
        )
        kept[keep] = (stage.kept_step, stage.steps, stage.answers_after)
    assert kept == {"best_answers": (20, 50, 1.5), "last": (50, 50, 1.95)}
    with pytest.raises(ValueError, match="keep must be"):
        train.InstructSettings(keep="first")


def test_the_stage_sweep_measures_each_variant(tmp_path: Path) -> None:
    """bench.instruct_sweep on a CPU-trained model: the pre-trained model's row, then one per
    variant, each a model of its own trained with that variant's settings and measured as the issue
    asks; a variant naming no InstructSettings field is refused."""
    from bench import instruct_sweep

    pre = tmp_path / "pre"
    pretrain(pre, max_steps=10)
    variants = [instruct_sweep.parse_variant(v) for v in ("recipe:", "code0:code_share=0,lr=0.5")]
    assert variants[1][1] == train.InstructSettings(code_share=0.0, lr=0.5)
    rows = instruct_sweep.sweep(pre, tmp_path / "sweep", variants, steps=10, requests=3, others=2, headers=3)
    assert [r["variant"] for r in rows] == ["pre-trained", "recipe", "code0"]
    assert rows[2]["settings"]["code_share"] == 0.0 and rows[2]["steps"] == 10
    for r in rows:
        assert 0 <= r["parses"] <= 1 and 0 <= r["headers_lenient"] <= 1 and r["perplexity_code"] > 1
    saved = json.loads((tmp_path / "sweep" / "code0" / "training.json").read_text())
    assert saved["instruct"]["settings"]["lr"] == 0.5
    assert instruct_sweep.table(rows).count("\n") == 4  # a header, its rule, three rows
    with pytest.raises(ValueError, match="not an InstructSettings field"):
        instruct_sweep.parse_variant("x:slack=1")


def test_with_no_held_out_pairs_the_stage_keeps_its_last_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A machine whose held-out packages make no pairs: nothing to choose by, so the weights the
    stage ends with are the model's (not the pre-trained ones put back)."""
    real = train.make_pairs
    calls: list[int] = []

    def no_held_out(*args: Any) -> list[instruct.Pair]:
        calls.append(1)
        return real(*args) if len(calls) == 1 else []  # the train split's first, then the held-out's

    monkeypatch.setattr(train, "make_pairs", no_held_out)
    report = train.train(
        tmp_path / "m", size="cpu-test", max_steps=10, instruct_steps=8, device="cpu", progress=False
    )
    stage = report.instruct
    assert stage is not None and stage.held_out_pairs == 0 and stage.answers == []
    assert stage.kept_step == stage.steps == 8 and stage.code_after != stage.code_before
