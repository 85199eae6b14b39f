"""report: a real run (preprocess, train, generate at tiny size) turned into a page, loaded in real
headless Chromium through the DevTools protocol: no console errors, every image decoded with a
non-zero size, every audio element with a duration, a screenshot.

Chromium is Debian's ``chromium`` (skipped with the reason when absent); it is started by the test
on 127.0.0.1 with an empty profile and stopped (its whole process group) whatever happens.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from corpora import midi_files
from midiforge.cli import main as cli_main

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("Debian's chromium is not installed (apt install chromium): the page cannot be checked in a browser")


class Chromium:
    """Headless Chromium on a loopback DevTools port, driven over CDP (aiohttp's websocket client)."""

    def __init__(self, exe: str, profile: Path, log: Path) -> None:
        self.log = open(log, "wb")
        self.proc = subprocess.Popen(
            [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
             "--remote-debugging-address=127.0.0.1", "--window-size=1280,1000", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if port_file.is_file() and len(port_file.read_text().splitlines()) >= 2:
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        else:
            raise RuntimeError("chromium wrote no DevToolsActivePort within 60 s")
        self.port = int(port_file.read_text().splitlines()[0])
        deadline = time.monotonic() + 30
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=10) as r:
                pages = [t for t in json.loads(r.read()) if t.get("type") == "page"]
            if pages or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if not pages:
            raise RuntimeError("chromium has no page target")
        self.ws_url = pages[0]["webSocketDebuggerUrl"]
        assert self.ws_url.startswith("ws://127.0.0.1:"), self.ws_url

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=10)
        self.log.close()

    def check_page(self, url: str, screenshot: Path, timeout: float = 60.0) -> dict:
        return asyncio.run(asyncio.wait_for(self._check(url, screenshot), timeout))

    async def _check(self, url: str, screenshot: Path) -> dict:
        import aiohttp

        errors: list[str] = []
        loaded = asyncio.Event()
        pending: dict[int, asyncio.Future] = {}
        counter = iter(range(1, 1_000_000))

        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(self.ws_url, max_msg_size=0) as ws:
                async def reader():
                    async for msg in ws:
                        if msg.type != aiohttp.WSMsgType.TEXT:
                            continue
                        data = json.loads(msg.data)
                        if "id" in data and data["id"] in pending:
                            pending.pop(data["id"]).set_result(data)
                            continue
                        method, params = data.get("method"), data.get("params", {})
                        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                            errors.append("console: " + " ".join(str(a.get("value", a.get("description")))
                                                                 for a in params.get("args", [])))
                        elif method == "Runtime.exceptionThrown":
                            errors.append("exception: " + json.dumps(params.get("exceptionDetails", {}))[:500])
                        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                            e = params["entry"]
                            errors.append(f"log: {e.get('source')}: {e.get('text')} {e.get('url', '')}")
                        elif method == "Page.loadEventFired":
                            loaded.set()

                async def call(method: str, **params) -> dict:
                    i = next(counter)
                    fut = asyncio.get_running_loop().create_future()
                    pending[i] = fut
                    await ws.send_str(json.dumps({"id": i, "method": method, "params": params}))
                    reply = await asyncio.wait_for(fut, 30)
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply.get("result", {})

                task = asyncio.create_task(reader())
                try:
                    for domain in ("Runtime", "Log", "Page"):
                        await call(f"{domain}.enable")
                    await call("Page.navigate", url=url)
                    await asyncio.wait_for(loaded.wait(), 30)
                    probe = """
                    (async () => {
                      const audios = [...document.querySelectorAll('audio')];
                      await Promise.all(audios.map(a => (a.readyState >= 1 || a.error) ? null : new Promise(ok => {
                        a.addEventListener('loadedmetadata', ok, {once: true});
                        a.addEventListener('error', ok, {once: true});
                        setTimeout(ok, 15000);
                      })));
                      return JSON.stringify({
                        images: [...document.images].map(i => ({src: i.getAttribute('src'), complete: i.complete,
                                 w: i.naturalWidth, h: i.naturalHeight})),
                        audios: audios.map(a => ({src: a.getAttribute('src'), duration: a.duration,
                                 error: a.error ? a.error.code : null})),
                        links: [...document.querySelectorAll('a[href]')].map(a => a.getAttribute('href')),
                        text: document.body.innerText,
                      });
                    })()"""
                    res = await call("Runtime.evaluate", expression=probe, awaitPromise=True, returnByValue=True)
                    page = json.loads(res["result"]["value"])
                    metrics = await call("Page.getLayoutMetrics")
                    size = metrics.get("cssContentSize") or metrics["contentSize"]
                    shot = await call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                                      clip={"x": 0, "y": 0, "width": min(size["width"], 1280),
                                            "height": min(size["height"], 6000), "scale": 1})
                    screenshot.write_bytes(base64.b64decode(shot["data"]))
                    await asyncio.sleep(0.5)  # late console errors
                finally:
                    task.cancel()
        page["errors"] = errors
        return page


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real run at tiny size: 16 ff files preprocessed, a small LSTM trained 2 short epochs, 3 pieces."""
    files = midi_files("ff")[:16]
    root = tmp_path_factory.mktemp("run")
    corpus = root / "corpus"
    corpus.mkdir()
    for f in files:
        shutil.copy(f, corpus / f.name)
    import ray

    try:  # preprocess starts a private local Ray in this process: stopped here, whatever happens
        assert cli_main(["preprocess", str(corpus), str(root / "tokens"), "--workers", "1",
                         "--split", "0.6,0.2,0.2"]) == 0
    finally:
        ray.shutdown()
    assert cli_main(["train", str(root / "tokens"), str(root / "model"), "--epochs", "2", "--steps-per-epoch", "4",
                     "--validation-steps", "2", "--lstm-units", "32", "--embedding-dim", "16", "--batch-size", "8",
                     "--seq-len", "32", "--progress", "none"]) == 0
    assert cli_main(["generate", str(root / "model"), str(root / "pieces"), "--num-pieces", "3", "--seed", "1",
                     "--max-tokens", "300", "--workers", "0", "--no-progress"]) == 0
    return root


def test_report_loads_in_headless_chromium(run_dir, tmp_path, capsys):
    exe = _chromium()
    pytest.importorskip("aiohttp", reason="aiohttp (installed with ray[default]) speaks the DevTools websocket")
    code = cli_main(["report", str(run_dir), "--out", str(tmp_path / "report"), "--audio-seconds", "10"])
    assert code == 0
    summary = json.loads([line for line in capsys.readouterr().out.splitlines() if line.startswith("{")][-1])
    index = tmp_path / "report" / "index.html"
    assert index.is_file() and summary["pieces"] == 3
    evaluation = json.loads((tmp_path / "report" / "evaluate.json").read_text())
    assert evaluation["loss"]["targets"] > 0 and evaluation["memorisation"]["train_pieces"] > 0

    profile = tmp_path / "profile"
    profile.mkdir()
    browser = Chromium(exe, profile, tmp_path / "chromium.log")
    try:
        page = browser.check_page(index.as_uri(), tmp_path / "report.png")
    finally:
        browser.stop()
    assert browser.proc.poll() is not None

    assert page["errors"] == [], page["errors"]
    images = page["images"]
    assert len(images) == 1 + 3, images  # the training curves and one piano roll per piece
    for img in images:
        assert img["complete"] and img["w"] > 0 and img["h"] > 0, img
    links = page["links"]
    assert "evaluate.json" in links and sum(h.endswith(".mid") for h in links) == 3
    for href in links:  # every link is relative and points at a file beside the page
        assert "://" not in href and (index.parent / href).is_file(), href
    if summary["audio_engine"]:
        assert len(page["audios"]) == 3 == summary["audio"], page["audios"]
        for a in page["audios"]:
            assert a["error"] is None and a["duration"] > 0, a
    else:  # no SoundFont or renderer here: the page must say how to get audio
        assert page["audios"] == [] and "fluidsynth" in page["text"].lower()
    assert "Evaluation against the reference" in page["text"] and "pitch_class_entropy" in page["text"]
    shot = tmp_path / "report.png"
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    keep = os.environ.get("MIDIFORGE_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)


def test_report_without_soundfont_says_how_to_get_audio(run_dir, tmp_path, monkeypatch, capsys):
    from midiforge.pipeline import report

    monkeypatch.setattr(report, "SOUNDFONT_PLACES", ())
    monkeypatch.delenv("MIDIFORGE_SOUNDFONT", raising=False)
    assert cli_main(["report", str(run_dir), "--out", str(tmp_path / "r"), "--no-loss"]) == 0
    text = (tmp_path / "r" / "index.html").read_text()
    assert "<audio" not in text and "apt install fluid-soundfont-gm fluidsynth" in text
    assert not list((tmp_path / "r" / "assets").glob("*.wav"))
    assert cli_main(["report", str(run_dir), "--out", str(tmp_path / "r2"), "--soundfont",
                     str(tmp_path / "missing.sf2")]) == 2
    assert "missing.sf2: --soundfont: no such file" in capsys.readouterr().err
