"""`gsae serve`: a local page to read your own text through an SAE. Type text and see, per
token, a latent's activation and its first-order loss effect `value * (d_i . g)`, the top
latents of a token, and greedy continuations of a prompt with a latent steered at a chosen
alpha. Starlette serves the page and a small JSON API; uvicorn runs it, on localhost unless
told otherwise. The page loads nothing from elsewhere."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from gsae.browser.page import SERVE_PAGE
from gsae.browser.setup import recorded
from gsae.config import validate
from gsae.errors import GsaeError
from gsae.models import ModelConfig
from gsae.pipeline import LoadedModel, load_for_eval
from gsae.states import text_states
from gsae.steer import check_latent, steer_prompt
from gsae.text import DataConfig

TOP_LATENTS, MAX_TEXT_CHARS, MAX_NEW_TOKENS = 10, 4000, 64


@dataclass
class ServeRun:
    """Everything `gsae serve` needs; the model defaults to what the first SAE records."""

    saes: list[str] = field(default_factory=list, metadata={
        "positional": True, "metavar": "SAE_DIR", "help": "SAE folders, all of one model"})
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)  # recorded; not read
    host: str = field(default="127.0.0.1", metadata={
        "help": "address to listen on; the default answers this machine only"})
    port: int = field(default=8000, metadata={"help": "port to listen on", "min": 0})


class Reader:
    """The loaded model and SAEs, and the two things the page asks of them."""

    def __init__(self, loaded: LoadedModel):
        self.loaded, self.lock = loaded, threading.Lock()
        self.hooks = [recorded(sae, name).hook for sae, name in zip(loaded.saes, loaded.names)]

    def sae(self, index: Any) -> int:
        if not isinstance(index, int) or not 0 <= index < len(self.loaded.saes):
            raise GsaeError(f"sae must be an index from 0 to {len(self.loaded.saes) - 1}")
        return index

    def read(self, text: str, sae_index: int, latent: int) -> dict[str, Any]:
        """Per token: its text, the latent's value and loss effect, and the top latents of the
        SAE's training-time selection (gradient-aware for a g-SAE)."""
        sae, name = self.loaded.saes[sae_index], self.loaded.names[sae_index]
        check_latent(sae, latent, name)
        with self.lock:
            ids, x, g = text_states(self.loaded.model, self.loaded.tokenizer,
                                    _text(text), self.hooks[sae_index])
        with torch.no_grad():
            values, indices, _ = sae.encode(x.to(sae.W_dec.dtype), g.to(sae.W_dec.dtype))
            slope = torch.einsum("tkd,td->tk", sae.W_dec.detach()[indices], g.to(sae.W_dec))
        skip = sae.provenance.skip_first
        return {"sae": name, "latent": latent, "skip_first": skip,
                "tokens": [self._token(t, ids, values, indices, slope, latent, skip)
                           for t in range(len(ids))]}

    def _token(self, t: int, ids, values, indices, slope, latent: int, skip: int
               ) -> dict[str, Any]:
        text = self.loaded.tokenizer.decode([int(ids[t])])
        if t < skip:
            return {"text": text, "encoded": False}
        order = values[t].argsort(descending=True)
        top = [{"latent": int(indices[t, j]), "value": float(values[t, j]),
                "effect": float(values[t, j] * slope[t, j])}
               for j in order[:TOP_LATENTS] if values[t, j] > 0]
        hit = ((indices[t] == latent) & (values[t] > 0)).nonzero()[:, 0]
        value = float(values[t, hit[0]]) if hit.numel() else 0.0
        effect = float(values[t, hit[0]] * slope[t, hit[0]]) if hit.numel() else 0.0
        return {"text": text, "encoded": True, "value": value, "effect": effect, "top": top}

    def steer(self, prompt: str, sae_index: int, latent: int, alpha: float,
              new_tokens: int) -> dict[str, Any]:
        """Greedy continuations of the prompt, clean and with alpha * d_latent added."""
        if not isinstance(alpha, (int, float)) or alpha != alpha:
            raise GsaeError("alpha must be a number")
        if not isinstance(new_tokens, int) or not 1 <= new_tokens <= MAX_NEW_TOKENS:
            raise GsaeError(f"new_tokens must be a whole number from 1 to {MAX_NEW_TOKENS}")
        sae, name = self.loaded.saes[sae_index], self.loaded.names[sae_index]
        with self.lock:
            result = steer_prompt(sae, self.loaded.model, self.loaded.tokenizer, latent,
                                  _text(prompt), [1.0], new_tokens, float(alpha), name)
        clean, steered = result.continuations
        return {"sae": name, "latent": latent, "alpha": float(alpha), "prompt": result.prompt,
                "clean": clean["text"], "steered": steered["text"]}


def _text(text: Any) -> str:
    if not isinstance(text, str) or not text.strip():
        raise GsaeError("text must be a non-empty string")
    if len(text) > MAX_TEXT_CHARS:
        raise GsaeError(f"text has {len(text)} characters: at most {MAX_TEXT_CHARS} are read")
    return text


def _whole(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise GsaeError(f"{name} must be a whole number")
    return value


def make_app(reader: Reader) -> Any:
    """The Starlette application: the page and its JSON API (errors: 400 with one line)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    saes = [{"index": i, "name": name, "n_latents": sae.n_latents, "hook": hook}
            for i, (sae, name, hook) in enumerate(zip(reader.loaded.saes, reader.loaded.names,
                                                      reader.hooks))]

    async def page(_request: Request) -> HTMLResponse:
        return HTMLResponse(SERVE_PAGE)

    async def info(_request: Request) -> JSONResponse:
        return JSONResponse({"saes": saes, "model": reader.loaded.model_cfg.model})

    def answer(work):
        async def endpoint(request: Request) -> JSONResponse:
            try:
                body = await request.json()
            except ValueError:
                return JSONResponse({"error": "the request body is not JSON"}, status_code=400)
            try:
                if not isinstance(body, dict):
                    raise GsaeError("the request body must be a JSON object")
                return JSONResponse(await run_in_threadpool(work, body))
            except GsaeError as err:
                return JSONResponse({"error": str(err)}, status_code=400)
        return endpoint

    def read(body: dict) -> dict:
        return reader.read(body.get("text"), reader.sae(body.get("sae", 0)),
                           _whole(body.get("latent", 0), "latent"))

    def steer(body: dict) -> dict:
        return reader.steer(body.get("prompt"), reader.sae(body.get("sae", 0)),
                            _whole(body.get("latent", 0), "latent"), body.get("alpha", 0.0),
                            body.get("new_tokens", 20))

    return Starlette(routes=[Route("/", page), Route("/api/info", info),
                             Route("/api/read", answer(read), methods=["POST"]),
                             Route("/api/steer", answer(steer), methods=["POST"])])


def load_reader(run: ServeRun) -> Reader:
    """The SAEs of `run` with their model (as `gsae eval` loads them)."""
    return Reader(load_for_eval(run.saes, run.model, run.data, allow_changed_corpus=True))


def serve(run: ServeRun) -> None:
    """Serve the page until interrupted."""
    validate(run)
    try:
        import uvicorn
    except ImportError as err:
        raise GsaeError(f"gsae serve needs the serve extra ({err.name} is missing): "
                        "pip install 'gsae[serve]'") from None
    reader = load_reader(run)
    local = run.host in ("127.0.0.1", "localhost", "::1")
    print(f"gsae serve: http://{run.host}:{run.port}/ "
          + ("(this machine only; --host 0.0.0.0 would expose it to the network)" if local
             else "(open to the network: anyone who can reach this address can use it)"),
          flush=True)
    uvicorn.run(make_app(reader), host=run.host, port=run.port, log_level="warning")
