"""Measured sensitivity: how far the model's output moves when layers are truncated.

Used by LEMS (global importance: KL at one probe rank), ASVD's threshold search (loss at several ratios),
MRCS (the same measurements, greedily) and ATP (loss of whole candidate allocations). One implementation:

* `Probe` runs the dense model once on a few short calibration sequences and keeps every decoder block's
  input and the dense output distribution. The loss of a model whose layers of blocks ≥ b are truncated is
  then measured by running only blocks b..L-1, the final norm and the head: about half a forward on average
  for a single-layer probe.
* A truncated layer is W_r = U_r diag(S_r) V_r from its spectrum, swapped into the dense model for the
  measurement only (the weights are restored afterwards).
* Losses: kl = (1/T_tok) Σ_t KL(p_dense,t ‖ p_trunc,t) at temperature τ (LEMS uses τ = 0.6);
  nll = mean next-token negative log-likelihood; dnll = nll − nll_dense (ASVD's perplexity change, in logs).

Measurements are cached in `problem.cache`, keyed by the probe settings, so methods and ratios sharing a
problem cache (same model, spectra, samples) measure each (layer, fraction) once.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..calibrate import _to, block_inputs
from ..errors import SvdpressError
from ..models import find_blocks, find_targets
from . import AllocationProblem
from .common import rank_at


@dataclass(frozen=True)
class ProbeConfig:
    samples: int = 4  # calibration sequences used for measurements (the first ones)
    seqlen: int = 256  # tokens of each
    temperature: float = 0.6  # τ of the KL (LEMS)
    batch_size: int = 4

    def check(self) -> None:
        if self.samples < 1 or self.seqlen < 2 or self.batch_size < 1 or self.temperature <= 0:
            raise SvdpressError("probe settings: samples ≥ 1, seqlen ≥ 2, batch_size ≥ 1, temperature > 0")


def probe_config(cfg) -> ProbeConfig:
    """The probe part of a method's config (fields probe_samples, probe_seqlen, probe_temperature)."""
    pc = ProbeConfig(int(cfg.probe_samples), int(cfg.probe_seqlen), float(cfg.probe_temperature),
                     int(getattr(cfg, "probe_batch_size", 4)))
    pc.check()
    return pc


def _final_layers(model: nn.Module, prefix: str) -> tuple[nn.Module, nn.Module]:
    parent = model.get_submodule(prefix.rpartition(".")[0]) if "." in prefix else model
    norm = next((getattr(parent, n) for n in ("norm", "final_layernorm", "ln_f") if hasattr(parent, n)), None)
    head = model.get_output_embeddings()
    if norm is None or head is None:
        raise SvdpressError(f"{type(model).__name__}: cannot find the final norm / LM head for sensitivity probes")
    return norm, head


class Probe:
    """Dense block inputs and reference outputs on a few calibration sequences (see module docstring)."""

    def __init__(self, problem: AllocationProblem, cfg: ProbeConfig) -> None:
        if problem.model is None or problem.samples is None:
            raise SvdpressError("this allocation method measures the model's loss: it needs the dense model and "
                                "calibration samples (compress() passes them)")
        self.model, self.cfg, self.device = problem.model, cfg, problem.device
        self.spectra = problem.spectra
        self.prefix, self.blocks = find_blocks(self.model)
        self.block_of = {t.name: t.block for t in find_targets(self.model)}
        self.norm, self.head = _final_layers(self.model, self.prefix)
        ids = problem.samples[:cfg.samples, :cfg.seqlen]
        with self.on_device(), torch.no_grad():
            self.states = self._block_states(ids)  # states[b][j] = (hidden, kwargs) entering block b, batch j
            self.ids = [ids[i:i + cfg.batch_size].to(self.device) for i in range(0, len(ids), cfg.batch_size)]
            self.ref_logp, ref_nll = [], 0.0
            for j, h in enumerate(self.states[-1]):
                logits = self._logits(self._run_block(len(self.blocks) - 1, h))
                self.ref_logp.append(F.log_softmax(logits / cfg.temperature, -1))
                ref_nll += float(self._nll_sum(logits, self.ids[j]))
        self.tokens = sum(x.numel() for x in self.ids)
        self.ref_nll = ref_nll / sum(x[:, 1:].numel() for x in self.ids)

    @contextmanager
    def on_device(self) -> Iterator[None]:
        """The model on the probe's device for a series of measurements (a no-op when already there)."""
        home = next(self.model.parameters()).device
        if home == torch.device(self.device) or (home.type == "cuda" and self.device == "cuda"):
            yield
            return
        self.model.to(self.device)
        try:
            yield
        finally:
            self.model.to(home)

    @torch.no_grad()
    def _block_states(self, ids: torch.Tensor) -> list[list[tuple]]:
        states = [block_inputs(self.model, ids, self.cfg.batch_size, self.device)]
        self.model.to(self.device)  # block_inputs parks the embeddings back on the CPU
        states[0] = [(_to(h, self.device), _to(kw, self.device)) for h, kw in states[0]]
        for b in range(len(self.blocks) - 1):
            states.append([(self._run_block(b, s), s[1]) for s in states[b]])
        return states

    def _run_block(self, b: int, state: tuple) -> torch.Tensor:
        h, kw = state
        out = self.blocks[b](h, **kw)
        return out[0] if isinstance(out, tuple) else out

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(h)).float()

    @staticmethod
    def _nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")

    @contextmanager
    def _truncated(self, ranks: Mapping[str, Optional[int]]) -> Iterator[None]:
        """Swap W_r = U_r S_r V_r into the dense layers for the duration of a measurement."""
        saved = {}
        try:
            for name, r in ranks.items():
                if r is None:
                    continue
                layer = self.model.get_submodule(name)
                saved[name] = layer.weight.data
                layer.weight.data = self.spectra[name].weight(r).to(self.device, saved[name].dtype)
            yield
        finally:
            for name, w in saved.items():
                self.model.get_submodule(name).weight.data = w

    @torch.no_grad()
    def loss(self, ranks: Mapping[str, Optional[int]]) -> dict[str, float]:
        """{kl, nll, dnll} of the model with `ranks` applied (None = dense), vs the dense model."""
        active = [self.block_of[n] for n, r in ranks.items() if r is not None]
        if not active:
            return {"kl": 0.0, "nll": self.ref_nll, "dnll": 0.0}
        start = min(active)
        kl = nll = 0.0
        with self.on_device(), self._truncated(ranks):
            for j, state in enumerate(self.states[start]):
                h = state[0]
                for b in range(start, len(self.blocks)):
                    h = self._run_block(b, (h, state[1]))
                logits = self._logits(h)
                logp = F.log_softmax(logits / self.cfg.temperature, -1)
                kl += float(F.kl_div(logp, self.ref_logp[j], log_target=True, reduction="sum"))
                nll += float(self._nll_sum(logits, self.ids[j]))
        nll /= sum(x[:, 1:].numel() for x in self.ids)
        return {"kl": kl / self.tokens, "nll": nll, "dnll": nll - self.ref_nll}


def get_probe(problem: AllocationProblem, cfg: ProbeConfig) -> Probe:
    key = ("probe", cfg)
    if key not in problem.cache:
        problem.cache[key] = Probe(problem, cfg)
    return problem.cache[key]


@dataclass
class Sensitivity:
    """loss[layer][fraction] = {kl, nll, dnll} with that layer alone truncated to ⌊fraction · r_be⌋."""

    loss: dict[str, dict[float, dict[str, float]]]
    seconds: float  # time the measurements took when they were made (cached or not)
    probes: int  # forward runs they took

    def metric(self, name: str, key: str) -> dict[float, float]:
        return {f: v[key] for f, v in sorted(self.loss[name].items())}


def layer_sensitivity(problem: AllocationProblem, fractions: tuple[float, ...], cfg: ProbeConfig) -> Sensitivity:
    """Each layer truncated alone at each kept fraction of its parameters; measured once per problem cache."""
    out: dict[str, dict[float, dict[str, float]]] = {name: {} for name in problem.shapes}
    seconds, probes = 0.0, 0
    todo = []
    for f in fractions:
        key = ("sensitivity", cfg, round(float(f), 6))
        if key in problem.cache:
            done, secs, n = problem.cache[key]
            for name, v in done.items():
                out[name][f] = v
            seconds, probes = seconds + secs, probes + n
        else:
            todo.append(f)
    if todo:
        t0 = time.perf_counter()
        probe = get_probe(problem, cfg)
        setup = time.perf_counter() - t0
        jobs = [(f, name) for f in todo for name in problem.shapes]
        per_f: dict[float, dict[str, dict[str, float]]] = {f: {} for f in todo}
        timing = {f: setup / len(todo) for f in todo}
        with probe.on_device():
            for f, name in tqdm(jobs, desc="sensitivity", unit="probe", disable=not problem.progress):
                t = time.perf_counter()
                per_f[f][name] = probe.loss({name: rank_at(problem.shapes[name], f)})
                timing[f] += time.perf_counter() - t
        for f in todo:
            problem.cache[("sensitivity", cfg, round(float(f), 6))] = (per_f[f], timing[f], len(per_f[f]))
            for name, v in per_f[f].items():
                out[name][f] = v
            seconds, probes = seconds + timing[f], probes + len(per_f[f])
    return Sensitivity(out, seconds, probes)
