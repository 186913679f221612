"""One settings path: sampling bounds declared once (the web app's sliders, the server and the CLI agree), shared
flags, `glmv bench` as a described subcommand, and `--json` meaning one JSON object on stdout everywhere."""

from __future__ import annotations

import io
import json
import re

import httpx
import pytest

from glmv.cli import build_parser, main
from glmv.errors import RequestError
from glmv.server.app import ServerConfig
from glmv.settings import SAMPLING_BOUNDS, SamplingParams, Settings
from glmv.testing.scripted import ScriptedBackend
from glmv.ui.app import Knobs, WebApp
from glmv.ui.manager import ModelManager
from test_server import serve_in_thread

SLIDERS = ("temperature", "top_p")
# A checkpoint whose defaults differ from the model card's (0.8 / 0.6): the sliders must start at these.
CHECKPOINT = SamplingParams(temperature=0.45, top_p=0.75, top_k=5)


def beyond(name: str) -> list[float]:
    """Values just outside what the slider offers, one at each end."""
    bound = SAMPLING_BOUNDS[name]
    lo, hi = bound.slider
    return [bound.lo if bound.lo_open else lo - bound.step, hi + bound.step]


def run(argv: list[str], backend=None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(argv, backend_factory=(lambda s: backend) if backend else None, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def app(tmp_path):
    backend = ScriptedBackend("<think>hm</think>ok")
    backend.default_sampling = CHECKPOINT
    manager = ModelManager(Settings(model="scripted"), lambda s, log: backend)
    manager.load_async()
    manager.wait(10)
    return WebApp(manager, tmp_path / "html"), backend


@pytest.fixture(scope="module")
def server_url():
    backend = ScriptedBackend("ok")
    with serve_in_thread(backend, ServerConfig(model_name="scripted")) as url:
        yield url


def test_the_sliders_offer_exactly_the_models_range_starting_at_the_checkpoints_defaults(app):
    from glmv.ui.page import build_ui

    web, _ = app
    demo = build_ui(web)
    sliders = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None) in ("temperature", "top-p")}
    for name in SLIDERS:
        s = sliders[name.replace("_", "-")]
        assert (s.minimum, s.maximum) == SAMPLING_BOUNDS[name].slider
        assert s.value == getattr(CHECKPOINT, name)
        SamplingParams().merged(**{name: s.minimum}), SamplingParams().merged(**{name: s.maximum})  # both ends valid
    assert SAMPLING_BOUNDS["temperature"].slider == (0.0, 2.0)


@pytest.mark.parametrize("name", SLIDERS)
def test_a_value_the_slider_cannot_reach_is_refused_by_the_server_and_the_cli_naming_the_bound(name, server_url, app):
    rule = SAMPLING_BOUNDS[name].rule
    web, backend = app
    for value in beyond(name):
        message = f"invalid {name} {value!r}: must be {rule}"
        with pytest.raises(RequestError, match=re.escape(message)):
            SamplingParams().merged(**{name: value})
        # the server: an OpenAI-style 400 with the same words
        r = httpx.post(f"{server_url}/v1/chat/completions", timeout=30,
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, name: value})
        assert r.status_code == 400 and r.json()["error"]["message"] == message, r.text
        # the CLI: one line, exit 2, before any model is loaded
        code, out, err = run(["ask", "-p", "hi", f"--{name.replace('_', '-')}", str(value), "--no-server"],
                             ScriptedBackend("never"))
        assert (code, out) == (2, "") and err == f"error: invalid {name} {float(value)!r}: must be {rule}\n"
        # the web app's handler refuses it too, before the model sees anything
        with pytest.raises(RequestError, match=re.escape(rule)):
            list(web.stream([], True, Knobs(16, **{name: value}), "s"))
    assert backend.requests == []


def test_the_sliders_values_reach_the_request_and_none_means_the_checkpoints_default(app, tmp_path):
    from conftest import png_bytes

    web, backend = app
    img = tmp_path / "a.png"
    img.write_bytes(png_bytes((40, 30)))
    list(web.describe(str(img), "what?", True, Knobs(64, 1.3, 0.9), "s"))
    list(web.describe(str(img), "what?", True, 32, "s"))  # a bare number: only the length cap changes
    (first, second) = [r.sampling for r in backend.requests]
    assert (first.temperature, first.top_p, first.max_new_tokens, first.top_k) == (1.3, 0.9, 64, CHECKPOINT.top_k)
    assert (second.temperature, second.top_p, second.max_new_tokens) == (0.45, 0.75, 32)


def test_the_server_schema_documents_the_same_bounds():
    from glmv.server.schemas import ChatCompletionRequest

    props = ChatCompletionRequest.model_json_schema()["properties"]
    assert props["temperature"]["minimum"] == 0 and props["temperature"]["maximum"] == 2
    assert props["top_p"]["exclusiveMinimum"] == 0 and props["top_p"]["maximum"] == 1
    assert props["seed"]["maximum"] == 2**63 - 1


def test_shared_flags_read_the_same_in_every_command():
    parser = build_parser()
    helps: dict[str, set[str]] = {}
    for name, sub in parser.commands.items():
        for flag in ("--max-pixels", "--debug", "--thinking"):
            action = sub._option_string_actions.get(flag)
            if action is not None:
                helps.setdefault(flag, set()).add(action.help)
    assert len(helps["--max-pixels"]) == 1 and "4000000" in next(iter(helps["--max-pixels"]))
    assert helps["--debug"] == {"show tracebacks"} and len(helps["--thinking"]) == 1


def test_the_two_api_keys_have_distinct_names():
    parser = build_parser()
    serve, ask = parser.commands["serve"], parser.commands["ask"]
    assert "clients must send" in serve._option_string_actions["--api-key"].help
    assert "--remote-api-key" not in serve._option_string_actions
    assert "sends to --base-url" in ask._option_string_actions["--remote-api-key"].help
    # the client side's older spelling still works, and means the key glmv sends
    args = parser.parse_args(["ask", "--backend", "openai", "--base-url", "http://x/v1", "--api-key", "k"])
    assert args.remote_api_key == "k"
    code, _, err = run(["ask", "-p", "hi", "--remote-api-key", "k"])
    assert code == 2 and err == "error: --remote-api-key needs --backend openai --base-url URL\n"


def test_bench_is_a_described_subcommand():
    out = io.StringIO()
    parser = build_parser()
    parser.print_help(out)
    assert re.search(r"\n\s+bench\s+speed against", out.getvalue())
    help_text = parser.commands["bench"].format_help()
    for flag in ("--serve", "--model", "--tokens", "--batches", "--configs", "--rates", "--requests", "--mix",
                 "--json", "--json-out"):
        assert flag in help_text
    assert "--warmup-only" not in help_text
    code, out_text, err = run(["bench", "--rates", "2"])  # an option of the other benchmark: refused at once
    assert (code, out_text) == (2, "") and err == "error: --rates applies to the load benchmark: add --serve\n"
    code, _, err = run(["bench", "--serve", "--configs", "glmv-bf16"])
    assert code == 2 and "--configs applies to the speed benchmark" in err
    for argv, message in ((["--batches", "1,x"], "--batches '1,x': give numbers above 0"),
                          (["--serve", "--rates", "0"], "--rates '0': give numbers above 0"),
                          (["--serve", "--mix", "chat:1"], "--mix 'chat:1': give kind:weight pairs"),
                          (["--tokens", "0"], "--tokens must be at least 1"),
                          (["--device", "nope"], "--device 'nope': give cuda, cuda:N or cpu"),
                          (["--serve", "--users", "-1"], "--users and --spread must be 0 or more")):
        code, out_text, err = run(["bench", *argv])
        assert (code, out_text) == (2, "") and err.startswith(f"error: {message}") and err.count("\n") == 1, err


def test_json_is_one_object_on_stdout_in_every_command_that_has_it(tmp_path, monkeypatch, sample_png):
    monkeypatch.setenv("GLMV_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GLMV_NO_SERVER", "1")
    backend = ScriptedBackend("an answer")
    has_json = sorted(name for name, sub in build_parser().commands.items() if "--json" in sub._option_string_actions)
    assert has_json == ["ask", "batch", "bench", "chat", "html", "logs", "ocr", "ps", "start", "stop"]
    # chat refuses it (it talks), bench and start are covered by their own tests (test_engine, test_cli_resident)
    runs = {
        "ask": ["ask", str(sample_png), "-p", "hi", "--json"],
        "ocr": ["ocr", str(sample_png), "--json"],
        "html": ["html", str(sample_png), "--json", "--out", str(tmp_path / "pages")],
        "batch": ["batch", str(sample_png), "--out", str(tmp_path / "batch"), "--json"],
        "logs": ["logs", "--json"],
        "logs status": ["logs", "status", "--json"],
        "logs path": ["logs", "path", "--json"],
        "logs off": ["logs", "off", "--json"],
        "ps": ["ps", "--json"],
        "stop": ["stop", "--json"],
    }
    for what, argv in runs.items():
        code, out, err = run(argv, backend)
        assert code == 0, (what, err)
        assert isinstance(json.loads(out), dict) and out.count("\n") == 1, (what, out)
    code, out, err = run(["chat", "--json"], backend)
    assert code == 2 and out == "" and "does not use --json" in err
