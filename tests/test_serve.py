"""Evaluation and serving on a model the quickstart job really trained: the official openai client
against `kubetune serve`, the web chat page in a real headless Chromium, and `kubetune chat`."""

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from conftest import EXAMPLES, ROOT, free_port

pytestmark = pytest.mark.slow
ARTIFACTS = ROOT / "out" / "test-artifacts"


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """The README's main job, run as users run it; returns its output folder."""
    out = tmp_path_factory.mktemp("quickstart") / "nimbus-support"
    run = subprocess.run([sys.executable, "-m", "kubetune.cli", "run", str(EXAMPLES / "quickstart.yaml"),
                          "--output", str(out)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out


def wait_until_serving(url: str, proc: subprocess.Popen) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    deadline = time.monotonic() + 120
    while True:
        try:
            client.models.list()
            return
        except openai.APIConnectionError:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.5)


@pytest.fixture(scope="module")
def server(quickstart):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kubetune.cli", "serve", str(quickstart / "model"), "--port", str(port),
                             "--max-tokens", "64"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_until_serving(url, proc)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    yield url, client, proc
    proc.terminate()
    proc.wait(10)


def test_quickstart_report_shows_the_fine_tuned_model_is_better(quickstart):
    report = json.loads((quickstart / "eval_report.json").read_text())
    base, tuned = report["metrics"]["base"], report["metrics"]["fine_tuned"]
    assert tuned["valid_loss"] < base["valid_loss"] - 1.0
    assert tuned["rouge_l"] > base["rouge_l"]
    # The fine-tuned model's replies depend on what was asked; a fresh model's do not (PMI about 0).
    assert abs(base["valid_reply_pmi"]) < 0.01 and tuned["valid_reply_pmi"] > 0.04, (base, tuned)  # measured 0.0005, 0.083
    assert report["samples"] == 10 and len(report["examples"]) == 5
    assert tuned["semantic_similarity"] is not None  # the bundled MiniLM embedding model was used
    table = (quickstart / "eval_report.md").read_text()
    assert "| metric | base | fine-tuned | better |" in table and "| rouge_l |" in table
    progress = json.loads((quickstart / "progress.json").read_text())
    assert progress["phase"] == "done"
    assert progress["metrics"]["evaluation"]["rouge_l"]["fineTuned"] == pytest.approx(tuned["rouge_l"], abs=1e-4)


def test_completion_and_models(server):
    _, client, _ = server
    assert [m.id for m in client.models.list().data] == ["nimbus-support"]
    reply = client.chat.completions.create(
        model="nimbus-support", temperature=0, max_tokens=24,
        messages=[{"role": "system", "content": "You are Nimbus."}, {"role": "user", "content": "How do I export my notes?"}])
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 24 and reply.usage.prompt_tokens > 5


def test_streamed_completion_matches_the_whole_one(server):
    _, client, _ = server
    messages = [{"role": "user", "content": "I was charged twice this month"}]
    whole = client.chat.completions.create(model="nimbus-support", messages=messages, temperature=0, max_tokens=20)
    chunks = list(client.chat.completions.create(model="nimbus-support", messages=messages, temperature=0,
                                                 max_tokens=20, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 3 and text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_stop_sequences_cut_the_reply(server):
    _, client, _ = server
    messages = [{"role": "user", "content": "How do I export my notes?"}]
    full = client.chat.completions.create(model="nimbus-support", messages=messages, temperature=0, max_tokens=30)
    words = full.choices[0].message.content.split()
    assert len(words) > 2
    cut = client.chat.completions.create(model="nimbus-support", messages=messages, temperature=0, max_tokens=30,
                                         stop=[words[2]])
    assert words[2] not in cut.choices[0].message.content and cut.choices[0].finish_reason == "stop"


def test_bad_requests_get_openai_errors(server):
    _, client, _ = server
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="nimbus-support", messages=[{"role": "robot", "content": "hi"}])
    assert e.value.status_code == 400 and e.value.body["type"] == "invalid_request_error"
    assert e.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.BadRequestError, match="max_tokens must be between 1 and 64"):
        client.chat.completions.create(model="nimbus-support", messages=[{"role": "user", "content": "hi"}], max_tokens=5000)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="nimbus-support", messages=[{"role": "user", "content": "hi"}], temperature=7)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"


def test_oversized_request_is_refused(server):
    import urllib.error
    import urllib.request

    url, _, _ = server
    body = json.dumps({"messages": [{"role": "user", "content": "x" * 2_000_000}]}).encode()
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=30)
    assert e.value.code == 413 and json.loads(e.value.read())["error"]["type"] == "invalid_request_error"


def test_concurrent_requests_all_complete(server):
    _, client, proc = server

    def ask(i):
        return client.chat.completions.create(model="nimbus-support", max_tokens=16, temperature=0.7,
                                              messages=[{"role": "user", "content": f"Question {i}: can I work offline?"}])

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, range(8)))
    assert all(r.choices[0].message.content is not None for r in replies)
    assert proc.poll() is None


def test_terminal_chat(server):
    url, _, _ = server
    run = subprocess.run([sys.executable, "-m", "kubetune.cli", "chat", url], input="How do I reset my password?\n/exit\n",
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "chatting with nimbus-support" in run.stdout
    answer = run.stdout.split("bot> ", 1)[1].split("you> ")[0]
    assert answer.strip()


def test_web_chat_page_in_headless_chromium(quickstart):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kubetune.cli", "serve", str(quickstart / "model"), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=900,800"):
        options.add_argument(flag)
    wait_until_serving(f"http://127.0.0.1:{port}", proc)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(f"http://127.0.0.1:{port}/")
        wait.until(lambda d: "nimbus-support" in d.find_element(By.ID, "model").text)
        driver.find_element(By.CSS_SELECTOR, "details summary").click()
        driver.find_element(By.ID, "system").send_keys("You are Nimbus, the support assistant for Nimbus Notes.")
        box = driver.find_element(By.ID, "input")
        box.send_keys("How do I export all my notes?")
        driver.find_element(By.ID, "send").click()
        reply = wait.until(lambda d: [e for e in d.find_elements(By.CSS_SELECTOR, ".msg.assistant") if e.text.strip()])
        wait.until(lambda d: d.find_element(By.ID, "send").is_enabled())  # the stream has ended
        assert reply[0].text.strip()
        assert driver.find_element(By.CSS_SELECTOR, ".msg.user").text == "How do I export all my notes?"
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "chat-page.png"))

        proc.terminate()  # the server goes away: the page says so instead of hanging
        proc.wait(10)
        box.send_keys("Are you still there?")
        driver.find_element(By.ID, "send").click()
        error = wait.until(lambda d: d.find_element(By.ID, "error").text)
        assert "Cannot reach the server" in error
        driver.save_screenshot(str(ARTIFACTS / "chat-page-server-down.png"))
    finally:
        driver.quit()
        if proc.poll() is None:
            proc.kill()
