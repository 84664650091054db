"""Horizontal mode under Serve's autoscaling: a burst scales the replicas (all attached to the same
expert shards) out, the quiet after it scales them back in while requests still arrive, and no
request is lost or answered differently from the vertical app."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from tests.fixtures.resources import cpus_come_back
from tests.fixtures.serving import PROMPTS, client


def _running_replicas(app: str) -> int:
    from ray import serve

    status = serve.status().applications[app].deployments["MorayServer"]
    return status.replica_states.get("RUNNING", 0)


def test_replicas_scale_out_and_in_under_load_and_lose_no_request(serve_app, ray_local, tiny_model_dir):
    from ray import serve

    from moray.jobs.serve.app import ServeSettings, application
    from moray.platform.config import from_dict

    settings = from_dict(ServeSettings, {
        "model": str(tiny_model_dir), "served_model_name": "tiny", "api_keys": [serve_app.api_key],
        "engine": {"max_num_seqs": 8, "max_waiting": 64}, "torch_threads": 1, "mode": "horizontal", "cpus": 0.25,
        "expert_shards": {"num_shards": 2, "cpus": 0.25},
    })  # fmt: skip
    scaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, "upscale_delay_s": 0.5,
               "downscale_delay_s": 2.0, "look_back_period_s": 1.0}  # fmt: skip
    cpus = ray_local.available_resources().get("CPU", 0)
    serve.run(application(settings, autoscaling_config=scaling), name="moray-as", route_prefix="/as")
    root = serve_app.root.rsplit("/", 1)[0] + "/as"
    scaled, vertical = client(root, serve_app), client(serve_app.root, serve_app)
    kw = dict(model="tiny", max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    answers: dict[str, object] = {}
    seen = {"max": 1, "after": None}

    def ask(prompt):
        try:
            answers[prompt] = scaled.completions.create(prompt=prompt, **kw).choices[0].text
        except Exception as e:  # counted below: none may fail
            answers[prompt] = e

    try:
        # 8 clients asking back to back against a target of 2 per replica: until it has scaled out
        stop, burst = threading.Event(), []

        def client_loop(k: int) -> None:
            while not stop.is_set():
                prompt = f"{PROMPTS[k % 3]} burst {k}-{len(burst)}"
                burst.append(prompt)
                ask(prompt)

        with ThreadPoolExecutor(8) as pool:
            for k in range(8):
                pool.submit(client_loop, k)
            try:
                deadline = time.monotonic() + 180
                while time.monotonic() < deadline and seen["max"] < 2:
                    seen["max"] = max(seen["max"], _running_replicas("moray-as"))
                    time.sleep(0.2)
                time.sleep(2.0)  # both replicas answer a while
            finally:
                stop.set()
        # then one request at a time: below the target, so the replicas scale back in while it runs
        trickle = []
        deadline = time.monotonic() + 120
        while (time.monotonic() < deadline and _running_replicas("moray-as") > 1) or len(trickle) < 3:
            prompt = f"{PROMPTS[len(trickle) % 3]} trickle {len(trickle)}"
            trickle.append(prompt)
            ask(prompt)
        seen["after"] = _running_replicas("moray-as")
    finally:
        serve.delete("moray-as")
    cpus_come_back(ray_local, cpus)
    assert seen["max"] == 2 and seen["after"] == 1  # it did scale out, and back in
    failed = {p: a for p, a in answers.items() if not isinstance(a, str)}
    assert not failed
    for prompt in burst[:4] + trickle[-2:]:
        assert answers[prompt] == vertical.completions.create(prompt=prompt, **kw).choices[0].text
