"""The web app's handlers in-process against a scripted backend (no browser)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from conftest import png_bytes
from glmv.errors import GlmvError
from glmv.settings import Settings
from glmv.testing.scripted import ScriptedBackend
from glmv.ui.app import WebApp, iframe
from glmv.ui.manager import ModelManager, estimate

PAGE = "<!DOCTYPE html>\n<html><head><title>T</title></head><body><h1>Skyline</h1></body></html>"


def make_app(tmp_path, script, delay=0.0):
    backend = ScriptedBackend(script, delay_s=delay)
    backend.default_sampling = Settings().sampling
    manager = ModelManager(Settings(model="scripted"), lambda s, log: backend)
    manager.load_async()
    manager.wait(10)
    app = WebApp(manager, tmp_path / "html")
    return app, backend


@pytest.fixture
def image(tmp_path) -> str:
    p = tmp_path / "shot.png"
    p.write_bytes(png_bytes((120, 80)))
    return str(p)


def last(gen):
    out = None
    for out in gen:
        pass
    return out


def test_describe_streams_and_reports(tmp_path, image):
    app, backend = make_app(tmp_path, "<think>looking closely</think>A red rectangle on white.")
    updates = list(app.describe(image, "describe this image", True, 256, "s1"))
    assert len(updates) >= 1
    thinking, answer, stats = updates[-1]
    assert thinking == "looking closely" and answer == "A red rectangle on white."
    assert stats.startswith("✓") and "tokens" in stats and "tok/s" in stats
    req = backend.requests[-1]
    assert req.thinking is True and req.sampling.max_new_tokens == 256 and len(req.messages[-1].images) == 1


def test_thinking_switch_reaches_the_request(tmp_path, image):
    app, backend = make_app(tmp_path, "ok")
    last(app.describe(image, "x", False, 64, "s1"))
    assert backend.requests[-1].thinking is False


def test_ocr_offers_markdown_and_text_downloads(tmp_path, image):
    app, _ = make_app(tmp_path, "# Title\n\n| a | b |\n|---|---|\n| 1 | 2 |")
    thinking, rendered, raw, stats, files = last(app.ocr(image, "read it", True, 256, "s1"))
    assert rendered == raw and "| 1 | 2 |" in raw
    assert sorted(Path(f).suffix for f in files) == [".md", ".txt"]
    assert all(Path(f).read_text().strip() == raw for f in files)


def test_html_versions_edits_and_sandboxed_preview(tmp_path, image):
    def script(request):
        prompt = request.messages[-1].text
        if "Change it as follows" in prompt:
            assert "<h1>Skyline</h1>" in prompt  # the edit starts from the previous version's code
            return "```html\n" + PAGE.replace("<h1>", '<h1 style="background:navy">') + "\n```"
        return f"<think>layout</think>Here:\n```html\n{PAGE}\n```"

    app, _ = make_app(tmp_path, script)
    think, code, stats, path, preview, versions, choices, chosen = last(app.html(image, "make a page", True, 512, "desktop", [], "s1"))
    assert code.strip() == PAGE and Path(path).read_text().strip() == PAGE
    assert Path(path).parent == tmp_path / "html" and Path(path).name.startswith("generated_")
    assert 'sandbox="allow-scripts"' in preview and "allow-same-origin" not in preview
    assert len(versions) == 1 and choices == [chosen]
    out = last(app.html_edit(image, "make the header dark blue", True, 512, "phone", versions, chosen, "s1"))
    code2, versions2 = out[1], out[5]
    assert "navy" in code2 and len(versions2) == 2 and len(list((tmp_path / "html").glob("*.html"))) == 2
    assert "width:390px" in out[4]  # phone preview
    old_code, old_path, old_preview, _, _ = app.pick_version(versions2[0]["label"], versions2, "desktop")
    assert old_code.strip() == PAGE and "navy" not in old_code


def test_html_edit_needs_a_page_and_an_instruction(tmp_path, image):
    app, _ = make_app(tmp_path, PAGE)
    with pytest.raises(GlmvError, match="generate a page first"):
        last(app.html_edit(image, "x", True, 64, "desktop", [], None, "s1"))
    versions = last(app.html(image, "make a page", True, 64, "desktop", [], "s1"))[5]
    with pytest.raises(GlmvError, match="Change the page: the prompt is empty"):
        last(app.html_edit(image, "  ", True, 64, "desktop", versions, None, "s1"))


def test_chat_keeps_history_without_reasoning_and_takes_images_mid_conversation(tmp_path, image):
    replies = iter(["<think>hmm</think>Hello!", "<think>look</think>It is red.", "Two images."])
    app, backend = make_app(tmp_path, lambda r: next(replies))
    view, history, stats, box = last(app.chat({"text": "hi", "files": []}, [], [], True, False, True, 64, "s1"))
    assert [m.role for m in history] == ["user", "assistant"] and history[1].text == "Hello!"
    assert any(m.get("metadata", {}).get("title") == "Thinking" for m in view)
    view, history, stats, box = last(app.chat({"text": "what colour?", "files": [image]}, history, view, True, False, True, 64, "s1"))
    assert history[-1].text == "It is red." and len(history[-2].images) == 1
    view, history, _, _ = last(app.chat({"text": "and now?", "files": [image, image]}, history, view, False, False, True, 64, "s1"))
    sent = backend.requests[-1].messages
    assert [len(m.images) for m in sent] == [0, 0, 1, 0, 2]
    assert all("hmm" not in m.text for m in sent)  # reasoning is not kept in history
    assert box == {"text": "", "files": []}


def test_stop_ends_generation_and_sessions_are_separate(tmp_path, image):
    app, _ = make_app(tmp_path, ["tok "] * 400, delay=0.01)
    results = {}

    def run(session):
        results[session] = last(app.describe(image, "x", True, 4096, session))

    a = threading.Thread(target=run, args=("A",))
    b = threading.Thread(target=run, args=("B",))
    a.start(), b.start()
    time.sleep(0.3)
    app.stop("A")
    a.join(10), b.join(20)
    assert results["A"][2].startswith("■ stopped")
    assert results["B"][2].startswith("✓") and results["B"][1].count("tok") == 400


def test_errors_become_messages(tmp_path, image):
    app, _ = make_app(tmp_path, "x")
    with pytest.raises(GlmvError, match="upload an image"):
        last(app.describe(None, "x", True, 64, "s1"))
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(GlmvError, match="not a PNG"):
        last(app.describe(str(bad), "x", True, 64, "s1"))
    with pytest.raises(GlmvError, match="Chat: the prompt is empty"):
        last(app.chat({"text": " ", "files": []}, [], [], True, False, True, 64, "s1"))


def test_model_manager_reports_load_errors_and_swaps(tmp_path):
    calls = []

    def factory(settings, log):
        calls.append(settings.model)
        if settings.model == "broken":
            raise GlmvError("cannot load model 'broken': no such folder")
        log("loading ...")
        return ScriptedBackend("ok")

    m = ModelManager(Settings(model="broken"), factory)
    m.load_async()
    m.wait(5)
    assert m.state == "error" and "no such folder" in m.status_markdown()
    with pytest.raises(GlmvError, match="no model is loaded"):
        m.require()
    m.load_async(model="good")
    m.wait(5)
    first = m.require()
    m.load_async(model="other")
    m.wait(5)
    assert first.closed and m.require() is not first and calls == ["broken", "good", "other"]


def test_memory_estimate():
    flash = estimate("zai-org/GLM-4.6V-Flash", "none", free_gb=80.0)
    assert 20 < flash.needed_gb < 24 and flash.warning is None
    small_card = estimate("zai-org/GLM-4.6V-Flash", "none", free_gb=10.0)
    assert "will not fit" in small_card.warning
    assert estimate("zai-org/GLM-4.6V-Flash", "w4", free_gb=10.0).warning is None
    assert "will not fit" in estimate("zai-org/GLM-4.6V", "none", free_gb=160.0).warning


def test_iframe_escapes_and_sandboxes():
    html = iframe('<script>parent.document.cookie="x"</script><p>"hi"</p>')
    assert 'sandbox="allow-scripts"' in html and "allow-same-origin" not in html
    assert "<script>" not in html  # inside srcdoc, escaped


def test_chat_with_tools_shows_steps_and_images(tmp_path, image):
    def script(request):
        if request.messages[-1].role == "tool":
            return "<think>zoomed</think>It is a small red label."
        assert request.tools
        return ("<tool_call>crop\n<arg_key>box</arg_key>\n<arg_value>[0, 0, 500, 500]</arg_value>\n</tool_call>")

    app, backend = make_app(tmp_path, script)
    view, history, stats, _ = last(app.chat({"text": "zoom in", "files": [image]}, [], [], True, True, True, 64, "s1"))
    titles = [m.get("metadata", {}).get("title", "") for m in view]
    assert any(t.startswith("⚙ crop(box=[0, 0, 500, 500])") for t in titles)
    assert any(isinstance(m["content"], dict) and m["content"]["path"].endswith("crop.png") for m in view)
    assert history[-1].text == "It is a small red label." and stats.startswith("✓")
    assert [m.role for m in backend.requests[-1].messages] == ["user", "assistant", "tool"]


@pytest.mark.skipif(__import__("shutil").which("chromium") is None or __import__("shutil").which("tesseract") is None,
                    reason="needs chromium and tesseract-ocr")
def test_html_refine_adds_scored_versions(tmp_path, image):
    replies = iter([f"```html\n{PAGE}\n```", f"```html\n{PAGE.replace('Skyline', 'Skyline Travel')}\n```"])
    app, _ = make_app(tmp_path, lambda r: next(replies))
    versions = last(app.html(image, "make a page", True, 64, "desktop", [], "s1"))[5]
    updates = list(app.html_refine(image, 1, True, 64, "desktop", versions, versions[0]["label"], "s1"))
    code, status, path, preview, versions2, choices, chosen, gallery, table = updates[-1]
    # one round with a reply that holds HTML: the refined page is always kept as a second version, scored,
    # whether or not it scored higher (then the status says the score stopped improving)
    assert "visual score" in status and len(versions2) == 2 and "refined" in versions2[1]["label"]
    assert "round 1 of 1" in status and chosen == versions2[1]["label"]
    assert all("score" in v for v in versions2)
    assert gallery[0] == image and Path(gallery[1]).name.startswith("render-v")
    from PIL import Image
    assert Image.open(gallery[1]).size == Image.open(image).size  # the slider lays one exactly over the other


# -- grounding -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("answer, expected", [
    ("<|begin_of_box|>[[100,200,500,800]]<|end_of_box|>", [("the car", (100, 200, 500, 800))]),
    ("1. red car: [[10, 20, 30, 40]]\n2. **blue car**: [[50,60,70,80]]",
     [("red car", (10, 20, 30, 40)), ("blue car", (50, 60, 70, 80))]),
    ("The cat is at [120,80,400,600] and the dog at [500,100,900,700].",
     [("the car", (120, 80, 400, 600)), ("the car", (500, 100, 900, 700))]),  # sentences are not labels
    ("left eye [[1.5,2,30.5,40]]", [("left eye", (1.5, 2, 30.5, 40))]),
    ("nothing here [1,2,3] or [5,5,5,9] or [0,0,2000,10]", []),  # three numbers, zero width, off the scale
    ("house [[0.1,0.2,0.5,0.6]]", []),  # 0-1 fractions, not the 0-1000 scale: a dot, not a box
])
def test_find_boxes_labels_them(answer, expected):
    from glmv.grounding import find_boxes

    got = [(b.label, (b.x1, b.y1, b.x2, b.y2)) for b in find_boxes(answer, "the car")]
    assert got == [(label, tuple(float(v) for v in box)) for label, box in expected]


def test_no_boxes_note_tells_unusable_boxes_from_none():
    from glmv.grounding import no_boxes_note

    assert no_boxes_note("I see no house.") == "no boxes in the answer"
    assert "0 to 1000" in no_boxes_note("house [[900,100,1400,300]]")
    assert "0 to 1000" in no_boxes_note("house [[0.1,0.2,0.5,0.6]]")


def test_draw_boxes_at_the_right_pixels():
    from PIL import Image

    from glmv.grounding import PALETTE, Box, boxes_json, draw_boxes

    img = Image.new("RGB", (200, 100), "white")
    out = draw_boxes(img, [Box("it", 100, 200, 500, 800), Box("swapped", 900, 900, 600, 600)])
    assert out.getpixel((20, 50)) == PALETTE[0] and out.getpixel((99, 50)) == PALETTE[0]  # x 20..100
    assert out.getpixel((60, 79)) == PALETTE[0] and out.getpixel((60, 50)) == (255, 255, 255)
    assert out.getpixel((120, 75)) == PALETTE[1]  # (600,600)-(900,900): x 120..180, y 60..90
    data = json.loads(boxes_json([Box("it", 100, 200, 500, 800)], 200, 100))
    assert data["boxes"][0]["box_px"] == [20, 20, 100, 80] and img.getpixel((20, 50)) == (255, 255, 255)


def test_find_mode_draws_and_offers_png_and_json(tmp_path, image):
    app, backend = make_app(tmp_path, "<think>there</think>the square: [[0,0,500,500]]")
    thinking, answer, stats, png, files = last(app.find(image, "the square", True, 64, "s1"))
    assert "1 box drawn" in stats and backend.requests[-1].messages[-1].text.startswith("Find the square")
    assert sorted(Path(f).suffix for f in files) == [".json", ".png"]
    with pytest.raises(GlmvError, match="Find: the prompt is empty"):
        last(app.find(image, "  ", True, 64, "s1"))


@pytest.mark.parametrize("answer, note", [
    ("I see no square.", "no boxes in the answer"),
    ("the square: [[900,100,1400,300]]", "boxes must be [[x1,y1,x2,y2]] from 0 to 1000)"),  # off the scale
    ("the square: [[0.1,0.2,0.5,0.6]]", "boxes must be [[x1,y1,x2,y2]] from 0 to 1000)"),  # fractions: a dot
])
def test_find_mode_says_why_nothing_was_drawn(tmp_path, image, answer, note):
    app, _ = make_app(tmp_path, answer)
    *_, stats, png, files = last(app.find(image, "the square", False, 64, "s1"))
    assert stats.endswith(note) and png is None and files is None


def test_find_and_glmv_ground_give_the_same_boxes_picture_and_note(tmp_path, image, monkeypatch):
    """One grounding flow (grounding.annotate): the web app's Find and `glmv ground` cannot disagree."""
    import io

    from PIL import Image

    from glmv.cli import main

    answer = "the thing: [[250,250,750,750]] and [[0,0,100,100]]"
    app, _ = make_app(tmp_path, answer)
    *_, stats, png, files = last(app.find(image, "the thing", False, 64, "s1"))
    backend = ScriptedBackend(answer)
    backend.default_sampling = Settings().sampling
    monkeypatch.chdir(tmp_path)
    out, err = io.StringIO(), io.StringIO()
    assert main(["ground", image, "-p", "the thing", "-o", "cli.png"], backend_factory=lambda s: backend, stdout=out,
                stderr=err) == 0
    report = json.loads(out.getvalue())
    found = json.loads(Path(next(f for f in files if f.endswith(".json"))).read_text(encoding="utf-8"))
    assert found == {"image_size": report["image_size"], "boxes": report["boxes"]} and len(found["boxes"]) == 2
    assert Image.open(png).tobytes() == Image.open(tmp_path / "cli.png").tobytes()
    assert stats.endswith(" · 2 boxes drawn") and "glmv: 2 boxes drawn -> cli.png" in err.getvalue()


def test_glmv_ground_writes_the_png_and_prints_json(tmp_path, image, monkeypatch):
    import io

    from PIL import Image

    from glmv.cli import main

    backend = ScriptedBackend("<think>ok</think>the thing: [[250,250,750,750]]")
    backend.default_sampling = Settings().sampling
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.chdir(tmp_path)
    assert main(["ground", image, "-p", "the thing"], backend_factory=lambda s: backend, stdout=out, stderr=err) == 0
    report = json.loads(out.getvalue())
    assert report["boxes"][0]["box_px"] == [30, 20, 90, 60] and report["image"] == "shot_boxes.png"
    drawn = Image.open(tmp_path / "shot_boxes.png").convert("RGB")
    assert drawn.getpixel((30, 40)) != drawn.getpixel((60, 40))
    err2 = io.StringIO()
    assert main(["ground", image, "-p", " "], backend_factory=lambda s: backend, stdout=out, stderr=err2) == 2
    assert err2.getvalue().startswith("error: the prompt is empty")
    assert main(["ground", image, "-p", "x", "-o", "a.jpg"], backend_factory=lambda s: backend, stdout=out, stderr=err2) == 2


def test_large_image_boxes_are_in_the_files_own_pixels_everywhere(tmp_path, monkeypatch):
    """An image scaled down for the model: `glmv ground`, Find's downloads and `glmv ask --json` all give the
    boxes in the input file's pixels (0-1000 box x original size / 1000), and the PNG is the original drawn on."""
    import io

    from PIL import Image

    from glmv.cli import main

    src = Image.new("RGB", (2400, 1800), "white")
    src.paste((0, 90, 0), (0, 0, 2400, 1800), mask=Image.frombytes("1", (2400, 1800), b"\x55" * (300 * 1800)))
    path = tmp_path / "big.png"
    src.save(path)  # 1-px green/white stripes: scaling down and back up would blur them
    answer, expected = "<|begin_of_box|>[100,200,500,600]<|end_of_box|>", [240, 360, 1200, 1080]
    small = ["--max-pixels", "120000"]  # 400x300 for the model
    backend = ScriptedBackend(answer)
    backend.default_sampling = Settings().sampling
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    assert main(["ground", str(path), "-p", "the thing", "-o", "cli.png", *small], backend_factory=lambda s: backend,
                stdout=out, stderr=io.StringIO()) == 0
    ground = json.loads(out.getvalue())
    assert ground["image_size"] == [2400, 1800] and ground["boxes"][0]["box_px"] == expected
    assert ground["boxes"][0]["box_1000"] == [100, 200, 500, 600]
    out = io.StringIO()
    assert main(["ask", str(path), "-p", "where?", "--json", *small], backend_factory=lambda s: backend, stdout=out,
                stderr=io.StringIO()) == 0
    assert json.loads(out.getvalue())["boxes"][0]["pixels"] == expected
    app, scripted = make_app(tmp_path, answer)
    app.max_pixels = 120_000
    *_, png, files = last(app.find(str(path), "the thing", False, 64, "s1"))
    sent = [c for c in scripted.requests[-1].messages[-1].content if hasattr(c, "image")]
    assert [c.size for c in sent] == [(400, 300)]  # the model saw the scaled image
    found = json.loads(Path(next(f for f in files if f.endswith(".json"))).read_text(encoding="utf-8"))
    assert found == {"image_size": ground["image_size"], "boxes": ground["boxes"]}
    for drawn in (Image.open(png).convert("RGB"), Image.open(tmp_path / "cli.png").convert("RGB")):
        assert drawn.size == (2400, 1800) and drawn.getpixel((240, 700)) != src.getpixel((240, 700))  # the box edge
        assert drawn.crop((1500, 0, 2400, 1800)).tobytes() == src.crop((1500, 0, 2400, 1800)).tobytes()


# -- the line in front of the model ------------------------------------------------------------------------
def test_slots_admit_in_order_and_let_waiting_users_leave():
    from glmv.ui.slots import Slots

    slots = Slots(1)
    a, b, c = slots.enter(), slots.enter(), slots.enter()
    assert slots.wait(a, 0) and not slots.wait(b, 0.01)
    assert slots.position(b) == (1, 2) and slots.position(c) == (2, 2)
    slots.leave(c)  # gave up waiting
    slots.leave(a)
    assert slots.wait(b, 0.1) and slots.busy() == 1
    slots.capacity = 2
    d = slots.enter()
    assert slots.wait(d, 0.1)


def test_a_queued_job_stopped_never_reaches_the_model(tmp_path, image):
    app, backend = make_app(tmp_path, ["tok "] * 100, delay=0.01)
    out = {}
    a = threading.Thread(target=lambda: out.setdefault("A", last(app.describe(image, "x", True, 4096, "A"))))
    a.start()
    time.sleep(0.2)
    waits = []
    b = threading.Thread(target=lambda: out.setdefault("B", [u for u in app.describe(image, "x", True, 4096, "B")]))
    b.start()
    time.sleep(0.3)
    app.stop("B")
    a.join(10), b.join(10)
    waits = [u[2] for u in out["B"]]
    assert waits[0].startswith("⏳ waiting for the model: 1st in line") and waits[-1].startswith("■ stopped while waiting")
    assert len(backend.requests) == 1 and out["A"][2].startswith("✓")


# -- the model panel -------------------------------------------------------------------------------------
def test_model_choices_are_checked_before_anything_unloads(tmp_path):
    from glmv.ui.manager import check_choice, in_ui_terms

    assert check_choice("/no/such/folder", "none") == "no such folder: /no/such/folder"
    assert "no such folder" in estimate("/no/such/folder", "none", free_gb=80.0).markdown()
    assert "needs a CUDA GPU" in check_choice("tiny", "w4", has_cuda=False)
    assert check_choice("tiny", "w4", has_cuda=True) is None and check_choice("zai-org/GLM-4.6V-Flash", "none") is None
    assert "needs a CUDA GPU" in estimate("zai-org/GLM-4.6V-Flash", "w4", free_gb=None).markdown()
    message = "cannot load model 'x': ... copy DIR here and pass --model DIR; or run `--model tiny` for an offline smoke test"
    assert "--model" not in in_ui_terms(message) and "Model panel" in in_ui_terms(message)
    app, backend = make_app(tmp_path, "ok")
    status, msg = app.load("local folder…", "/no/such/folder", "bf16")
    assert msg == "✕ cannot load /no/such/folder: no such folder: /no/such/folder"
    assert app.manager.require() is backend and not backend.closed


def test_a_failed_load_keeps_or_restores_the_working_model():
    from glmv.ui.manager import ModelManager

    good = ScriptedBackend("ok")

    def factory(settings, log):
        if settings.model == "broken":
            raise GlmvError("cannot load model 'broken': out of memory")
        return good

    def precheck(settings, log):
        if settings.model == "offline/model":
            raise GlmvError("cannot load model 'offline/model': the hub is unreachable. Pass --model DIR")

    m = ModelManager(Settings(model="good"), factory, precheck)
    m.load_async(), m.wait(5)
    m.load_async(model="offline/model"), m.wait(5)  # fails before unloading: the model stays
    assert m.require() is good and not good.closed and m.failures == 1 and "could not load offline/model" in m.message
    m.load_async(model="broken"), m.wait(5)  # fails after unloading: the previous model comes back
    assert m.require() is good and m.settings.model == "good" and "ready again" in m.message and m.failures == 2


# -- persistence -----------------------------------------------------------------------------------------
def test_store_keeps_chats_per_browser_and_copies_uploads(tmp_path, image):
    from glmv.ui.app import messages_from_view
    from glmv.ui.store import Store

    store = Store(tmp_path / "state")
    kept = store.keep(image)
    assert Path(kept).parent == store.media and Path(kept).read_bytes() == Path(image).read_bytes()
    view = [{"role": "user", "content": {"path": kept}}, {"role": "user", "content": "what is it?"},
            {"role": "assistant", "content": "hmm", "metadata": {"title": "Thinking"}},
            {"role": "assistant", "content": "A red square."}]
    store.save_chat("browser-a", "c1", "what is it?", view)
    store.save_chat("browser-b", "c1", "hijack", [])  # same chat id from another browser: refused
    again = Store(tmp_path / "state")  # a server restart
    assert again.chat("browser-a", "c1") == view and again.chat("browser-b", "c1") is None
    assert [c[1] for c in again.chats("browser-a")] == ["what is it?"] and again.chats("browser-b") == []
    history = messages_from_view(view, 4_000_000)
    assert [m.role for m in history] == ["user", "assistant"] and len(history[0].images) == 1
    assert history[1].text == "A red square."
    again.delete_chat("browser-a", "c1")
    assert again.chats("browser-a") == []


def test_chat_find_draws_on_the_latest_image(tmp_path, image):
    app, backend = make_app(tmp_path, "the square: [[0,0,500,500]]")
    with pytest.raises(GlmvError, match="Find needs an image"):
        last(app.chat({"text": "the square", "files": []}, [], [], True, False, True, 64, "s1", find=True))
    view, history, stats, _ = last(app.chat({"text": "the square", "files": [image]}, [], [], True, False, True, 64,
                                            "s1", find=True))
    assert "1 box drawn" in stats and view[-1]["content"]["path"].endswith("found.png")
    assert backend.requests[-1].messages[-1].text.startswith("Find the square")


def test_a_chat_turn_stopped_while_waiting_leaves_the_chat_as_it_was(tmp_path, image):
    app, backend = make_app(tmp_path, ["tok "] * 100, delay=0.01)
    busy = threading.Thread(target=lambda: last(app.describe(image, "x", True, 4096, "A")))
    busy.start()
    time.sleep(0.2)
    out = {}
    message = {"text": "still there?", "files": []}
    t = threading.Thread(target=lambda: out.setdefault("chat", last(app.chat(message, [], [], True, False, True, 64, "B"))))
    t.start()
    time.sleep(0.3)
    app.stop("B")
    t.join(10), busy.join(10)
    view, history, stats, box = out["chat"]
    assert view == [] and history == [] and stats.startswith("■ stopped while waiting") and box == message


def test_a_chat_as_gradio_hands_it_back_rebuilds_the_history(image):
    from glmv.ui.app import messages_from_view, plain_view

    from_gradio = [  # what gr.Chatbot passes to a handler: content as typed parts
        {"role": "user", "metadata": None, "content": [{"type": "file", "alt_text": None,
                                                        "file": {"path": image, "url": "http://x/f", "meta": {}}}]},
        {"role": "user", "metadata": None, "content": [{"type": "text", "text": "first"}]},
        {"role": "assistant", "metadata": {"title": "Thinking", "status": "done", "id": None},
         "content": [{"type": "text", "text": "hmm"}]},
        {"role": "assistant", "metadata": None, "content": [{"type": "text", "text": "A red square."}]},
    ]
    assert plain_view(from_gradio) == [
        {"role": "user", "content": {"path": image}}, {"role": "user", "content": "first"},
        {"role": "assistant", "content": "hmm", "metadata": {"title": "Thinking", "status": "done"}},
        {"role": "assistant", "content": "A red square."}]
    history = messages_from_view(from_gradio, 4_000_000)
    assert [(m.role, len(m.images), m.text) for m in history] == [("user", 1, "first"), ("assistant", 0, "A red square.")]


def test_file_guard_refuses_private_folders_but_not_gradios_cache(tmp_path):
    import asyncio

    from glmv.ui.page import FileGuard

    served: list[str] = []

    async def app(scope, receive, send):
        served.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})

    # `glmv ui --out .` run from the temp folder: the pages folder holds Gradio's cache.
    guard = FileGuard(app, private=[str(tmp_path)], public=[str(tmp_path / "gradio")])

    def get(path):
        sent = []

        async def send(message):
            sent.append(message)

        asyncio.run(guard({"type": "http", "path": "/gradio_api/file=" + path}, None, send))
        return sent[0]["status"], dict(sent[0]["headers"])

    status, headers = get(str(tmp_path / "gradio" / "3f2a" / "found.png"))
    assert status == 200 and headers[b"content-security-policy"] == b"sandbox"
    for path in (tmp_path / "generated_20261129_141423.html", tmp_path / "gradio" / ".." / "x.html"):
        assert get(str(path))[0] == 403
    assert served == ["/gradio_api/file=" + str(tmp_path / "gradio" / "3f2a" / "found.png")]


def test_gradios_upload_folder_is_private(tmp_path, image, monkeypatch):
    """Uploads (users' images and documents) land in Gradio's cache folder: made 0700 whatever the umask, and
    an older readable one tightened, so other local users cannot list or read them."""
    import os
    import stat

    import httpx

    from glmv.ui.page import build_ui, serve_ui
    from test_server import free_port

    cache = tmp_path / "gradio"
    cache.mkdir(mode=0o755)
    cache.chmod(0o755)
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(cache))
    app, _ = make_app(tmp_path, "ok")
    demo = build_ui(app)
    port = free_port()
    serve_ui(app, demo, port=port, block=False)
    try:
        with open(image, "rb") as f:
            r = httpx.post(f"http://127.0.0.1:{port}/gradio_api/upload", files={"files": ("shot.png", f, "image/png")},
                           timeout=30)
        assert r.status_code == 200, r.text
        (uploaded,) = r.json()
        assert Path(uploaded).resolve().is_relative_to(cache.resolve()) and Path(uploaded).is_file()
        assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
    finally:
        demo.close()
