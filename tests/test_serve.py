"""`gill-hf serve`: the conversation-to-messages conversion, bad input, ordering and the busy answer,
and the app in a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium with
the driver path given: nothing is downloaded). Budget: ~40 s; the browser test skips, saying why,
where Chromium or the serve extra is not installed."""

import os
import shutil
import socket
import threading
import time
import urllib.request
from io import BytesIO
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from gill_hf.serve import BUSY_MESSAGE, GillChat, conversation_messages

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
TEMPLATE = "{% for m in messages %}<{{ m.role }}> {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"


def _image(tmp_path, name="a.png", colour="red") -> str:
    path = tmp_path / name
    PIL.Image.new("RGB", (24, 24), colour).save(path)
    return str(path)


def test_conversation_messages_keep_images_in_order_and_merge_turns(tmp_path):
    first, second = _image(tmp_path, "1.png"), _image(tmp_path, "2.png", "blue")
    history = [{"role": "user", "content": {"path": first}}, {"role": "user", "content": "What is it?"},
               {"role": "assistant", "content": "A red square."}, {"role": "assistant", "content": {"path": second}},
               {"role": "assistant", "content": "generated", "metadata": {"title": "image"}}]
    messages = conversation_messages(history, "Now make it green.", [])
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert [i["type"] for i in messages[0]["content"]] == ["image", "text"]
    assert [i["type"] for i in messages[1]["content"]] == ["text", "image"]  # the label is not context
    assert messages[1]["content"][1]["image"].getpixel((0, 0)) == (0, 0, 255)
    assert messages[2]["content"] == [{"type": "text", "text": "Now make it green."}]


@pytest.fixture
def tiny_chat(tmp_path):
    from test_pipeline import tiny_pipeline

    pipe = tiny_pipeline(tmp_path)
    pipe.processor.tokenizer.chat_template = TEMPLATE
    pipe.set_progress_bar_config(disable=True)
    return GillChat(pipe, max_new_tokens=10, queue_size=1, image_dir=tmp_path / "answers")


def test_bad_input_gets_a_message_and_the_app_keeps_answering(tiny_chat, tmp_path):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    for message, expected in (({"text": "", "files": []}, "Please type"), ({"text": "x" * 5000, "files": []}, "characters long"),
                              ({"text": "look", "files": [str(text_file)]}, "not a supported image")):
        assert expected in tiny_chat.respond(message, [])[-1]["content"]
    reply = tiny_chat.respond({"text": "Draw a dog", "files": [_image(tmp_path)]}, [], 2, 2.0, 0, "generated", True)
    assert any(isinstance(m["content"], dict) and Path(m["content"]["path"]).is_file() for m in reply)
    note = next(m for m in reply if (m.get("metadata") or {}).get("title"))  # how the image was chosen
    assert note["metadata"]["title"] == "generated image" and not note["content"].startswith("generated image")


def test_requests_are_answered_in_order_and_past_the_queue_get_busy(tiny_chat):
    replies = {}
    call = tiny_chat.call_pipeline

    def slowly(*args, **kwargs):  # each answer takes a while, so the requests overlap
        time.sleep(0.3)
        return call(*args, **kwargs)

    tiny_chat.call_pipeline = slowly
    threads = []
    for i, text in enumerate(["first", "second", "third"]):
        thread = threading.Thread(target=lambda t=text: replies.__setitem__(t, tiny_chat.respond({"text": t}, [], 2, 2.0, 0)))
        thread.start()
        threads.append(thread)
        time.sleep(0.05)
    for thread in threads:
        thread.join(60)
    assert replies["third"][-1]["content"] == BUSY_MESSAGE  # one running, one waiting (queue_size=1)
    assert tiny_chat.answered[:2] == ["first", "second"] and replies["second"][-1]["content"] != BUSY_MESSAGE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="Debian's chromium + chromium-driver are not installed (make browser)")
def test_the_app_in_a_real_browser_answers_an_image_edit_like_the_pipeline(tmp_path):
    pytest.importorskip("gradio", reason="the serve extra (gradio) is not installed")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from gill_hf.serve import launch
    from gill_hf.world.gill_tiny import GILL_TINY_DIR, load_gill_tiny_pipeline

    if not (GILL_TINY_DIR / "gill_adapter.safetensors").is_file():
        pytest.skip("GILL-tiny is not shipped in this checkout")
    pipe = load_gill_tiny_pipeline()
    pipe.register_to_config(default_num_inference_steps=8)  # the app's slider default: a quick answer
    pipe.set_progress_bar_config(disable=True)
    chat = GillChat(pipe, max_new_tokens=12, image_dir=tmp_path / "answers")
    source = tmp_path / "shape.png"
    from gill_hf.world.data import sample_example
    from gill_hf.world.render import render_scene

    render_scene(sample_example(60_000, "validation", 5, num_objects=1)[0]).resize((96, 96), PIL.Image.NEAREST).save(source)
    port = _free_port()
    app = launch(chat, port=port, block=False)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chrome'}", "--window-size=1200,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 60)
        box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#gill-input textarea"))
        driver.find_element(By.CSS_SELECTOR, "#gill-input input[type=file]").send_keys(str(source))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gill-input img"))
        # The settings' force_image box, ticked as a user would (GILL-tiny v2 answers this chat turn in words
        # unless asked for an image)
        driver.find_element(By.CSS_SELECTOR, "#gill-settings button").click()
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#gill-force-image input[type=checkbox]").is_displayed())
        driver.find_element(By.CSS_SELECTOR, "#gill-force-image input[type=checkbox]").click()
        box.send_keys("The same shape, but green.")
        box.send_keys(Keys.ENTER)
        answer = WebDriverWait(driver, 180).until(
            lambda d: [img for img in d.find_elements(By.CSS_SELECTOR, "#gill-chat img") if "answer-" in (img.get_attribute("src") or "")])
        shown = PIL.Image.open(BytesIO(urllib.request.urlopen(answer[-1].get_attribute("src"), timeout=30).read())).convert("RGB")
        artifacts = Path(os.environ.get("GILL_HF_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "out" / "test-artifacts"))
        artifacts.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(artifacts / "serve.png"))
        page = driver.find_element(By.ID, "gill-chat").text
    finally:
        driver.quit()
        app.close()
    direct = chat.call_pipeline(conversation_messages([], "The same shape, but green.", [str(source)]), 8, 4.0, 0, "auto", True)
    assert direct.images[0], "the pipeline answered without an image"
    expected = direct.images[0][0].convert("RGB")
    assert shown.width % expected.width == 0 and shown.width > expected.width  # shown enlarged, pixels kept
    shown = shown.resize(expected.size, PIL.Image.NEAREST)
    assert np.abs(np.asarray(shown, dtype=np.float32) - np.asarray(expected, dtype=np.float32)).max() <= 1.0  # within 1/255
    assert direct.image_sources[0][0] in page
