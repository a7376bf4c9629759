"""What a run measures: interval means of the training losses and routing statistics, the time of
training steps alone, and the validation loss over the fixed evaluation windows.

Legend: B batch (per rank), S sequence length, L MoE layers, E experts, N routing statistics.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from ..config import EC_EVAL_MODES
from ..model import TinyMoEModel
from ..routing import mutual_information
from .distributed import Dist

STAT_FIELDS = ("aux_loss", "z_loss", "drop_rate", "token_drop_rate", "load_cv", "max_vio", "gate_entropy", "p1_mean",
               "p1_over_half")


# -- on-device accumulation -------------------------------------------------------------------------
class Interval:
    """Sums over the training steps since the last evaluation, kept on the device so that the loop
    syncs with the host once per interval; averaged over steps and ranks at evaluation."""

    def __init__(self, n_layers: int, n_experts: int, device: torch.device):
        self.loss_3 = torch.zeros(3, device=device)  # ce, aux, z
        self.stats_LN = torch.zeros(n_layers, len(STAT_FIELDS), device=device)
        self.load_LE = torch.zeros(n_layers, n_experts, device=device)
        self.steps = 0

    def add(self, out) -> None:
        self.loss_3 += torch.stack([out.loss, out.aux_loss, out.z_loss]).detach().float()
        if out.stats:
            self.stats_LN += torch.stack([torch.stack([getattr(s, f).detach().float() for f in STAT_FIELDS])
                                          for s in out.stats])
            self.load_LE += torch.stack([s.tokens_per_expert.detach().float() for s in out.stats])
        self.steps += 1

    def state_dict(self) -> dict:
        return {"loss_3": self.loss_3.cpu(), "stats_LN": self.stats_LN.cpu(), "load_LE": self.load_LE.cpu(),
                "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        for name in ("loss_3", "stats_LN", "load_LE"):
            getattr(self, name).copy_(state[name])
        self.steps = state["steps"]

    def reduce(self, ctx: Dist) -> dict:
        """Means over the interval (all ranks); resets the sums. Per-layer lists index MoE layers."""
        flat = ctx.all_reduce(torch.cat([self.loss_3, self.stats_LN.flatten(), self.load_LE.flatten()]))
        flat = (flat / (max(1, self.steps) * ctx.world)).tolist()
        n_stats = self.stats_LN.numel()
        stats_LN = np.array(flat[3:3 + n_stats]).reshape(self.stats_LN.shape)
        load_LE = np.array(flat[3 + n_stats:]).reshape(self.load_LE.shape)
        row = {"train_loss": flat[0], "train_aux_loss": flat[1], "train_z_loss": flat[2]}
        if len(stats_LN):
            # layer means; the losses are already in train_aux_loss / train_z_loss (layer sums)
            row |= {f: float(stats_LN[:, i].mean()) for i, f in enumerate(STAT_FIELDS) if "loss" not in f}
            row["layer_stats"] = {f: stats_LN[:, i].tolist() for i, f in enumerate(STAT_FIELDS)}
            row["expert_load"] = (load_LE / np.maximum(load_LE.sum(1, keepdims=True), 1e-12)).tolist()
        for t in (self.loss_3, self.stats_LN, self.load_LE):
            t.zero_()
        self.steps = 0
        return row


class StepTimer:
    """Time of training steps only: started before the first timed step of an interval, stopped
    after its last, so evaluation and checkpointing (between intervals) are excluded. CUDA events on
    GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.start_mark = None
        self.steps = 0

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def before_step(self) -> None:
        if self.start_mark is None:
            self.start_mark = self._mark()
        self.steps += 1

    def stop(self) -> tuple[int, float]:
        """(timed steps, seconds) since the interval's first timed step; resets."""
        if self.start_mark is None:
            return 0, 0.0
        end = self._mark()
        if self.cuda:
            end.synchronize()
            seconds = self.start_mark.elapsed_time(end) / 1e3
        else:
            seconds = end - self.start_mark
        steps, self.start_mark, self.steps = self.steps, None, 0
        return steps, seconds


# -- evaluation -------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: TinyMoEModel, data, batch_size: int, ctx: Dist, autocast) -> dict:
    """Validation loss (nats/token), perplexity and bits per byte over the fixed eval windows,
    sharded over ranks. expert_choice is evaluated under every eval rule: causal (headline),
    noncausal and prefix (suffixes). token_expert_mi: I(token id; chosen expert) per MoE layer
    (routing.mutual_information) from the counts of the causal evaluation, and its layer mean."""
    modes = EC_EVAL_MODES if model.cfg.moe.router == "expert_choice" else ("causal",)
    model.eval()
    row = {}
    for mode in modes:
        model.set_expert_choice_eval(mode)
        loss_sum, tokens = torch.zeros((), device=ctx.device), 0
        with model.counting_assignments() as counts_LVE:
            for i, (x_BS, y_BS) in enumerate(data.eval_batches(batch_size)):
                if i % ctx.world != ctx.rank:
                    continue
                with autocast():
                    out = model(x_BS.to(ctx.device), y_BS.to(ctx.device))
                loss_sum += out.loss.float() * y_BS.numel()
                tokens += y_BS.numel()
        sums_2 = ctx.all_reduce(torch.stack([loss_sum, torch.tensor(float(tokens), device=ctx.device)]))
        loss = (sums_2[0] / sums_2[1]).item()
        suffix = "" if mode == "causal" else f"_{mode}"
        row |= {f"val_loss{suffix}": loss, f"val_ppl{suffix}": math.exp(min(loss, 700)),
                f"val_bpb{suffix}": loss / math.log(2) / data.val_bytes_per_token}
        if mode == "causal" and len(counts_LVE):
            mi_L = [float(mutual_information(c)) for c in ctx.all_reduce(counts_LVE)]
            row |= {"token_expert_mi": sum(mi_L) / len(mi_L), "eval_layer_stats": {"token_expert_mi": mi_L}}
    model.set_expert_choice_eval("causal")
    model.train()
    return row
