"""Measured sensitivity: how far the model's output moves when layers are truncated.

Used by LEMS (global importance: KL at one probe rank), ASVD's threshold search (loss at several ratios),
MRCS (the same measurements, greedily) and ATP (loss of whole candidate allocations). One implementation:

* `Probe` runs the dense model once, through the problem's runner, on a few short calibration sequences and
  keeps every decoder block's input (parked on the CPU when the model streams) and the dense reference: its
  final hidden states, their log-normalizer at temperature τ and, unless the logits are soft-capped, their
  mean head row m_t = Σ_v p_t,v W_v; never log-probabilities over the vocabulary. The loss of a model whose
  layers of blocks ≥ b are truncated is then measured by running only blocks b..L-1 (streamed one at a time
  when the runner offloads), the final norm and one pass over the vocabulary in chunks (`vocab_pass`, one
  matmul with the head per chunk). With logits linear in h, KL's cross term Σ_v p_v (a_v − b_v) is
  (h_ref − h)·m/τ, so the reference's logits are not recomputed (that would be two matmuls a chunk, the cost
  that dominates on a CPU with a large vocabulary); soft-capped logits recompute them chunk by chunk.
* A truncated layer is W_r = U_r diag(S_r) V_r from its spectrum, put in place of the layer (with its bias)
  by a runner override while its block runs; the model itself is never modified.
* Losses: kl = (1/T_tok) Σ_t KL(p_dense,t ‖ p_trunc,t) at temperature τ (LEMS uses τ = 0.6), every token;
  nll = mean next-token negative log-likelihood (every token but each sequence's last);
  dnll = nll − nll_dense (ASVD's perplexity change, in logs).

Measurements are cached in `problem.cache`, keyed by the probe settings and the problem's counting (a kept
fraction is a different rank under PivGa counting), so methods and ratios sharing a problem cache (same model,
spectra, samples) measure each (layer, fraction, counting) once.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Mapping, Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .. import distributed as dist
from ..errors import SvdpressError
from ..factorize import LayerSpectrum
from ..model.head import Head
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


def _truncated(spectrum: LayerSpectrum, r: int) -> Callable[[nn.Module], nn.Module]:
    """Runner override: the materialized layer -> an nn.Linear holding W_r = U_r diag(S_r) V_r and its bias."""

    def make(layer: nn.Module) -> nn.Module:
        dev, f32 = layer.weight.device, torch.float32  # float32 on the execution device: no CPU float64 matmul
        U, S, V = spectrum.U[:, :r].to(dev, f32), spectrum.S[:r].to(dev, f32), spectrum.V[:r].to(dev, f32)
        w = ((U * S) @ V).to(layer.weight.dtype)
        out = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        out.weight = nn.Parameter(w, requires_grad=False)
        out.bias = getattr(layer, "bias", None)
        return out

    return make


class _LastChunk:
    """Head rows with the last chunk kept: a pass that needs a chunk twice in a row (logits of the probed and
    the reference states under soft-capping; logits then rows for the reference's mean row) reads it once,
    which matters when the head streams from disk."""

    def __init__(self, rows: Callable[[int, int], torch.Tensor]) -> None:
        self.rows, self.span, self.w = rows, None, None

    def __call__(self, a: int, b: int) -> torch.Tensor:
        if self.span != (a, b):
            self.w = None
            self.w, self.span = self.rows(a, b), (a, b)
        return self.w

    def clear(self) -> None:
        self.span = self.w = None


def vocab_pass(head: Head, h: torch.Tensor, temperature: float, targets: torch.Tensor,
               shift: Optional[torch.Tensor] = None, ref: Optional[torch.Tensor] = None):
    """One pass over the vocabulary chunks for hidden states h (T, d) after the final norm, with logits s:

    * lse_t of s_t/τ − shift_t (T,) float32; the shift (a reference's log-normalizer) keeps this near 0, so
      float32 rounds it finely (unshifted, lse ≈ 10 would carry errors near 1e-6, a KL's size);
    * −log p_t(target_t) at τ = 1 (T,) float64, 0 where target_t < 0;
    * with `ref` (the reference's states h_ref): Σ_v p_ref,v (a_v − b_v), a = s_ref/τ, b = s/τ, p_ref =
      exp(a − shift) (T,) float64 (the reference's logits recomputed chunk by chunk)."""
    T = h.shape[0]
    shift = torch.zeros(T, device=h.device) if shift is None else shift.float()
    lse_tau = torch.full((T,), float("-inf"), device=h.device)
    lse_1 = torch.full((T,), float("-inf"), device=h.device)
    got = torch.zeros(T, device=h.device)
    cross = torch.zeros(T, device=h.device, dtype=torch.float64) if ref is not None else None
    for a, b in head.spans(T):
        z = head.logits(h, a, b)
        lse_1 = torch.logaddexp(lse_1, torch.logsumexp(z, -1))
        inside = (targets >= a) & (targets < b)
        if inside.any():
            got = torch.where(inside, z.gather(-1, (targets - a).clamp(0, b - a - 1)[:, None])[:, 0], got)
        zb = z.div_(temperature).sub_(shift[:, None])  # in place: z is done with
        lse_tau = torch.logaddexp(lse_tau, torch.logsumexp(zb, -1))
        if ref is not None:
            za = head.logits(ref, a, b).div_(temperature).sub_(shift[:, None])
            cross += (torch.exp(za) * (za - zb)).sum(-1).double()
    nll = torch.where(targets >= 0, lse_1 - got, 0.0).double()
    return lse_tau, nll, cross


def normalizer(head: Head, h: torch.Tensor, temperature: float, lse: torch.Tensor, mean: bool):
    """A second pass refining lse (float32) to float64: lse + log Σ_v exp(s_v/τ − lse); with `mean`, also
    m_t = Σ_v p_t,v W_v (T, d) float32, p_t = softmax(s_t/τ). With logits linear in h (no soft-capping),
    Σ_v p_v (a_v − b_v) = (h_ref − h)·m/τ, so a measurement needs no reference logits."""
    total = torch.zeros(h.shape[0], dtype=torch.float64, device=h.device)
    m = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if mean else None
    for a, b in head.spans(h.shape[0]):
        p = torch.exp(head.logits(h, a, b).div_(temperature).sub_(lse[:, None]))
        total += p.sum(-1).double()
        if mean:
            m += p @ head.rows(a, b).float()
    if mean:
        m /= total[:, None].float()
    return lse.double() + total.log(), m


class Probe:
    """Dense block inputs and reference outputs on a few calibration sequences (see module docstring)."""

    def __init__(self, problem: AllocationProblem, cfg: ProbeConfig) -> None:
        if problem.runner is None or problem.samples is None:
            raise SvdpressError("this allocation method measures the model's loss: it needs the dense model's "
                                "runner and calibration samples (compress() passes them)")
        self.runner, self.cfg, self.spectra = problem.runner, cfg, problem.spectra
        self.arch, self.device = self.runner.arch, self.runner.device
        head = self.runner.head
        self._chunk = _LastChunk(head.rows)
        self.head = replace(head, rows=self._chunk)
        ids = problem.samples[:cfg.samples, :cfg.seqlen]
        batches = [ids[i:i + cfg.batch_size] for i in range(0, len(ids), cfg.batch_size)]
        states = self.runner.embed(batches)
        hs, self.inputs = self.runner.forward(states, save_inputs=True)  # inputs[b][j]: entering block b, batch j
        self.kwargs = [kw for _, kw in states]
        self.targets = []  # per batch, flattened: the next token, −1 after each sequence's last
        for x in batches:
            t = torch.full(x.shape, -1, dtype=torch.long)
            t[:, :-1] = x[:, 1:]
            self.targets.append(t.reshape(-1).to(self.device))
        # the dense reference per batch, parked: final hidden states (T, d), their log-normalizer at τ, and
        # without soft-capping their mean head row (normalizer); never log-probabilities over the vocabulary
        self.ref: list[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]] = []
        ref_nll = 0.0
        for j, h in enumerate(hs):
            h = self._flat(self.runner.final(h))
            lse, nll, _ = vocab_pass(self.head, h, cfg.temperature, self.targets[j])
            lse, m = normalizer(self.head, h, cfg.temperature, lse, mean=not self.head.softcap)
            ref_nll += float(nll.sum())
            self.ref.append(tuple(None if x is None else self.runner.park(x) for x in (h, lse, m)))
        self._chunk.clear()
        self.tokens = ids.numel()
        self.predicted = sum(int((t >= 0).sum()) for t in self.targets)
        self.ref_nll = ref_nll / self.predicted

    @staticmethod
    def _flat(h: torch.Tensor) -> torch.Tensor:
        return h.reshape(-1, h.shape[-1])

    def block_of(self, name: str) -> int:
        try:
            return self.arch.block_of(name)
        except KeyError:
            raise SvdpressError(f"sensitivity probe: {name} is not a target layer of the model") from None

    @torch.no_grad()
    def loss(self, ranks: Mapping[str, Optional[int]]) -> dict[str, float]:
        """{kl, nll, dnll} of the model with `ranks` applied (None = dense), vs the dense model: blocks
        start..L−1 (start = the first truncated layer's block) and one pass over the vocabulary chunks."""
        cut = {name: r for name, r in ranks.items() if r is not None}
        if not cut:
            return {"kl": 0.0, "nll": self.ref_nll, "dnll": 0.0}
        start = min(self.block_of(name) for name in cut)
        overrides = {name: _truncated(self.spectra[name], r) for name, r in cut.items()}
        states = [(self.inputs[start][j], kw) for j, kw in enumerate(self.kwargs)]
        hs = self.runner.forward(states, start, None, overrides)
        kl = nll = 0.0
        tau = self.cfg.temperature
        for j, h in enumerate(hs):
            h = self._flat(self.runner.final(h))
            h_ref, lse_ref, m = (None if x is None else x.to(self.device) for x in self.ref[j])
            # KL_t = Σ_v p_v (a_v − b_v) − lse(a) + lse(b), with lse(b) − lse(a) from the shifted pass; the
            # cross term from the reference's mean head row, or, soft-capped logits not being linear in h, from
            # its logits recomputed chunk by chunk
            shift = lse_ref.float()
            lse, n, cross = vocab_pass(self.head, h, tau, self.targets[j], shift, None if m is not None else h_ref)
            if m is not None:
                cross = ((h_ref.float() - h.float()) * m).sum(-1).double() / tau
            kl += float((cross + lse.double() - (lse_ref - shift.double())).sum())
            nll += float(n.sum())
        self._chunk.clear()
        nll /= self.predicted
        return {"kl": kl / self.tokens, "nll": nll, "dnll": nll - self.ref_nll}


def get_probe(problem: AllocationProblem, cfg: ProbeConfig) -> Probe:
    key = ("probe", cfg)
    if key not in problem.cache:
        problem.cache[key] = Probe(problem, cfg)
    return problem.cache[key]


@dataclass
class Sensitivity:
    """loss[layer][fraction] = {kl, nll, dnll} with that layer alone truncated to `rank_at(shape, fraction)` under
    the problem's counting (classically ⌊fraction · r_be⌋)."""

    loss: dict[str, dict[float, dict[str, float]]]
    seconds: float  # time the measurements took when they were made (cached or not)
    probes: int  # forward runs they took

    def metric(self, name: str, key: str) -> dict[float, float]:
        return {f: v[key] for f, v in sorted(self.loss[name].items())}


def _key(problem: AllocationProblem, cfg: ProbeConfig, fraction: float) -> tuple:
    return ("sensitivity", cfg, round(float(fraction), 6), problem.counting.name)


def export_measurements(cache: Mapping) -> list[dict]:
    """The sensitivity measurements held in a problem cache as plain data (JSON), for a cache kept on disk."""
    return [{"probe": asdict(k[1]), "fraction": k[2], "counting": k[3], "losses": v[0], "seconds": v[1],
             "probes": v[2]} for k, v in cache.items() if isinstance(k, tuple) and k and k[0] == "sensitivity"]


def import_measurements(items: list[dict]) -> dict:
    """`export_measurements`'s output back as problem-cache entries."""
    return {("sensitivity", ProbeConfig(**e["probe"]), round(float(e["fraction"]), 6), e["counting"]):
            (e["losses"], float(e["seconds"]), int(e["probes"])) for e in items}


def layer_sensitivity(problem: AllocationProblem, fractions: tuple[float, ...], cfg: ProbeConfig) -> Sensitivity:
    """Each layer truncated alone at each kept fraction of its parameters (under the problem's counting); measured
    once per problem cache."""
    out: dict[str, dict[float, dict[str, float]]] = {name: {} for name in problem.shapes}
    seconds, probes = 0.0, 0
    todo = []
    for f in fractions:
        key = _key(problem, cfg, f)
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
        bar = tqdm(total=len(todo) * len(problem.shapes), desc="sensitivity", unit="probe",
                   disable=not problem.progress)

        def measure(job: tuple[float, str]) -> tuple[dict[str, float], float]:
            f, name = job
            t = time.perf_counter()
            loss = probe.loss({name: rank_at(problem.shapes[name], f, 1, problem.counting)})
            bar.update()
            return loss, time.perf_counter() - t

        # one fraction at a time, each stored in the cache as soon as it is complete (and handed to
        # `problem.on_measured`, which may keep it on disk): an interruption loses at most one fraction's work.
        # Under torchrun a fraction's layers are divided among ranks (a probe runs blocks b..L−1: cost L − b) and
        # every rank gets every measurement; in one process this is the plain loop
        L = len(probe.runner.blocks)
        for f in todo:
            jobs = [(f, name) for name in problem.shapes]
            costs = [float(L - probe.block_of(name)) for _, name in jobs]
            measured = dist.map_items(jobs, measure, costs, "sensitivity probes")
            per_f = {name: loss for (_, name), (loss, _) in zip(jobs, measured)}
            secs = setup / len(todo) + sum(s for _, s in measured)
            problem.cache[_key(problem, cfg, f)] = (per_f, secs, len(per_f))
            for name, v in per_f.items():
                out[name][f] = v
            seconds, probes = seconds + secs, probes + len(per_f)
            if problem.on_measured is not None:
                problem.on_measured()
        bar.close()
    return Sensitivity(out, seconds, probes)
