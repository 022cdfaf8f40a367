"""Generation on OpenAI-compatible servers (vLLM, SGLang, `transformers serve`): the recipe's `generation:` section.

    generation:
      backend: openai
      endpoints: [http://gpu1:8000/v1, http://gpu2:8000/v1]
      model: llava-hf/llava-v1.6-mistral-7b-hf     # the name the servers serve (default: model.name_or_path)
      api_key_env: STIC_GENERATION_API_KEY         # the key is read from this variable, never logged or written

`OpenAIGenerator.generate` has the interface of the local `BatchGenerator`, so selfgen, the stage-2 descriptions
and eval only choose which engine to build; parts, resumes and `accelerate launch` sharding stay as they are.
Each request carries the messages the local engine renders (`prompt_messages` with the image first in the user
turn, as TRL's collators build it), the image as a PNG data URL of the exact pixels, and the sampling settings.
The server applies its own chat template: see the README ("Generating on a serving fleet") for how far its prompt
equals the training prompt.

Requests in flight are bounded by a semaphore and go to the endpoint with the fewest in flight. 429, 5xx,
timeouts and lost connections are retried with exponential backoff; 401/403 stop the run with one line naming the
endpoint and the key's variable. An endpoint that fails `max_endpoint_failures` requests in a row is dropped for
the rest of the run and its requests go to the others; when none is left the run stops with an error.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import logging
import os
import random
from typing import Callable, Sequence

from stic.config import BackendConfig, ModelSpec, RecipeError
from stic.errors import SticError, one_line
from stic.generation import Output, Request, SamplingConfig, prompt_messages, stable_seed

log = logging.getLogger("stic.serving")

# OpenAI finish reasons -> ours. "stop" is the EOS token (or a stop string, which the toolkit never sends).
FINISH_REASONS = {"stop": "eos", "length": "length"}


class EndpointError(SticError, RuntimeError):
    """A generation or judge endpoint refused a request, or none is left to send it to."""


class EndpointAuthError(EndpointError):
    """401/403: the key is missing or wrong. Never retried."""


def retry_kind(err: BaseException) -> str:
    """How the retry rules treat an error of the `openai` client: "auth" (401/403, never retried), "busy" (429:
    retried, the endpoint is alive), "down" (5xx, timeout, lost connection: retried, counts against the
    endpoint) or "fatal" (any other 4xx or a malformed reply: the request itself is wrong, retrying cannot help)."""
    import openai

    if isinstance(err, (openai.AuthenticationError, openai.PermissionDeniedError)):
        return "auth"
    if isinstance(err, openai.RateLimitError):
        return "busy"
    if isinstance(err, openai.APIConnectionError):  # includes APITimeoutError
        return "down"
    if isinstance(err, openai.APIStatusError):
        return "down" if err.status_code >= 500 or err.status_code == 408 else "fatal"
    return "fatal"


def raise_if_final(err: BaseException, kind: str, where: str, key_env: str, model: str, auth_error: type,
                   fatal_error: type) -> None:
    """The kinds never retried stop the run with one line: a refused key names its variable (never the key), any
    other refused request names the model and the server's reason."""
    if kind == "auth":
        raise auth_error(f"{where} refused the key ({describe_error(err, key_env)}): check ${key_env}"
                         f"{'' if os.environ.get(key_env) else ' (unset)'}") from None
    if kind == "fatal":
        raise fatal_error(f"{where} refused the request for model {model!r} "
                          f"({describe_error(err, key_env)})") from None


def redact(text: str, key_env: str | None) -> str:
    """`text` with the key of variable `key_env` replaced by its name: a server may echo the Authorization header
    in its error message, and we repeat that message."""
    key = os.environ.get(key_env) if key_env else None
    return text.replace(key, f"<${key_env}>") if key else text


def describe_error(err: BaseException, key_env: str | None = None) -> str:
    """A short description of a client error, the key of `key_env` redacted from the server's words."""
    status = getattr(err, "status_code", None)
    detail = str(getattr(err, "message", "") or err)
    body = getattr(err, "body", None)
    if isinstance(body, dict) and "detail" in body:  # FastAPI servers (transformers serve) say why only here
        detail += f" {body['detail']}"
    detail = " ".join(redact(detail, key_env).split())[:300]  # redacted before the cut, which could split the key
    return f"{type(err).__name__}{f' {status}' if status else ''}: {detail}" if detail else type(err).__name__


def backoff_seconds(attempt: int, base: float = 0.5, cap: float = 30.0) -> float:
    """Exponential backoff with full jitter (so retries of many requests do not arrive together)."""
    return random.uniform(0, min(cap, base * 2 ** attempt))


def image_data_url(image) -> str:
    """The exact pixels as a PNG data URL (lossless; the corrupted pixels in selfgen's corruption branch)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def request_messages(req: Request, system_prompt: str | None) -> list[dict]:
    """The chat messages of one request: `prompt_messages`, with the image put first in the user turn, where
    TRL's `prepare_multimodal_messages` (and so the local engine and the trainer) put it."""
    messages = prompt_messages(req.prompt, system_prompt)
    user = messages[-1]
    parts = [{"type": "image_url", "image_url": {"url": image_data_url(req.image)}}] if req.image is not None else []
    user["content"] = [*parts, {"type": "text", "text": req.prompt}]
    return messages


def sampling_params(sampling: SamplingConfig, seed: int) -> dict:
    """Chat-completion fields for our sampling settings. Greedy is temperature 0. top_k and repetition_penalty
    are not OpenAI fields: they go in the body only when set (vLLM and SGLang read them; `transformers serve`
    refuses unknown fields with a 422, which stops the run with that message)."""
    params: dict = {"max_tokens": sampling.max_new_tokens}
    if sampling.do_sample:
        params.update(temperature=sampling.temperature, top_p=sampling.top_p, seed=seed)
    else:
        params["temperature"] = 0.0
    extra = {}
    if sampling.top_k:
        extra["top_k"] = sampling.top_k
    if sampling.repetition_penalty != 1.0:
        extra["repetition_penalty"] = sampling.repetition_penalty
    if extra:
        params["extra_body"] = extra
    return params


class Endpoint:
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.in_flight = 0
        self.failures = 0  # consecutive failed requests
        self.alive = True
        self.last_error = ""


class OpenAIGenerator:
    """`BatchGenerator.generate` over one or more OpenAI-compatible `/v1/chat/completions` endpoints."""

    def __init__(self, cfg: BackendConfig, model: str, system_prompt: str | None = None):
        if not cfg.endpoints:
            raise RecipeError("generation.endpoints is empty: give the URL of at least one server")
        self.cfg, self.model, self.system_prompt = cfg, model, system_prompt
        self.endpoints = [Endpoint(u) for u in cfg.endpoints]
        self._next = 0  # round-robin start among endpoints with equally few requests in flight

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIGenerator(model={self.model!r}, endpoints={[e.url for e in self.endpoints]})"

    def generate(self, requests: Sequence[Request], sampling: SamplingConfig, seed: int = 0,
                 on_batch: Callable[[int, int], None] | None = None) -> list[Output]:
        """Outputs in request order. `on_batch(1, n_new_tokens)` reports each finished request."""
        if not requests:
            return []
        return asyncio.run(self._generate(requests, sampling, seed, on_batch))

    async def _generate(self, requests, sampling, seed, on_batch) -> list[Output]:
        from openai import AsyncOpenAI

        key = os.environ.get(self.cfg.api_key_env) or "EMPTY"  # vLLM's convention for "no key"
        # the client's own retries are off: ours reroute between endpoints (clients are per call: they bind to
        # the event loop of this asyncio.run)
        clients = {e.url: AsyncOpenAI(base_url=e.url, api_key=key, timeout=self.cfg.timeout, max_retries=0)
                   for e in self.endpoints}
        gate = asyncio.Semaphore(self.cfg.max_concurrency)

        async def one(i: int, req: Request) -> Output:
            async with gate:
                params = sampling_params(sampling, req.seed if req.seed is not None else stable_seed(seed, i))
                out, tokens = await self._send(clients, request_messages(req, self.system_prompt), params)
            if on_batch:
                on_batch(1, tokens)
            return out

        tasks = [asyncio.ensure_future(one(i, r)) for i, r in enumerate(requests)]
        try:
            return list(await asyncio.gather(*tasks))
        finally:  # a fatal error in one request stops the others
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for c in clients.values():
                await c.close()

    def _pick(self) -> Endpoint:
        alive = [e for e in self.endpoints if e.alive]
        if not alive:
            lost = "; ".join(f"{e.url} ({e.last_error})" for e in self.endpoints)
            raise EndpointError(f"no generation endpoint left: each failed {self.cfg.max_endpoint_failures} requests "
                                f"in a row and was dropped: {lost}")
        self._next += 1
        return min(alive, key=lambda e: (e.in_flight, (self.endpoints.index(e) - self._next) % len(self.endpoints)))

    async def _send(self, clients, messages, params) -> tuple[Output, int]:
        """One request, retried by the rules above; returns the output and the tokens the server generated."""
        import openai

        attempt = 0
        while True:
            ep = self._pick()
            ep.in_flight += 1
            try:
                # the client's timeout bounds each read, so a server trickling bytes never trips it: the request as
                # a whole gets the deadline
                try:
                    resp = await asyncio.wait_for(
                        clients[ep.url].chat.completions.create(model=self.model, messages=messages, **params),
                        self.cfg.timeout)
                except ValueError as err:  # the client parses a 200's body as JSON and lets the decode error out
                    raise EndpointError(f"{ep.url} sent a reply that is not valid JSON ({one_line(err)})") from None
                out, tokens = parse_completion(resp, ep.url)
            except asyncio.TimeoutError:  # treated as the client's own timeouts are
                kind = "down"
                ep.last_error = f"no complete reply within generation.timeout ({self.cfg.timeout:g} s)"
            except openai.APIError as err:  # the client's errors (anything else is a bug): sorted by retry_kind
                kind = retry_kind(err)
                raise_if_final(err, kind, ep.url, self.cfg.api_key_env, self.model, EndpointAuthError, EndpointError)
                ep.last_error = describe_error(err, self.cfg.api_key_env)
            else:
                ep.failures = 0
                return out, tokens
            finally:
                ep.in_flight -= 1
            if kind == "down":
                ep.failures += 1
                if ep.alive and ep.failures >= self.cfg.max_endpoint_failures:
                    ep.alive = False
                    log.warning("dropping endpoint %s after %d failed requests in a row (last: %s)", ep.url,
                                ep.failures, ep.last_error)
            attempt += 1
            if attempt > self.cfg.max_retries:
                raise EndpointError(f"a request failed {attempt} times (generation.max_retries is "
                                    f"{self.cfg.max_retries}); last: {ep.url}: {ep.last_error}") from None
            if ep.alive:  # a request rerouted from a dropped endpoint goes on at once
                await asyncio.sleep(backoff_seconds(attempt))


def parse_completion(resp, url: str) -> tuple[Output, int]:
    """Our Output from a chat completion. Servers count the EOS token they stopped on in completion_tokens
    (transformers serve, vLLM); the local engine's num_tokens does not, so one is taken off for "stop"."""
    try:
        choice = resp.choices[0]
        choice.finish_reason
    except (AttributeError, IndexError, KeyError, TypeError):
        raise EndpointError(f"{url} sent a reply without choices") from None
    content = getattr(getattr(choice, "message", None), "content", None)
    if getattr(choice, "message", None) is None or not isinstance(content, (str, type(None))):
        raise EndpointError(f"{url} sent a choice without a message (or with a non-text content)")
    if choice.finish_reason not in FINISH_REASONS:
        raise EndpointError(f"{url} stopped with finish_reason {choice.finish_reason!r}; expected stop or length")
    finish = FINISH_REASONS[choice.finish_reason]
    usage = getattr(resp, "usage", None)
    generated = usage.completion_tokens if usage is not None and usage.completion_tokens is not None else None
    text = (content or "").strip()
    if generated is None:  # no usage reported: the count is unknown, recorded as -1 rather than guessed
        return Output(text, finish, -1), 0
    return Output(text, finish, max(generated - (finish == "eos"), 0)), generated


# ---------------------------------------------------------------------------------------------------------
# Choosing the engine


def served_model(backend: BackendConfig, model_cfg: ModelSpec, adapters: Sequence[str] = (), job: str = "") -> str:
    """The model name requests ask for (local: the model's own name). With adapters merged in memory locally
    (stage-2 descriptions, eval of stage1/stage2) the server must serve a merged folder, which only the recipe
    can name."""
    if backend.backend == "local":
        return model_cfg.name_or_path
    if backend.model:
        return backend.model
    if adapters:
        raise RecipeError(f"{job}: generation.backend openai with adapters ({', '.join(adapters)}): serve the model "
                          "with them merged (`stic merge`) and set generation.model to the name the servers serve")
    return model_cfg.name_or_path


def run_identity(backend: BackendConfig, model: str | None) -> dict | None:
    """What a job's output depends on from the backend: None for local (run_config unchanged, old runs resume);
    the served model for openai. The endpoints and concurrency are left out, so a resume may use another fleet."""
    if backend.backend == "local":
        return None
    return {"backend": backend.backend, "model": model}


def make_engine(backend: BackendConfig, model: str, system_prompt: str | None, local: Callable[[], object]):
    """The engine of a job: `local()` builds the in-process BatchGenerator, else one for the endpoints."""
    if backend.backend == "openai":
        return OpenAIGenerator(backend, model, system_prompt)
    return local()


# ---------------------------------------------------------------------------------------------------------
# A local server, for the tests and the benchmark


@contextlib.contextmanager
def transformers_serve(model: str, startup_s: float = 180.0):
    """`transformers serve MODEL` on CPU on a free loopback port; yields its /v1 URL, stops it on exit."""
    import socket
    import subprocess
    import sys
    import tempfile
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-c", "from transformers.cli.transformers import main; main()", "serve", model,
           "--device", "cpu", "--host", "127.0.0.1", "--port", str(port)]
    # its log goes to a file: a pipe nobody reads would fill up (a warning per request) and stall the server
    log_file = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log_file, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"

    def log_tail() -> str:
        log_file.seek(0)
        return one_line(log_file.read()[-1000:])

    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                raise EndpointError(f"transformers serve {model} exited: {log_tail()}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise EndpointError(f"transformers serve {model} did not answer {url}/health "
                                        f"within {startup_s:.0f} s: {log_tail()}") from None
                time.sleep(0.5)
        yield f"{url}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log_file.close()
