"""Open every bundled workflow in the real ComfyUI frontend (headless Chromium) as a first-time user would.

Opt-in, not part of CI. Needs a ComfyUI checkout (``COMFYUI_PATH``), its Python with the pack's
requirements and ``selenium``, and Debian's ``chromium`` + ``chromium-driver``::

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python tests/frontend/check_frontend.py --shots shots/

It starts ComfyUI on 127.0.0.1 with the pack in a temporary base folder and *no* models (a first run; the
frontend is the ``comfyui_frontend_package`` of that Python), then checks in a 1280×800 window:

- the template browser lists every workflow with its thumbnail loaded and a readable title; no failed
  ``.jpg`` (or any other) request to the pack's files;
- each workflow, loaded like a dropped file, shows its "Read me" note and every node inside the window,
  none under the sidebar or the menu / tab bar (tested with ``elementFromPoint`` at each node's corners);
- the note or the missing-models dialog names the substitute encoder;
- the help page of every pack node is served (``/extensions/<pack>/docs/<NodeId>.md``, ``…/en.md``, ``…/zh.md``),
  opens in the node-info panel from the selection toolbox, and the
  zh locale (``/i18n``) names every node;
- no console error mentions the pack.

``--thumbnails`` also writes ``workflows/<name>.jpg`` from the loaded view (chrome hidden). Exit code 0 = all
checks passed, 1 = a check failed, 0 with a "SKIPPED" line when chromium or selenium is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
PACK = "zimage-dimfix"
NODE_IDS = ("DimFixQwen3EmbeddingLoader", "DimFixHiddenLayerSelect", "DimFixDimensionAnalyzer",
            "DimFixEmbeddingDimensionFix", "DimFixEmbeddingBlend", "DimFixComparisonGrid")
SUBSTITUTE = "Qwen3-Embedding-4B"
WINDOW = (1280, 800)


def find_tools() -> tuple[str, str] | str:
    """(chromium, chromedriver) paths, or the reason they are missing."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed in this Python (pip install selenium)"
    chrome = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not chrome or not driver:
        return "chromium / chromedriver not found (Debian: apt-get install chromium chromium-driver)"
    return chrome, driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(comfy: Path, base: Path, python: str) -> tuple[subprocess.Popen, str, Path]:
    from zdf_testkit.live_comfy import install_pack

    install_pack(base / "custom_nodes", PACK)
    (base / "models").mkdir()
    port = free_port()
    log_path = base / "server.log"
    from zdf_testkit.host_env import server_env

    cmd = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base),
           "--database-url", "sqlite:///:memory:", "--disable-api-nodes", "--log-stdout"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=comfy, env=server_env(), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"ComfyUI exited with {proc.returncode}:\n{log_path.read_text(errors='replace')[-3000:]}")
        try:
            urllib.request.urlopen(url + "/system_stats", timeout=2).read()
            return proc, url, log_path
        except OSError:
            if time.monotonic() > deadline:
                proc.terminate()
                raise SystemExit(f"ComfyUI did not answer in 240 s; log: {log_path}")
            time.sleep(0.5)


def browser(chrome: str, driver_path: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={WINDOW[0]},{WINDOW[1]}", "--hide-scrollbars"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    drv = webdriver.Chrome(service=Service(driver_path), options=opts)
    set_viewport(drv, WINDOW)
    return drv


def wait_for(drv, script: str, timeout: float = 60.0, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = drv.execute_script(script)
        if value:
            return value
        time.sleep(0.3)
    raise TimeoutError(f"timed out waiting for {what or script}")


APP_READY = "return !!(window.app && window.app.graph && window.app.canvas && window.app.canvas.ds)"
CLICK_CLOSE = """
const dialogs = Array.from(document.querySelectorAll('.p-dialog, [role="dialog"]'));
const top = dialogs[dialogs.length - 1]; if (!top) return;
const b = top.querySelector('.p-dialog-close-button, .p-dialog-header-close, button[aria-label="Close" i],'
                            + ' button[aria-label*="close" i]')
  || Array.from(top.querySelectorAll('button')).find(b => b.querySelector('.pi-times, [class*="x-"], svg'));
if (b) b.click();
"""
#: The 1.4x frontend reports missing models in a dismissible "N errors found" panel instead of a dialog.
ERROR_PANEL = """
const hits = Array.from(document.querySelectorAll('div')).filter(d => /\\d+ errors? found/i.test(d.innerText || '')
  && d.querySelector('button'));
hits.sort((a, b) => a.innerText.length - b.innerText.length);
const panel = hits[0]; if (!panel) return null;
const text = panel.innerText;
const close = Array.from(panel.querySelectorAll('button')).find(b => !b.innerText.trim());
if (arguments[0] && close) close.click();
return text;
"""
OPEN_DIALOGS = "return document.querySelectorAll('.p-dialog, [role=\"dialog\"]').length"


def close_dialogs(drv) -> None:
    """Press Escape until no dialog is open (the template browser opens by itself on a first start)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    for _ in range(6):
        if not drv.execute_script(OPEN_DIALOGS):
            return
        drv.execute_script(CLICK_CLOSE)
        time.sleep(0.4)
        ActionChains(drv).send_keys(Keys.ESCAPE).perform()
        time.sleep(0.6)
    buttons = drv.execute_script("return Array.from(document.querySelectorAll('.p-dialog button'))"
                                 ".map(b => b.outerHTML.slice(0, 200))")
    raise RuntimeError(f"a dialog stays open; its buttons: {buttons}")
DIALOG_TEXT = ("return Array.from(document.querySelectorAll('.p-dialog, [role=\"dialog\"], .p-toast-message'))"
               ".map(d => d.innerText)")
NODE_BOXES = """
const app = window.app, ds = app.canvas.ds, el = app.canvas.canvas, r = el.getBoundingClientRect();
const title = (window.LiteGraph && LiteGraph.NODE_TITLE_HEIGHT) || 30;
const widgetOf = e => e.closest('.dom-widget, .comfy-markdown, .lg-node, [data-node-id]');
return app.graph._nodes.map(n => {
  const x0 = (n.pos[0] + ds.offset[0]) * ds.scale + r.left, y0 = (n.pos[1] - title + ds.offset[1]) * ds.scale + r.top;
  const x1 = (n.pos[0] + n.size[0] + ds.offset[0]) * ds.scale + r.left;
  const y1 = (n.pos[1] + n.size[1] + ds.offset[1]) * ds.scale + r.top;
  const i = 3, xm = (x0 + x1) / 2, ym = (y0 + y1) / 2;
  const pts = [[x0 + i, y0 + i], [xm, y0 + i], [x1 - i, y0 + i], [x0 + i, ym], [x1 - i, ym], [x0 + i, y1 - i],
               [xm, y1 - i], [x1 - i, y1 - i]];
  const covered = pts.map(([x, y]) => {
    if (x < 0 || y < 0 || x >= window.innerWidth || y >= window.innerHeight) return 'outside the window';
    const e = document.elementFromPoint(x, y);
    if (!e || e === el || widgetOf(e)) return null;
    return ((e.className && e.className.toString()) || e.tagName).slice(0, 60) + ` at ${Math.round(x)},${Math.round(y)}`;
  }).filter(Boolean);
  return {id: n.id, type: n.type, title: n.title, box: [x0, y0, x1, y1].map(Math.round), covered};
});
"""


def pack_console_errors(drv) -> tuple[list[str], list[str]]:
    """(errors that mention the pack, failed requests to the pack's URLs) from the browser logs so far."""
    errors = [e["message"] for e in drv.get_log("browser") if e["level"] == "SEVERE"]
    failed = []
    for entry in drv.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg.get("method") == "Network.responseReceived":
            resp = msg["params"]["response"]
            if resp["status"] >= 400 and (PACK in resp["url"] or resp["url"].endswith(".jpg")):
                failed.append(f"{resp['status']} {resp['url']}")
    mine = [e for e in errors if PACK in e or "DimFix" in e or ".jpg" in e]
    return mine, failed


def check_templates(drv, url: str, shots: Path | None) -> list[str]:
    problems = []
    listed = json.loads(urllib.request.urlopen(url + "/workflow_templates").read()).get(PACK, [])
    stems = sorted(p.stem for p in (ROOT / "workflows").glob("*.json"))
    if sorted(listed) != stems:
        problems.append(f"template list {sorted(listed)} != workflows {stems}")
    close_dialogs(drv)
    drv.execute_script("window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    time.sleep(2)
    # open the pack's category if the browser groups by module
    drv.execute_script("""for (const e of document.querySelectorAll('.p-dialog *, [role="dialog"] *')) {
        if (e.children.length === 0 && e.innerText && e.innerText.trim() === arguments[0]) { e.click(); break; } }""",
                       PACK)
    time.sleep(3)
    cards = drv.execute_script(CARDS, stems)
    if shots:
        drv.save_screenshot(str(shots / "templates.png"))
    for stem in stems:
        card = cards.get(stem)
        if not card:
            problems.append(f"no template card titled {stem!r}")
        elif not card["image"]:
            problems.append(f"template card {stem!r} shows no loaded thumbnail")
        jpg = f"{url}/api/workflow_templates/{PACK}/{urllib.request.quote(stem)}.jpg"
        try:
            with urllib.request.urlopen(jpg) as r:
                if r.headers.get("content-type") != "image/jpeg":
                    problems.append(f"{jpg} is served as {r.headers.get('content-type')}")
        except OSError as e:
            problems.append(f"{jpg}: {e}")
    print(f"  templates: {len(cards)} pack cards: " + "; ".join(f"{k!r} ({v['description']!r}, thumbnail "
                                                           f"{v['image']})" for k, v in cards.items()))
    close_dialogs(drv)
    return problems


def check_workflow(drv, path: Path, shots: Path | None, thumbs: bool) -> list[str]:
    problems = []
    data = json.loads(path.read_text(encoding="utf-8"))
    close_dialogs(drv)
    drv.execute_script("window.__zdfLoaded = false; window.app.loadGraphData(arguments[0], true, true, arguments[1])"
                       ".then(() => { window.__zdfLoaded = true; })", data, path.name)
    wait_for(drv, "return window.__zdfLoaded", 60, f"loading {path.name}")
    time.sleep(2.5)
    dialogs = drv.execute_script(DIALOG_TEXT)
    panel = drv.execute_script(ERROR_PANEL, False)
    if panel:
        dialogs.append(panel)
    note = next((n["widgets_values"][0] for n in data["nodes"] if n["type"] == "MarkdownNote"), "")
    if not any(SUBSTITUTE in d for d in dialogs) and SUBSTITUTE not in note:
        problems.append(f"{path.name}: neither the note nor a dialog names {SUBSTITUTE}")
    if shots:
        drv.save_screenshot(str(shots / f"{path.stem}.dialog.png"))
    close_dialogs(drv)
    drv.execute_script(ERROR_PANEL, True)
    time.sleep(1)
    boxes = drv.execute_script(NODE_BOXES)
    for b in boxes:
        if b["covered"]:
            problems.append(f"{path.name}: node {b['id']} {b['title'] or b['type']!r} at {b['box']}: {b['covered']}")
    notes = [b for b in boxes if b["type"] == "MarkdownNote"]
    if not notes:
        problems.append(f"{path.name}: no Read me note")
    ds = drv.execute_script("return [window.app.canvas.ds.scale, ...window.app.canvas.ds.offset]")
    print(f"  {path.name}: {len(boxes)} nodes, view scale {ds[0]:.3f}, {len(problems)} problem(s); dialogs: "
          f"{[d.splitlines()[0][:60] for d in dialogs if d]}")
    if shots:
        drv.save_screenshot(str(shots / f"{path.stem}.png"))
    if thumbs:
        write_thumbnail(drv, path.with_suffix(".jpg"))
    return problems


#: Template cards of the pack: title -> description and the size of the loaded thumbnail (blob URLs).
CARDS = """
const out = {};
for (const e of document.querySelectorAll('.p-dialog *, [role="dialog"] *')) {
  const t = (e.children.length === 0 && e.innerText || '').trim();
  if (!arguments[0].includes(t) || out[t]) continue;
  let card = e.parentElement;
  while (card && !card.querySelector('img')) card = card.parentElement;
  if (!card) continue;
  const img = card.querySelector('img');
  const lines = card.innerText.split('\\n').map(x => x.trim()).filter(Boolean);
  out[t] = {description: lines[lines.indexOf(t) + 1] || '',
            image: img.complete && img.naturalWidth >= 100 ? `${img.naturalWidth}x${img.naturalHeight}` : null};
}
return out;
"""
HIDE_CHROME = """
const c = window.app.canvas;
c.render_info = c.show_info = !arguments[0];
c.setDirty(true, true);
let s = document.getElementById('zdf-hide');
if (!s) { s = document.createElement('style'); s.id = 'zdf-hide'; document.head.appendChild(s); }
s.textContent = arguments[0] ? `.side-tool-bar-container, .comfyui-menu, .workflow-tabs-container, .comfyui-body-top,
  .actionbar, .p-toast, .graph-canvas-menu, .minimap-main-container, [class*="minimap"], [class*="sidebar"],
  [class*="topbar"], [class*="TopMenu"], .p-panel, .comfy-vue-node-search-container, .subgraph-breadcrumb,
  [class*="breadcrumb"] {display: none !important}` : '';
"""


THUMB_WINDOW = (1800, 1800)
#: Fit every node into the canvas (at most scale 0.8) and return the nodes' screen rectangle.
FIT_ALL = """
const app = window.app, ds = app.canvas.ds, el = app.canvas.canvas, r = el.getBoundingClientRect();
const title = (window.LiteGraph && LiteGraph.NODE_TITLE_HEIGHT) || 30, pad = 30;
const ns = app.graph._nodes;
const x0 = Math.min(...ns.map(n => n.pos[0])), y0 = Math.min(...ns.map(n => n.pos[1] - title));
const x1 = Math.max(...ns.map(n => n.pos[0] + n.size[0])), y1 = Math.max(...ns.map(n => n.pos[1] + n.size[1]));
const k = Math.min(0.8, (r.width - 2 * pad) / (x1 - x0), (r.height - 2 * pad) / (y1 - y0));
ds.scale = k; ds.offset[0] = pad / k - x0; ds.offset[1] = pad / k - y0;
app.canvas.setDirty(true, true);
return [r.left + pad, r.top + pad, r.left + pad + (x1 - x0) * k, r.top + pad + (y1 - y0) * k, k];
"""


def set_viewport(drv, size: tuple[int, int]) -> None:
    drv.set_window_size(*size)
    inner = drv.execute_script("return [window.innerWidth, window.innerHeight]")
    drv.set_window_size(2 * size[0] - inner[0], 2 * size[1] - inner[1])


def write_thumbnail(drv, dest: Path, side: int = 400) -> None:
    """A square thumbnail: the graph rendered at full detail in a large window with the frontend's chrome
    hidden, cropped to the nodes, padded with the canvas colour (template cards are square), scaled down."""
    import io

    from PIL import Image

    set_viewport(drv, THUMB_WINDOW)
    drv.execute_script(HIDE_CHROME, True)
    time.sleep(1.0)
    x0, y0, x1, y1, _ = drv.execute_script(FIT_ALL)
    time.sleep(1.0)
    png = drv.get_screenshot_as_png()
    drv.execute_script(HIDE_CHROME, False)
    set_viewport(drv, WINDOW)
    shot = Image.open(io.BytesIO(png)).convert("RGB")
    crop = shot.crop((int(x0) - 12, int(y0) - 12, int(x1) + 12, int(y1) + 12))
    edge = max(crop.size)
    square = Image.new("RGB", (edge, edge), shot.getpixel((shot.width // 2, shot.height - 3)))
    square.paste(crop, ((edge - crop.width) // 2, (edge - crop.height) // 2))
    tmp = dest.with_name(dest.name + ".tmp")
    square.resize((side, side), Image.LANCZOS).save(tmp, format="JPEG", quality=88, optimize=True)
    os.replace(tmp, dest)


def check_help_panel(drv, path: Path, shots: Path | None) -> list[str]:
    """Select the first pack node of a workflow and open its help with the selection toolbox's (i) button."""
    drv.execute_script("window.app.loadGraphData(arguments[0])", json.loads(path.read_text(encoding="utf-8")))
    time.sleep(2.5)
    close_dialogs(drv)
    drv.execute_script(ERROR_PANEL, True)
    node = drv.execute_script("""const n = window.app.graph._nodes.find(n => n.type.startsWith('DimFix'));
        window.app.canvas.selectNode(n); window.app.canvas.setDirty(true, true); return n.type""")
    time.sleep(1.5)
    if not drv.execute_script("const b = document.querySelector('[data-testid=info-button]'); if (b) b.click(); "
                              "return !!b"):
        return ["no (i) Node Info button in the selection toolbox"]
    time.sleep(3)
    if shots:
        drv.save_screenshot(str(shots / "help_panel.png"))
    body = (ROOT / "web" / "docs" / f"{node}.md").read_text(encoding="utf-8").splitlines()[1:4]
    text = drv.execute_script("return document.body.innerText")
    # the page's first sentence as rendered (markdown marks dropped); the node's own description differs
    first = re.sub(r"[`*_]", "", next(line for line in body if line.strip())).strip()[:45]
    print(f"  help panel for {node}: {'shown' if first in text else 'NOT shown'}")
    return [] if first in text else [f"the help panel of {node} does not show web/docs/{node}.md"]


def check_help_and_locale(url: str) -> list[str]:
    problems = []
    for node in NODE_IDS:
        for rel in (f"{node}.md", f"{node}/en.md", f"{node}/zh.md"):
            try:
                with urllib.request.urlopen(f"{url}/extensions/{PACK}/docs/{rel}") as r:
                    if "text/html" in r.headers.get("content-type", "") or not r.read().strip():
                        problems.append(f"help page {rel} is not markdown")
            except OSError as e:
                problems.append(f"help page {rel}: {e}")
    zh = json.loads(urllib.request.urlopen(url + "/i18n").read()).get("zh", {}).get("nodeDefs", {})
    missing = [n for n in NODE_IDS if n not in zh]
    if missing:
        problems.append(f"/i18n zh.nodeDefs lacks {missing}")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI checkout (COMFYUI_PATH)")
    p.add_argument("--shots", type=Path, help="save screenshots into this folder")
    p.add_argument("--thumbnails", action="store_true", help="write workflows/<name>.jpg from the loaded views")
    p.add_argument("--keep", action="store_true", help="keep the temporary base folder (server log)")
    args = p.parse_args(argv)
    tools = find_tools()
    if isinstance(tools, str):
        print(f"SKIPPED: {tools}")
        return 0
    if not args.comfyui or not (Path(args.comfyui) / "main.py").is_file():
        print("SKIPPED: set COMFYUI_PATH (or --comfyui) to a ComfyUI checkout")
        return 0
    if args.shots:
        args.shots.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="zdf_frontend_"))
    proc, url, log_path = start_server(Path(args.comfyui), base, sys.executable)
    problems: list[str] = []
    drv = None
    try:
        problems += check_help_and_locale(url)
        drv = browser(*tools)
        drv.get(url + "/")
        wait_for(drv, APP_READY, 120, "the ComfyUI app")
        time.sleep(3)
        if args.shots:
            drv.save_screenshot(str(args.shots / "first_open.png"))
        for path in sorted((ROOT / "workflows").glob("*.json")):
            problems += check_workflow(drv, path, args.shots, args.thumbnails)
        problems += check_templates(drv, url, args.shots)
        problems += check_help_panel(drv, ROOT / "workflows" / "Encoder blend.json", args.shots)
        errors, failed = pack_console_errors(drv)
        problems += [f"console: {e}" for e in errors] + [f"request failed: {f}" for f in failed]
    finally:
        if drv is not None:
            drv.quit()
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log = log_path.read_text(errors="replace")
        failed_import = [ln for ln in log.splitlines() if "IMPORT FAILED" in ln and PACK in ln]
        problems += [f"server: {ln}" for ln in failed_import]
        if args.keep:
            print(f"base folder kept: {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    for line in problems:
        print("FAIL", line)
    print("OK" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
