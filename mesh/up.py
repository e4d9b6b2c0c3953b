"""`mesh up`: a whole swarm on this machine (bootstrap node, donors, gateway) in one command.

Everything listens on 127.0.0.1. The layers are split evenly between the donors; the command waits
until the gateway reports a full route, prints how to reach it, and stops every process it started
on Ctrl-C or SIGTERM (or after answering `--ask`).
"""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request

from mesh.launcher import LaunchError, LocalSwarm


def wait_until_healthy(base_url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    health = base_url.removesuffix("/v1") + "/health"
    while True:
        try:
            with urllib.request.urlopen(health, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise LaunchError(f"the gateway found no full route within {timeout:.0f}s")
        time.sleep(0.5)


def ask(base_url: str, model: str, question: str, max_tokens: int = 48) -> str:
    """One chat request through the gateway, as any OpenAI client would send it."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": question}],
                       "max_tokens": max_tokens, "temperature": 0}).encode()
    request = urllib.request.Request(base_url + "/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())["choices"][0]["message"]["content"]


def curl_example(base_url: str, model: str) -> str:
    payload = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32})
    return (f"curl -s {base_url}/chat/completions -H 'Content-Type: application/json' \\\n"
            f"  -d '{payload}'")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run_up(model: str, ranges: list[str], port: int, served_name: str, question: str | None,
           timeout: float = 600.0) -> int:
    """`ranges`: the half-open layer range of each donor, together covering the model."""
    swarm = LocalSwarm(ready_timeout=timeout)
    # Ctrl-C and SIGTERM interrupt whatever is going on, start-up waits included.
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    serving = False
    try:
        print("starting the bootstrap DHT node ...", flush=True)
        swarm.start_dht()
        print(f"starting {len(ranges)} donor(s): layers {' '.join(ranges)} (loading weights) ...", flush=True)

        def announce(donor):
            print(f"  donor {len(swarm.donors)}/{len(ranges)} ready: layers {donor.start}:{donor.end} at "
                  f"{donor.address} (pid {donor.process.pid})", flush=True)

        swarm.start_donors(model, ranges, "--torch-threads", "1", "--announce-interval", "2",
                           "--model-name", served_name, on_ready=announce)
        print("starting the gateway ...", flush=True)
        _, base_url = swarm.start_gateway(model, port, "--model-name", served_name, "--served-model-name",
                                          served_name)
        wait_until_healthy(base_url, timeout)
        print(f"\nthe mesh is up: an OpenAI-compatible endpoint at {base_url} serving {served_name!r}")
        print(f"DHT: {' '.join(swarm.initial_peers)}")
        print(f"try:\n{curl_example(base_url, served_name)}\n", flush=True)
        if question is not None:
            print(f"asking: {question}")
            print(f"answer: {ask(base_url, served_name, question)}", flush=True)
            return 0
        print("Ctrl-C stops every process started here.", flush=True)
        serving = True
        while True:
            time.sleep(1.0)
            dead = [p for p in [swarm.dht, *swarm.launched, *swarm.gateways] if not p.alive()]
            if dead:
                print(f"{dead[0].name} exited unexpectedly:\n{dead[0].output()}", flush=True)
                return 1
    except KeyboardInterrupt:
        return 0 if serving else 130  # stopping a running mesh is the normal end; during start-up it is not
    except LaunchError as err:
        print(f"mesh up failed: {err}", flush=True)
        return 1
    finally:
        print("stopping every process started by mesh up ...", flush=True)
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        swarm.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
