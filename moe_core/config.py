"""Configuration dataclasses for the MoE layer and the TinyMoE model.

Each concern has one dataclass, validated in ``__post_init__`` so that a bad value fails at
construction with a ``ValueError`` naming the field, before any tensor is allocated.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

ROUTERS = ("top1", "topk_hard", "softk", "hash", "expert_choice")
"""Router names (contract). Hyphenated spellings (``topk-hard``) are accepted as aliases."""

BACKENDS = ("loop", "einsum", "padded", "grouped", "fused")
ACTIVATIONS = ("gelu", "swiglu")
DROP_POLICIES = ("order", "score")
EC_EVAL_MODES = ("causal", "noncausal", "prefix")
EC_GROUPS = ("batch", "sequence")
HASH_BALANCES = ("ids", "frequency")


def canonical_router(name: str) -> str:
    """Map a router name or alias (``expert-choice``, ``Top1``) to its canonical spelling."""
    key = str(name).strip().lower().replace("-", "_")
    if key not in ROUTERS:
        raise ValueError(f"router: unknown router {name!r}; valid: {', '.join(ROUTERS)}")
    return key


def parse_overrides(items, text_fields=()) -> dict:
    """``key=value`` strings (the CLIs' ``--set``) -> {key: value parsed as YAML}; keys in
    ``text_fields`` keep the raw text (``run=001`` is a name, not the number 1)."""
    import yaml

    overrides = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected key=value")
        overrides[key] = text if key in text_fields else yaml.safe_load(text)
    return overrides


def read_yaml(path: str | Path, what: str = "YAML file"):
    """The YAML document in `path`; a missing, non-UTF-8 or malformed file is a one-line ValueError
    naming it (the CLIs read their --config and params files through this)."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{path}: no such {what}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise ValueError(f"{path}: cannot read the {what} ({err.strerror})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ValueError(f"{path}: not valid YAML ({getattr(err, 'problem', None) or 'parse error'}{where})") from None


def cf_label(capacity_factor: float | None) -> str:
    """The one spelling of a capacity factor, in run names and tables alike: 'dropless' for None
    (or NaN, as pandas stores it), else the float as Python writes it: '1.0', '1.25', '2.0'."""
    if capacity_factor is None or capacity_factor != capacity_factor:
        return "dropless"
    return str(float(capacity_factor))


def require(ok: bool, name: str, msg: str) -> None:
    """The one validator: a ValueError that names the bad field, ``name: msg``."""
    if not ok:
        raise ValueError(f"{name}: {msg}")


@dataclass
class MoEConfig:
    """One MoE feed-forward layer: experts, router, capacity, balance losses, dispatch backend.

    ``capacity_factor=None`` means dropless. Capacity per expert is
    ``C = ceil(capacity_factor * T * top_k / num_experts)`` for a routing group of T tokens.
    """

    dim: int = 256
    hidden: int = 1024
    num_experts: int = 8
    top_k: int = 2
    router: str = "softk"
    capacity_factor: float | None = 1.25
    drop_policy: str = "order"  # "order": earlier tokens win; "score": larger weight wins
    renormalize: bool = False  # rescale surviving weights of a token to its original gate mass
    backend: str = "padded"
    activation: str = "gelu"
    aux_loss_coef: float = 0.01  # Switch load-balancing loss alpha
    z_loss_coef: float = 1e-3  # ST-MoE router z-loss beta (0 disables)
    aux_free_bias: bool = False  # DeepSeek-V3 bias balancing (selection only)
    bias_update_rate: float = 1e-3
    hash_vocab_size: int | None = None  # required by the hash router (set by TinyMoEModel)
    hash_seed: int | None = None  # None: the run's seed (TrainConfig resolves it); 0 for a model built alone
    hash_balance: str = "ids"  # hash: the table balances token ids, or the training split's token "frequency"
    ec_group: str = "batch"  # expert_choice: routing group = the whole micro-batch, or each "sequence"
    ec_eval: str = "causal"  # how expert_choice routes in eval mode (routing.Router)
    router_init_std: float = 0.02

    def __post_init__(self) -> None:
        self.router = canonical_router(self.router)
        for name in ("dim", "hidden", "num_experts", "top_k"):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                   name, f"must be an integer >= 1, got {value!r}")
        require(self.top_k <= self.num_experts, "top_k",
               f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.router == "top1":
            require(self.top_k == 1, "top_k", f"router top1 routes to one expert, got top_k={self.top_k}")
        if self.capacity_factor is not None:
            require(isinstance(self.capacity_factor, (int, float)) and math.isfinite(self.capacity_factor)
                    and self.capacity_factor > 0,
                    "capacity_factor", f"must be > 0 and finite, or None (dropless), got {self.capacity_factor!r}")
            self.capacity_factor = float(self.capacity_factor)
        require(not (self.router == "expert_choice" and self.capacity_factor is None), "capacity_factor",
               "expert_choice needs a capacity factor (each expert picks C tokens)")
        require(self.drop_policy in DROP_POLICIES, "drop_policy",
               f"unknown {self.drop_policy!r}; valid: {', '.join(DROP_POLICIES)}")
        require(self.backend in BACKENDS, "backend", f"unknown {self.backend!r}; valid: {', '.join(BACKENDS)}")
        require(self.activation in ACTIVATIONS, "activation",
               f"unknown {self.activation!r}; valid: {', '.join(ACTIVATIONS)}")
        require(self.ec_eval in EC_EVAL_MODES, "ec_eval",
               f"unknown {self.ec_eval!r}; valid: {', '.join(EC_EVAL_MODES)}")
        require(self.ec_group in EC_GROUPS, "ec_group", f"unknown {self.ec_group!r}; valid: {', '.join(EC_GROUPS)}")
        require(self.hash_balance in HASH_BALANCES, "hash_balance",
                f"unknown {self.hash_balance!r}; valid: {', '.join(HASH_BALANCES)}")
        require(self.hash_seed is None or (isinstance(self.hash_seed, int) and not isinstance(self.hash_seed, bool)
                                           and self.hash_seed >= 0), "hash_seed",
                f"must be None (the run's seed) or an integer >= 0, got {self.hash_seed!r}")
        for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate", "router_init_std"):
            value = getattr(self, name)
            require(isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, name,
                    f"must be >= 0 and finite, got {value!r}")
        if self.hash_vocab_size is not None:
            require(isinstance(self.hash_vocab_size, int) and self.hash_vocab_size >= 1, "hash_vocab_size",
                   f"must be an integer >= 1, got {self.hash_vocab_size!r}")
        require(not (self.aux_free_bias and self.router in ("hash", "expert_choice")), "aux_free_bias",
               f"bias balancing applies to token-choice routers with a learned router, not {self.router}")


FFN_KINDS = ("moe", "dense")


@dataclass
class ModelConfig:
    """A decoder-only TinyMoE language model.

    ``ffn="dense"`` replaces every MoE layer by a dense FFN of hidden ``top_k * moe.hidden`` so that
    active FLOPs per token match the token-choice MoE (the iso-FLOP baseline).
    """

    vocab_size: int = 256
    seq_len: int = 256
    dim: int = 256
    layers: int = 4
    heads: int = 4
    moe: MoEConfig = field(default_factory=MoEConfig)
    ffn: str = "moe"
    moe_every: int = 1  # MoE in blocks i with i % moe_every == moe_every - 1; dense elsewhere
    dropout: float = 0.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "dim", "layers", "heads", "moe_every"):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                   name, f"must be an integer >= 1, got {value!r}")
        require(self.dim % self.heads == 0, "heads", f"dim={self.dim} is not divisible by heads={self.heads}")
        require(isinstance(self.moe, MoEConfig), "moe", "must be a MoEConfig")
        require(self.moe.dim == self.dim, "moe.dim", f"moe.dim={self.moe.dim} differs from dim={self.dim}")
        require(self.ffn in FFN_KINDS, "ffn", f"unknown {self.ffn!r}; valid: {', '.join(FFN_KINDS)}")
        require(self.ffn != "moe" or self.moe_every <= self.layers, "moe_every",
                f"moe_every={self.moe_every} > layers={self.layers} leaves no MoE layer "
                "(the dense model is ffn='dense')")
        require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout!r}")
        require(self.init_std > 0, "init_std", f"must be > 0, got {self.init_std!r}")
        if self.moe.router == "hash":
            if self.moe.hash_vocab_size is None:  # a copy: the caller's MoEConfig is left as it was
                self.moe = replace(self.moe, hash_vocab_size=self.vocab_size)
            require(self.moe.hash_vocab_size == self.vocab_size, "moe.hash_vocab_size",
                   f"{self.moe.hash_vocab_size} differs from vocab_size={self.vocab_size}")

    def is_moe_layer(self, i: int) -> bool:
        return self.ffn == "moe" and i % self.moe_every == self.moe_every - 1
