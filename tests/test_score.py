"""The visual score against pages ordered by hand: for each of three target pages, four candidates from a
faithful replica to an unrelated page. The score must put them in the same order a person would, see a
recoloured header and a changed button label, and read white-on-blue titles (the DOM gives the render's
text; the target's OCR also reads the inverse image)."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import glmv_in_process

pytestmark = pytest.mark.skipif(not shutil.which("tesseract") or not (shutil.which("chromium") or shutil.which("chromium-browser")),
                                reason="needs tesseract-ocr and chromium")

FONT = "font-family: 'DejaVu Sans', sans-serif;"

LANDING = f"""<!DOCTYPE html><html><head><style>
body {{margin:0; {FONT} background:#f5f6fa}}
header {{background:#1c2a4a; color:#fff; display:flex; justify-content:space-between; padding:18px 40px}}
header b {{font-size:26px}} nav a {{color:#dde; margin-left:32px; font-size:18px}}
.hero {{background:#3f78c9; color:#fff; padding:50px 80px}}
.hero h1 {{font-size:44px; margin:0 0 16px}} .hero p {{font-size:20px; margin:0 0 28px}}
.btn {{background:#ffab2e; color:#1c2a4a; font-weight:bold; font-size:20px; padding:16px 36px; border-radius:8px; display:inline-block}}
.cards {{display:flex; gap:40px; padding:40px 80px}}
.card {{background:#fff; border:1px solid #d5d9e6; border-radius:10px; padding:16px; flex:1}}
.card h3 {{font-size:24px; margin:10px 0 4px; color:#1c2a4a}} .card p {{margin:0; color:#555; font-size:18px}}
</style></head><body>
<header><b>Skyline Travel</b><nav><a>Destinations</a><a>Deals</a><a>About</a><a>Contact</a></nav></header>
<section class="hero"><h1>Find your next adventure</h1><p>Flights, hotels and tours in 140 countries.</p>
<span class="btn">Search trips</span></section>
<div class="cards"><div class="card"><h3>Lisbon</h3><p>from 129 EUR</p></div>
<div class="card"><h3>Kyoto</h3><p>from 689 EUR</p></div><div class="card"><h3>Reykjavik</h3><p>from 249 EUR</p></div></div>
</body></html>"""

# The same page written differently (tables for layout, other class names, a few pixels off here and there).
LANDING_REPLICA = f"""<!DOCTYPE html><html><body style="margin:0; {FONT} background:#f5f6fa">
<table style="width:100%; background:#1c2a4a; color:white; border-spacing:0"><tr>
<td style="padding:19px 40px; font-size:26px; font-weight:bold">Skyline Travel</td>
<td style="text-align:right; padding-right:40px; font-size:18px; color:#dde">Destinations &nbsp;&nbsp;&nbsp; Deals &nbsp;&nbsp;&nbsp; About &nbsp;&nbsp;&nbsp; Contact</td></tr></table>
<div style="background:#3f78c9; color:#fff; padding:52px 80px 48px">
<div style="font-size:44px; font-weight:bold; margin-bottom:16px">Find your next adventure</div>
<div style="font-size:20px; margin-bottom:28px">Flights, hotels and tours in 140 countries.</div>
<div style="display:inline-block; background:#ffab2e; color:#1c2a4a; font-weight:bold; font-size:20px; padding:16px 36px; border-radius:6px">Search trips</div></div>
<div style="display:grid; grid-template-columns:1fr 1fr 1fr; gap:40px; padding:40px 80px">
<div style="background:#fff; border:1px solid #d5d9e6; border-radius:10px; padding:16px"><div style="font-size:24px; font-weight:bold; color:#1c2a4a; margin:10px 0 4px">Lisbon</div><div style="color:#555; font-size:18px">from 129 EUR</div></div>
<div style="background:#fff; border:1px solid #d5d9e6; border-radius:10px; padding:16px"><div style="font-size:24px; font-weight:bold; color:#1c2a4a; margin:10px 0 4px">Kyoto</div><div style="color:#555; font-size:18px">from 689 EUR</div></div>
<div style="background:#fff; border:1px solid #d5d9e6; border-radius:10px; padding:16px"><div style="font-size:24px; font-weight:bold; color:#1c2a4a; margin:10px 0 4px">Reykjavik</div><div style="color:#555; font-size:18px">from 249 EUR</div></div>
</div></body></html>"""

LANDING_RED = LANDING.replace(".hero {background:#3f78c9", ".hero {background:#d0342c").replace(
    "header {background:#1c2a4a", "header {background:#8a1010").replace(">Search trips<", ">Book a flight now<")

LANDING_BROKEN = f"""<!DOCTYPE html><html><body style="{FONT}">
<h1>Skyline Travel</h1><p>Destinations Deals About Contact</p><h2>Adventure awaits</h2>
<p>Flights and hotels.</p><button>Search</button><ul><li>Lisbon</li><li>Kyoto</li></ul></body></html>"""

ARTICLE = f"""<!DOCTYPE html><html><body style="margin:40px 80px; {FONT} color:#222">
<h1 style="color:#0b5394; font-size:34px">Quarterly Report Q3 2024</h1>
<p style="font-size:18px">Revenue grew by 12 percent compared with the previous quarter, driven by new customers in Europe.</p>
<h2 style="font-size:26px">Regional results</h2>
<table style="border-collapse:collapse; font-size:18px"><tr style="background:#0b5394; color:#fff"><th style="padding:8px 24px">Region</th><th style="padding:8px 24px">Revenue</th><th style="padding:8px 24px">Growth</th></tr>
<tr><td style="padding:8px 24px">Europe</td><td style="padding:8px 24px">4.2 M</td><td style="padding:8px 24px">18 %</td></tr>
<tr><td style="padding:8px 24px">America</td><td style="padding:8px 24px">3.1 M</td><td style="padding:8px 24px">7 %</td></tr>
<tr><td style="padding:8px 24px">Asia</td><td style="padding:8px 24px">2.4 M</td><td style="padding:8px 24px">9 %</td></tr></table>
<p style="font-size:18px">The outlook for the fourth quarter remains positive.</p></body></html>"""

ARTICLE_REPLICA = ARTICLE.replace("margin:40px 80px", "margin:42px 82px").replace("padding:8px 24px", "padding:9px 24px")
ARTICLE_CHANGED = ARTICLE.replace("color:#0b5394; font-size:34px", "color:#2e8b2e; font-size:34px").replace(
    "background:#0b5394", "background:#2e8b2e").replace(
    '<p style="font-size:18px">The outlook for the fourth quarter remains positive.</p>', "").replace("4.2 M", "5.9 M")
ARTICLE_WRONG = f"""<!DOCTYPE html><html><body style="margin:40px 80px; {FONT}">
<h1 style="color:#0b5394">Quarterly Report Q3 2024</h1><p>Lorem ipsum dolor sit amet, consectetur adipiscing elit.</p>
<p>Sed do eiusmod tempor incididunt ut labore et dolore magna aliqua.</p></body></html>"""

PRICING = f"""<!DOCTYPE html><html><body style="margin:0; {FONT} background:#fff">
<h1 style="text-align:center; font-size:36px; margin:40px 0">Choose your plan</h1>
<div style="display:flex; gap:30px; padding:0 80px">
<div style="flex:1; border:2px solid #ddd; border-radius:12px; padding:24px; text-align:center"><h2>Basic</h2><p style="font-size:32px; font-weight:bold">9 EUR</p><p>1 user</p></div>
<div style="flex:1; border:2px solid #6a3de8; border-radius:12px; padding:24px; text-align:center; background:#f3efff"><h2>Team</h2><p style="font-size:32px; font-weight:bold; color:#6a3de8">29 EUR</p><p>10 users</p></div>
<div style="flex:1; border:2px solid #ddd; border-radius:12px; padding:24px; text-align:center"><h2>Business</h2><p style="font-size:32px; font-weight:bold">99 EUR</p><p>Unlimited users</p></div></div>
<footer style="margin-top:50px; background:#222; color:#eee; padding:30px 80px; font-size:18px">Questions? Write to sales@example.com</footer>
</body></html>"""

PRICING_REPLICA = PRICING.replace("gap:30px", "gap:32px").replace("margin:40px 0", "margin:38px 0")
PRICING_CHANGED = PRICING.replace("9 EUR", "19 EUR").replace("99 EUR", "79 EUR").replace("#6a3de8", "#e8743d").replace(
    "background:#222; color:#eee", "background:#eee; color:#222")
PRICING_LIST = f"""<!DOCTYPE html><html><body style="margin:40px 80px; {FONT}"><h1>Plans</h1>
<p>Basic 9 EUR</p><p>Team 29 EUR</p><p>Business 99 EUR</p></body></html>"""

UNRELATED = f"""<!DOCTYPE html><html><body style="margin:60px; {FONT} background:#fffbe6">
<h1 style="color:#7a4b00">Grandma's apple pie</h1><p>Peel six apples and slice them thinly.</p>
<p>Bake for forty minutes at 180 degrees.</p></body></html>"""

BLANK = "<!DOCTYPE html><html><body></body></html>"

# For each target: candidates from best to worst, as a person would order them.
ORDERED = {
    "landing": (LANDING, [LANDING_REPLICA, LANDING_RED, LANDING_BROKEN, UNRELATED]),
    "article": (ARTICLE, [ARTICLE_REPLICA, ARTICLE_CHANGED, ARTICLE_WRONG, UNRELATED]),
    "pricing": (PRICING, [PRICING_REPLICA, PRICING_CHANGED, PRICING_LIST, BLANK]),
}


@pytest.fixture(scope="module")
def scored():
    from glmv.score import PageRenderer, score_page

    out = {}
    with PageRenderer() as renderer:
        for name, (target_html, candidates) in ORDERED.items():
            target, _ = renderer.render(target_html, 1280, 720)
            out[name] = (target, [score_page(target, c, renderer)[0] for c in candidates])
    return out


@pytest.mark.parametrize("name", list(ORDERED))
def test_candidates_come_out_in_the_order_a_person_gives(scored, name):
    _, reports = scored[name]
    overall = [r["overall"] for r in reports]
    assert overall == sorted(overall, reverse=True), overall
    assert all(b - a >= 0.02 for a, b in zip(overall[1:], overall)), overall  # apart by more than noise
    for r in reports:
        assert all(0.0 <= r[k] <= 1.0 for k in ("block_match", "text", "position", "colour", "visual", "overall"))


def test_a_faithful_replica_with_white_on_blue_titles_scores_high(scored):
    replica = scored["landing"][1][0]
    assert replica["overall"] >= 0.85 and replica["colour"] >= 0.8, replica
    read = " ".join(m["target"] for m in replica["matches"])
    assert "adventure" in read and "Skyline" in read  # light text on a dark band was read in the target


def test_a_recoloured_header_and_a_new_button_label_cost_clearly(scored):
    replica, red = scored["landing"][1][:2]
    assert replica["overall"] - red["overall"] >= 0.06, (replica["overall"], red["overall"])
    assert red["colour"] < replica["colour"] - 0.1 and red["visual"] < replica["visual"] - 0.05
    assert red["block_match"] < replica["block_match"]


def test_delta_e2000_reference_values():
    from glmv.score import delta_e2000

    assert delta_e2000((255, 255, 255), (255, 255, 255)) == pytest.approx(0.0, abs=1e-9)
    assert delta_e2000((0, 0, 0), (255, 255, 255)) == pytest.approx(100.0, abs=0.5)
    assert delta_e2000((63, 120, 201), (208, 52, 44)) > 40  # the blue header against the red one


def test_glmv_score_command(tmp_path, scored):
    target, reports = scored["landing"]
    target.save(tmp_path / "target.png")
    (tmp_path / "page.html").write_text(LANDING_RED)
    p = glmv_in_process("score", str(tmp_path / "target.png"), str(tmp_path / "page.html"))
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["overall"] == pytest.approx(reports[1]["overall"], abs=0.01)
