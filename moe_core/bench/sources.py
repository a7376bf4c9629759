"""Routing sources: where the capacity bench's router logits come from (i.i.d. random, Zipf-skewed,
or a trained model's routers on its own validation text), and routing given logits, so that drop
statistics and a whole MoE layer can be measured under any of them.

Legend: N logit sets, L MoE layers, T tokens, D model dim, E experts, B batch, S sequence length.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .. import records as rr
from ..config import MoEConfig, require
from ..data import load_data
from ..model import TinyMoEModel
from ..routing import Router, Routing, routing_metrics
from ..train import TrainConfig

SOURCE_KINDS = ("random", "skewed[:S]", "checkpoint[:PATH]")
LOGIT_ROUTERS = ("top1", "topk_hard", "softk")  # token-choice routers that read logits


@dataclass(frozen=True)
class RoutingSource:
    """A parsed routing-source spec: ``random``, ``skewed[:S]`` (Zipf exponent S, default 1.0) or
    ``checkpoint[:PATH]`` (a bare ``checkpoint`` takes the path from the bench config)."""

    kind: str
    zipf_s: float = 1.0
    path: str | None = None

    @classmethod
    def parse(cls, spec: str) -> RoutingSource:
        kind, sep, arg = str(spec).partition(":")
        if kind == "random" and not sep:
            return cls("random")
        if kind == "skewed":
            try:
                s = float(arg) if sep else 1.0
            except ValueError:
                s = -1.0
            if not (math.isfinite(s) and s >= 0):
                raise ValueError(f"routing source {spec!r}: Zipf exponent must be a number >= 0")
            return cls("skewed", zipf_s=s)
        if kind == "checkpoint":
            return cls("checkpoint", path=arg or None)
        raise ValueError(f"unknown routing source {spec!r}; valid: {', '.join(SOURCE_KINDS)}")

    @property
    def name(self) -> str:
        return {"random": "random", "skewed": f"skewed:{self.zipf_s:g}", "checkpoint": "checkpoint"}[self.kind]


def synthetic_logits(source: RoutingSource, num_sets: int, num_tokens: int, num_experts: int,
                     seed: int) -> torch.Tensor:
    """[N, T, E] float32 CPU logits: i.i.d. N(0, 1), plus log Zipf popularity for ``skewed``
    (expert e has popularity proportional to (e + 1)^-s, so expert 0 is the most popular)."""
    gen = torch.Generator().manual_seed(seed)
    logits_NTE = torch.randn(num_sets, num_tokens, num_experts, generator=gen)
    if source.kind == "skewed":
        logits_NTE += -source.zipf_s * torch.log(torch.arange(1, num_experts + 1, dtype=torch.float32))
    return logits_NTE


# -- a trained model's router logits ----------------------------------------------------------------
def read_checkpoint(path: str | Path) -> tuple[TrainConfig, dict[str, torch.Tensor]]:
    """(stored TrainConfig, model weights) of a ``{"model": state_dict, "config": TrainConfig fields}``
    checkpoint as moe_core.train writes it, read by moe_core.records.load_checkpoint (weights only: no
    code in the file runs). A missing, unreadable or incompatible file is a one-line error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = rr.load_checkpoint(path)
    require(isinstance(state, dict) and isinstance(state.get("model"), dict), str(path),
            "expected a checkpoint with a 'model' state dict, as moe_core.train writes")
    require(isinstance(state.get("config"), dict) and bool(state["config"]), str(path),
            "has no stored 'config' (the TrainConfig fields the model was built from)")
    try:
        train_cfg = TrainConfig.from_dict(state["config"])
    except ValueError as err:
        raise ValueError(f"{path}: stored config is not a valid TrainConfig: {err}") from None
    require(train_cfg.ffn == "moe" and train_cfg.router != "hash", str(path),
            f"no MoE layer with a learned router (ffn={train_cfg.ffn}, router={train_cfg.router})")
    return train_cfg, state["model"]


@torch.no_grad()
def router_logits_from_checkpoint(path: str | Path, num_tokens: int, *, device: str | torch.device = "cpu",
                                  batch_size: int = 16) -> torch.Tensor:
    """[L, T, E] float32 CPU router logits of every MoE layer of a trained TinyMoEModel on the first
    ``num_tokens`` tokens of its validation windows. The model and data are rebuilt as moe_core.train
    built them: from the stored config, with the vocabulary of that data; weights that do not fit
    are an error. Logits are the router's (before any aux-free bias, which changes selection only)."""
    train_cfg, weights = read_checkpoint(path)
    seq_len = train_cfg.seq_len
    data = load_data(replace(train_cfg.data_config(), eval_windows=math.ceil(num_tokens / seq_len)))
    available = len(data.eval_starts_W) * seq_len
    require(available >= num_tokens, str(path), f"validation text gives {available} tokens in windows of "
            f"{seq_len}, fewer than the {num_tokens} asked for")
    model = TinyMoEModel(train_cfg.model_config(data.vocab_size))
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not fit the model of its stored config (vocabulary "
                         f"{data.vocab_size} from its data): {_first_line(err, skip=1)}") from None
    model.to(device).eval()

    captured: list[list[torch.Tensor]] = [[] for _ in model.moe_layers()]
    hooks = [layer.router.register_forward_hook(lambda mod, args, out, i=i: captured[i].append(out[1].float().cpu()))
             for i, layer in enumerate(model.moe_layers())]
    try:
        seen = 0
        for x_BS, _ in data.eval_batches(batch_size):
            if seen >= num_tokens:
                break
            model(x_BS.to(device))
            seen += x_BS.numel()
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack([torch.cat(chunks)[:num_tokens] for chunks in captured])


def _first_line(err: Exception, skip: int = 0) -> str:
    """One line of a multi-line torch error (``skip`` header lines), so the bench's errors stay one line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[skip:] or lines or [type(err).__name__])[0]


# -- routing given logits ---------------------------------------------------------------------------
class LogitsRouter(Router):
    """A Router whose logits are given (``logits_TE``) instead of computed as x W^T, so a whole
    MoEFeedForward can be timed under a chosen routing source (random, skewed, trained)."""

    def __init__(self, cfg: MoEConfig, logits_TE: torch.Tensor | None = None):
        _require_logit_router(cfg)
        super().__init__(cfg)
        self.logits_TE = logits_TE

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.logits_TE is None or self.logits_TE.shape[0] != x_TD.shape[0]:
            raise ValueError(f"logits_TE: need logits for {x_TD.shape[0]} tokens")
        return self.logits_TE


def route_logits(logits_TE: torch.Tensor, cfg: MoEConfig) -> tuple[Routing, torch.Tensor]:
    """(Routing, probs_TE) that MoEFeedForward with ``cfg`` would produce for these router logits."""
    _require_logit_router(cfg)
    routing, _, probs_TE = Router(cfg).route(logits_TE)
    return routing, probs_TE


def capacity_metrics(logits_TE: torch.Tensor, cfg: MoEConfig) -> dict[str, float]:
    """drop_rate, token_drop_rate, load_cv, max_vio (moe_core.routing.routing_metrics) as floats."""
    return routed_metrics(*route_logits(logits_TE, cfg))


def routed_metrics(routing: Routing, probs_TE: torch.Tensor) -> dict[str, float]:
    stats = routing_metrics(routing, probs_TE)
    return {k: float(stats[k]) for k in ("drop_rate", "token_drop_rate", "load_cv", "max_vio")}


def _require_logit_router(cfg: MoEConfig) -> None:
    require(cfg.router in LOGIT_ROUTERS, "router",
            f"the bench routes given logits with {', '.join(LOGIT_ROUTERS)}, not {cfg.router!r}")
