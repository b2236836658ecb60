"""The HTML report of `vireid evaluate --html` (and of the demo): the plotted CMC of each method,
the rank lists' order, thumbnails, and that the page needs no network."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from vireid.cli import main

NUM_IDS = 8


class ReportParser(HTMLParser):
    """Scripts (attributes, text), every src/href, and the rank-list tiles per query row and method."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[tuple[dict[str, str | None], str]] = []
        self.links: list[str] = []
        self.text_outside_scripts: list[str] = []
        self.tiles: dict[int, dict[str, list[dict[str, object]]]] = {}
        self.queries: dict[int, dict[str, object]] = {}
        self._script: dict[str, str | None] | None = None
        self._script_text: list[str] = []
        self._query_row: int | None = None
        self._method: str | None = None
        self._tile: dict[str, object] | None = None
        self._in_query = False
        self._tile_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        for key in ("src", "href"):
            if a.get(key):
                self.links.append(str(a[key]))
        if tag == "script":
            self._script, self._script_text = a, []
        elif tag == "section" and "data-query-row" in a:
            self._query_row = int(str(a["data-query-row"]))
            self.tiles[self._query_row] = {}
        elif tag == "figure" and a.get("class") == "query":
            self._in_query = True
            self.queries[self._query_row] = {"thumbnail": False, "text": ""}
        elif tag == "div" and a.get("class") == "method-row":
            self._method = str(a["data-method"])
            self.tiles[self._query_row][self._method] = []
        elif tag == "li" and "tile" in str(a.get("class")):
            self._tile = {"id": int(str(a["data-gallery-id"])), "cam": int(str(a["data-camera"])),
                          "class": a["class"], "thumbnail": False, "placeholder": False, "text": ""}
            self.tiles[self._query_row][self._method].append(self._tile)
        if tag == "img":
            target = self._tile if self._tile is not None else (
                self.queries.get(self._query_row) if self._in_query else None)
            if target is not None:
                target["thumbnail"] = str(a["src"]).startswith("data:image/jpeg;base64,")
        if tag == "div" and a.get("class") == "noimg" and self._tile is not None:
            self._tile["placeholder"] = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "script" and self._script is not None:
            self.scripts.append((self._script, "".join(self._script_text)))
            self._script = None
        elif tag == "li":
            self._tile = None
        elif tag == "figure":
            self._in_query = False

    def handle_data(self, data: str) -> None:
        if self._script is not None:
            self._script_text.append(data)
            return
        self.text_outside_scripts.append(data)
        if self._tile is not None:
            self._tile["text"] = f"{self._tile['text']} {data}"
        elif self._in_query:
            self.queries[self._query_row]["text"] = f"{self.queries[self._query_row]['text']} {data}"


def _parse(path: Path) -> ReportParser:
    parser = ReportParser()
    parser.feed(path.read_text())
    return parser


def _figure(parser: ReportParser) -> dict:
    (figure,) = [json.loads(text) for attrs, text in parser.scripts if attrs.get("id") == "cmc-figure"]
    return figure


def _traces(parser: ReportParser) -> dict[str, dict]:
    return {trace["name"]: trace for trace in _figure(parser)["data"]}


@pytest.fixture()
def feature_file(tmp_path: Path) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """8 identities, IR queries (cams 3/6), visible gallery (cams 1/2/4/5), validation identities,
    images under ``images/`` (relative paths in the file) coloured by identity."""
    from PIL import Image

    rng = np.random.default_rng(3)

    def split(num_ids: int, prefix: str) -> dict[str, np.ndarray]:
        centres = rng.standard_normal((num_ids, 16))
        q_id, g_id = np.repeat(np.arange(num_ids), 2), np.repeat(np.arange(num_ids), 4)
        return {
            f"{prefix}query_feat": (centres[q_id] + 1.5 * rng.standard_normal((len(q_id), 16))).astype(np.float32),
            f"{prefix}gallery_feat": (centres[g_id] + 1.5 * rng.standard_normal((len(g_id), 16))).astype(np.float32),
            f"{prefix}query_id": q_id, f"{prefix}gallery_id": g_id,
            f"{prefix}query_cam": np.tile([3, 6], num_ids), f"{prefix}gallery_cam": np.tile([1, 2, 4, 5], num_ids),
        }

    arrays = {**split(NUM_IDS, ""), **split(6, "val_")}
    root = tmp_path / "images"
    for side in ("query", "gallery"):
        (root / side).mkdir(parents=True)
        names = []
        for i, pid in enumerate(arrays[f"{side}_id"]):
            name = f"{side}/{pid:03d}_{i:03d}.png"
            Image.new("RGB", (48, 96), (30 * int(pid), 255 - 30 * int(pid), 60)).save(root / name)
            names.append(name)
        arrays[f"{side}_path"] = np.array(names)
    path = tmp_path / "features.npz"
    np.savez(path, **arrays)
    return path, root, arrays


def _plain_order(arrays: dict[str, np.ndarray], row: int) -> list[int]:
    """Gallery ids of query ``row`` best first by negative cosine (float64), SYSU removal: a cam-3
    query ignores the cam-2 gallery."""
    q = arrays["query_feat"][row].astype(np.float64)
    g = arrays["gallery_feat"].astype(np.float64)
    dist = -(g @ q) / (np.linalg.norm(g, axis=1) * np.linalg.norm(q))
    order = np.argsort(dist, kind="stable")
    if arrays["query_cam"][row] == 3:
        order = order[arrays["gallery_cam"][order] != 2]
    return order[:10].tolist()


def test_report_plots_each_methods_cmc_and_ranks_the_gallery(feature_file, tmp_path: Path) -> None:
    """`--rerank aim,plain,krr --json --html`: each trace holds exactly its method's CMC from the
    JSON, the plain rank list of a query is the argsort of the distance, every method has lists,
    a missing image gives a tile without thumbnail, and nothing refers to the network."""
    path, root, arrays = feature_file
    json_out, html_out = tmp_path / "r.json", tmp_path / "out" / "report.html"
    html_out.parent.mkdir()
    # one image the plain lists show goes missing: its tile must lose the thumbnail, nothing else
    first_query = int(np.sort(np.random.default_rng(0).choice(2 * NUM_IDS, 6, replace=False))[0])  # seed 0
    (root / str(arrays["gallery_path"][_plain_order(arrays, first_query)[0]])).unlink()

    assert main(["evaluate", str(path), "--protocol", "sysu", "--rerank", "aim,plain,krr", "--json", str(json_out),
                 "--html", str(html_out), "--image-root", str(root)]) == 0
    result = json.loads(json_out.read_text())
    parser = _parse(html_out)

    cmcs = [tuple(result["methods"][m]["cmc"]) for m in ("plain", "aim", "krr")]
    assert len(set(cmcs)) == 3                                 # the check below can tell the methods apart
    traces = _traces(parser)
    by_method = {name.split(" ")[0]: trace for name, trace in traces.items()}
    assert sorted(by_method) == ["aim", "krr", "plain"] and len(traces) == 3
    for method, trace in by_method.items():
        assert trace["y"] == result["methods"][method]["cmc"], method
        assert trace["x"] == list(range(1, len(trace["y"]) + 1))
    styles = {(t["line"]["dash"], t["marker"]["symbol"]) for t in traces.values()}
    assert len(styles) == 3                                   # distinct dash and marker per method
    # plain first: drawn widest, the others over it thinner, so it shows even where curves coincide
    data = _figure(parser)["data"]
    assert data[0]["name"].startswith("plain")
    assert data[0]["line"]["width"] > data[1]["line"]["width"] > data[2]["line"]["width"]

    # rank lists: the same seeded queries for every method, plain's order = argsort of the distance
    assert parser.tiles and all(len(rows) == 3 and all(len(t) == 10 for t in rows.values())
                                for rows in parser.tiles.values())
    assert all([name.split(" ")[0] for name in rows] == ["plain", "aim", "krr"] for rows in parser.tiles.values())
    for query_row, rows in parser.tiles.items():
        plain = next(tiles for name, tiles in rows.items() if name.startswith("plain"))
        expected = _plain_order(arrays, query_row)
        assert [t["id"] for t in plain] == arrays["gallery_id"][expected].tolist()
        assert [t["cam"] for t in plain] == arrays["gallery_cam"][expected].tolist()
        for tile in plain:                                     # identity, camera, distance visible as text
            assert f"id {tile['id']}" in str(tile["text"]) and f"cam {tile['cam']}" in str(tile["text"])
            assert re.search(r"d -?\d", str(tile["text"]))
            assert tile["class"] == ("tile match" if tile["id"] == arrays["query_id"][query_row] else "tile miss")
        assert f"id {arrays['query_id'][query_row]}" in str(parser.queries[query_row]["text"])
        assert parser.queries[query_row]["thumbnail"]
    plain = next(tiles for name, tiles in parser.tiles[first_query].items() if name.startswith("plain"))
    assert plain[0]["placeholder"] and not plain[0]["thumbnail"]   # its top image was removed
    assert all(t["thumbnail"] for t in plain[1:])
    all_tiles = [t for rows in parser.tiles.values() for tiles in rows.values() for t in tiles]
    assert all(t["thumbnail"] != t["placeholder"] for t in all_tiles)

    # offline: plotly.js inline once, no script from elsewhere, no URL outside plotly.js itself
    from plotly.offline import get_plotlyjs

    plotly_scripts = [text for attrs, text in parser.scripts if attrs.get("id") == "plotly-js"]
    assert plotly_scripts == [get_plotlyjs()]
    assert all("src" not in attrs for attrs, _ in parser.scripts)
    assert not [link for link in parser.links if not link.startswith("data:")]
    other_text = "".join(parser.text_outside_scripts) + "".join(
        text for attrs, text in parser.scripts if attrs.get("id") != "plotly-js")
    assert not re.search(r"https?://", other_text)
    assert not list(html_out.parent.glob(".*"))                # nothing half-written left beside it


def test_report_adds_plain_to_one_rerank_and_shows_preset_and_tuned(feature_file, tmp_path: Path) -> None:
    """`--rerank aim --tune-on val --html`: plain (for comparison), aim's preset and tuned rows,
    each with its own CMC and its own rank lists; plain's CMC equals that of a plain evaluation."""
    path, root, _ = feature_file
    plain_json, aim_json, html_out = tmp_path / "plain.json", tmp_path / "aim.json", tmp_path / "aim.html"
    assert main(["evaluate", str(path), "--protocol", "sysu", "--json", str(plain_json)]) == 0
    assert main(["evaluate", str(path), "--protocol", "sysu", "--rerank", "aim", "--tune-on", "val",
                 "--json", str(aim_json), "--html", str(html_out), "--image-root", str(root)]) == 0
    aim = json.loads(aim_json.read_text())["methods"]["aim"]
    parser = _parse(html_out)
    traces = _figure(parser)["data"]
    names = traces
    assert [t["name"].split(" (")[0] for t in names] == ["plain", "aim", "aim"]
    assert len({tuple(t["y"]) for t in names}) == 3           # three different curves to tell apart
    assert names[0]["y"] == json.loads(plain_json.read_text())["cmc"]
    assert names[1]["y"] == aim["preset"]["cmc"] and "defaults" in names[1]["name"]
    assert names[2]["y"] == aim["tuned"]["cmc"] and "tuned on val" in names[2]["name"]
    for rows in parser.tiles.values():
        assert list(rows) == [t["name"] for t in names]


def test_report_without_image_paths_shows_tiles_without_thumbnails(feature_file, tmp_path: Path) -> None:
    """A feature file without query_path / gallery_path still gets rank lists (text tiles)."""
    path, _, arrays = feature_file
    bare = tmp_path / "bare.npz"
    np.savez(bare, **{k: v for k, v in arrays.items() if not k.endswith("_path")})
    html_out = tmp_path / "bare.html"
    assert main(["evaluate", str(bare), "--protocol", "sysu", "--html", str(html_out)]) == 0
    parser = _parse(html_out)
    tiles = [t for rows in parser.tiles.values() for tiles in rows.values() for t in tiles]
    assert len(parser.tiles) == 6 and len(tiles) == 60
    assert all(t["placeholder"] and not t["thumbnail"] for t in tiles)
    row = next(iter(parser.tiles))
    assert [t["id"] for t in parser.tiles[row]["plain"]] == arrays["gallery_id"][_plain_order(arrays, row)].tolist()


def test_report_refuses_ranked_lists_and_stray_image_root(feature_file, tmp_path: Path, capsys) -> None:
    path, root, _ = feature_file
    ranked = tmp_path / "ranks.npz"
    np.savez(ranked, ranked_index=np.tile(np.arange(10), (2 * NUM_IDS, 1)))
    assert main(["evaluate", str(path), "--protocol", "sysu", "--ranked", str(ranked), "--html",
                 str(tmp_path / "r.html")]) == 2
    assert "--html" in capsys.readouterr().err
    assert main(["evaluate", str(path), "--protocol", "sysu", "--image-root", str(root)]) == 2
    assert "--image-root" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


def test_report_respects_the_umask(feature_file, tmp_path: Path) -> None:
    import os

    path, _, _ = feature_file
    old = os.umask(0o027)
    try:
        assert main(["evaluate", str(path), "--protocol", "sysu", "--html", str(tmp_path / "u.html")]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "u.html").stat().st_mode & 0o777 == 0o640


def _result(cmc: list[float]):
    from vireid.evaluation.metrics import EvalResult

    return EvalResult(np.array(cmc), mAP=0.5, mINP=0.25, num_queries=4, num_valid=4)


def test_cmc_figure_gives_each_method_its_own_line_and_marker() -> None:
    from vireid.errors import InputError
    from vireid.evaluation.report import cmc_figure

    curves = [(f"m{i}", _result(list(np.linspace(0.1 * i, 1.0, 25)))) for i in range(7)]
    figure = cmc_figure(curves)
    traces = {t.name: t for t in figure.data}
    assert set(traces) == {name for name, _ in curves}
    for name, result in curves:
        assert list(traces[name].y) == result.cmc.tolist() and list(traces[name].x) == list(range(1, 26))
    assert len({(t.line.dash, t.marker.symbol) for t in figure.data}) == 7
    assert len({t.line.dash for t in figure.data[-6:]}) == 6       # the first six differ in dash alone too
    assert [t.name for t in figure.data] == [name for name, _ in curves]
    widths, sizes = [t.line.width for t in figure.data], [t.marker.size for t in figure.data]
    assert widths[:4] == sorted(widths[:4], reverse=True) and len(set(widths[:4])) == 4   # nested strokes
    assert sizes[:4] == sorted(sizes[:4], reverse=True) and len(set(sizes[:4])) == 4
    assert list(figure.layout.xaxis.range) == [0.5, 20.5]          # ranks 1-20 shown, more by zooming out
    assert "rank %{x}" in figure.data[0].hovertemplate and "%{y:.2%}" in figure.data[0].hovertemplate
    with pytest.raises(InputError, match="no CMC curve"):
        cmc_figure([])


def test_html_report_frames_matches_and_survives_unreadable_images(tmp_path: Path) -> None:
    from PIL import Image

    from vireid.errors import InputError
    from vireid.evaluation.report import RankList, write_html_report

    paths = []
    for i, colour in enumerate(["red", "green", "blue"]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (48, 96), colour).save(paths[-1])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    lists = {"plain": [RankList(7, 3, 3, paths[0], [3, 4, 3], [1, 2, 4], [paths[1], paths[2], str(broken)],
                                [0.1, 0.2, 0.3])],
             "aim": [RankList(7, 3, 3, paths[0], [4, 3, 3], [2, 1, 4], [paths[2], paths[1], None], [0.5, 0.6, 0.7])]}
    out = write_html_report(tmp_path / "report.html", "demo", [("plain", _result([0.5, 1.0])),
                                                               ("aim", _result([0.6, 1.0]))],
                            rank_lists=lists, notes=["synthetic data"])
    parser = _parse(out)
    plain, aim = parser.tiles[7]["plain"], parser.tiles[7]["aim"]
    assert [t["class"] for t in plain] == ["tile match", "tile miss", "tile match"]
    assert [t["class"] for t in aim] == ["tile miss", "tile match", "tile match"]
    assert [t["thumbnail"] for t in plain + aim] == [True, True, False, True, True, False]
    assert "d 0.2" in str(plain[1]["text"]) and "cam 4" in str(plain[2]["text"])
    page = out.read_text()
    assert page.count("data:image/jpeg;base64,") == 5                  # query once, then 4 readable tiles
    assert "synthetic data" in page and "<td>50.00</td>" in page and "<td>25.00</td>" in page
    with pytest.raises(InputError, match="different queries"):
        write_html_report(tmp_path / "bad.html", "demo", [("plain", _result([1.0]))],
                          rank_lists={"plain": lists["plain"], "aim": [RankList(8, 3, 3, None, [], [], [], [])]})
    assert not (tmp_path / "bad.html").exists()


def test_report_draws_in_chromium_without_network(feature_file, tmp_path: Path) -> None:
    """In a real headless Chromium the embedded plotly.js draws one curve per method, every
    thumbnail decodes, and the page makes no request beyond its own file."""
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip(f"{chromium} not installed")
    from playwright.sync_api import sync_playwright

    path, root, _ = feature_file
    html_out = tmp_path / "report.html"
    assert main(["evaluate", str(path), "--protocol", "sysu", "--rerank", "aim,krr", "--html", str(html_out),
                 "--image-root", str(root)]) == 0
    requests, errors = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), headless=True,
                                    args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                          "--disable-background-networking", "--disable-component-update"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("request", lambda request: requests.append(request.url))
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(html_out.as_uri())
        page.wait_for_selector("#cmc-plot .scatterlayer .trace")
        drawn = page.locator("#cmc-plot .scatterlayer .trace").count()
        legend = page.locator("#cmc-plot .legend .legendtext").all_text_contents()
        images = page.locator(".tile img")
        widths = [images.nth(i).evaluate("img => [img.complete, img.naturalWidth, img.clientWidth, img.clientHeight]")
                  for i in range(images.count())]
        browser.close()
    assert drawn == 3 and legend[0] == "plain" and len(legend) == 3
    assert widths and all(done and natural > 0 and (shown_w, shown_h) == (64, 128)
                          for done, natural, shown_w, shown_h in widths)
    assert errors == [] and [url for url in requests if not url.startswith(("file:", "data:"))] == []
