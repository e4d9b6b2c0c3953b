"""The README's curl and openai SDK examples, run as written against a running gateway."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from client.gateway.serve import GatewayOptions

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
README_MODEL, README_KEY, README_URL = "Qwen/Qwen3-8B", "sk-mesh-123", "http://127.0.0.1:8000/v1"


@pytest.fixture(scope="module")
def gateway(demo_swarm, demo_model, start_gateway):
    return start_gateway(GatewayOptions(model=str(demo_model), initial_peers=demo_swarm.initial_peers,
                                        served_model_name=README_MODEL, api_keys=[README_KEY], route_timeout=30))


def adapt(text: str, gateway) -> str:
    return text.replace(README_URL, gateway.base_url).replace("http://127.0.0.1:8000", gateway.base_url[:-3])


def served_chats(gateway) -> float:
    counter = gateway.app.state.metrics.requests.labels("/v1/chat/completions", "200")
    return counter._value.get()


def test_sdk_example(gateway):
    example = next(b for b in re.findall(r"```python\n(.*?)```", README, flags=re.S) if "from openai import" in b)
    before = served_chats(gateway)
    out = subprocess.run([sys.executable, "-c", adapt(example, gateway)], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.endswith("\n") and out.stdout.strip()  # the answer, then the streamed story
    assert served_chats(gateway) - before == 2  # one plain and one streamed request went through


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_example(gateway):
    block = next(b for b in re.findall(r"```bash\n(.*?)```", README, flags=re.S) if b.startswith("curl"))
    out = subprocess.run(["bash", "-c", adapt(block, gateway)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    assert reply["object"] == "chat.completion" and reply["model"] == README_MODEL
    assert reply["choices"][0]["message"]["role"] == "assistant"
    assert reply["usage"]["completion_tokens"] >= 1
