"""Inside the model: block Jacobian norms, layer-wise propagation, layer similarity and lesions.

Each analysis is a plain function of a model that takes [0, 1] pixels (any normalization inside,
``advvit.models.NormalizedModel``) and returns a frozen dataclass of CPU tensors; figures are
drawn from those results elsewhere. The blocks come from :func:`advvit.analysis.blocks.blocks`
(or are passed in), inputs are processed in batches of ``batch_size`` on the model's device, the
model runs in eval mode (its train/eval modes are restored afterwards), and randomness is drawn
from ``seed``.

* :func:`jacobian_norms`: the largest singular value of each block's Jacobian at real inputs
  (the Cauchy-problem view of a ViT: a perturbation grows block by block by at most these);
  for XCiT's and FAN's class-attention blocks, of the class token's path.
* :func:`propagation`: how much an FGSM, PGD or random input perturbation changes each block's
  output, relative to that output.
* :func:`layer_similarity`: correlation and linear CKA between all blocks' outputs, over all
  tokens and over the class token (Bhojanapalli et al. 2021, section 4).
* :func:`lesion` / :func:`lesion_study`: remove a block's attention part, MLP part or the whole
  block after training and measure clean and PGD accuracy (Bhojanapalli et al., section 4).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from advvit.analysis._common import (TINY, batches, check_analysis_norm, check_batch_size,
                                      device_of, example_generator, l2_per_example)
from advvit.analysis.blocks import Block, BlockRef, blocks as model_blocks, eager_model, find_block
from advvit.attacks import check_attack_args, check_eps, fgsm, frozen_model, model_mode, pgd

__all__ = [
    "BlockCall", "block_calls", "block_outputs",
    "JacobianNorms", "jacobian_norms", "power_iteration", "abs_norm_bound",
    "PerturbationEffect", "Propagation", "relative_change", "propagation",
    "SimilarityMatrices", "LayerSimilarity", "layer_similarity", "linear_cka",
    "representation_correlation",
    "lesion", "LesionStudy", "lesion_study",
]



# --------------------------------------------------------------------------------------------
# Shared plumbing: batches, checks, recording block calls
# --------------------------------------------------------------------------------------------





def _check_inputs(x: Tensor, y: Optional[Tensor], batch_size: int) -> None:
    if not torch.is_tensor(x) or not x.is_floating_point() or x.dim() < 2 or len(x) == 0:
        raise ValueError("x must be a non-empty floating-point batch of inputs (N, ...) in [0, 1]")
    if y is not None and (not torch.is_tensor(y) or y.shape[:1] != x.shape[:1]):
        raise ValueError(f"y must be a tensor with one label per input: got {getattr(y, 'shape', y)} "
                         f"for {len(x)} inputs")
    check_batch_size(batch_size)




def _unit(t: Tensor) -> Tensor:
    return t / l2_per_example(t).clamp_min(TINY).view(-1, *([1] * (t.dim() - 1)))




def _resolve_blocks(model: nn.Module, given: Optional[Sequence[Block]]) -> List[Block]:
    return list(given) if given is not None else model_blocks(model)


@dataclass(frozen=True)
class BlockCall:
    """One block's forward call as the model made it, for one batch.

    Attributes:
        block: the block.
        args: its positional arguments (tensors detached and contiguous copies).
        kwargs: its keyword arguments.
        output: what it returned (a detached copy).
    """

    block: Block
    args: Tuple
    kwargs: Dict
    output: Tensor

    @property
    def stream(self) -> Tensor:
        """The residual stream the block maps to its output (``args[layout.stream_arg]``)."""
        return self.args[self.block.layout.stream_arg]

    def example(self, i: int) -> "BlockCall":
        """The same call for example ``i`` alone (every batched tensor argument sliced)."""
        batch = len(self.output)

        def pick(v):
            return v[i:i + 1] if torch.is_tensor(v) and v.dim() > 0 and len(v) == batch else v
        return BlockCall(self.block, tuple(pick(a) for a in self.args),
                         {k: pick(v) for k, v in self.kwargs.items()}, self.output[i:i + 1])

    def function(self) -> Callable[[Tensor], Tensor]:
        """The block as a function of its stream, its other arguments held at their values.

        Scaled-dot-product attention runs on its math kernel inside, the one with forward-mode
        derivatives (``torch.func.jvp``) and batching rules for ``vmap``.
        """
        s = self.block.layout.stream_arg
        module, args, kwargs = self.block.module, self.args, self.kwargs

        def block_fn(z: Tensor) -> Tensor:
            with sdpa_kernel([SDPBackend.MATH]):
                return module(*args[:s], z, *args[s + 1:], **kwargs)
        return block_fn


def _copy(value: object) -> object:
    return value.detach().clone().contiguous() if torch.is_tensor(value) else value


@contextlib.contextmanager
def _recording(all_blocks: Sequence[Block], keep_inputs: bool) -> Iterator[List[list]]:
    """Record each block's (args, kwargs, output) for the forward passes run inside."""
    records: List[list] = [[] for _ in all_blocks]
    handles = []
    for block, rec in zip(all_blocks, records):
        if keep_inputs:
            def pre_hook(_m, args, kwargs, rec=rec):
                rec.append([tuple(_copy(a) for a in args), {k: _copy(v) for k, v in kwargs.items()}])
            handles.append(block.module.register_forward_pre_hook(pre_hook, with_kwargs=True))

        def post_hook(_m, _args, output, rec=rec, block=block):
            if not torch.is_tensor(output):
                raise TypeError(f"block {block.name} returned {type(output).__name__}, not a tensor")
            # A copy: the next block may update its input in place.
            if keep_inputs:
                rec[-1].append(_copy(output))
            else:
                rec.append(_copy(output))
        handles.append(block.module.register_forward_hook(post_hook))
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


def _check_ran_once(all_blocks: Sequence[Block], records: List[list]) -> None:
    for block, rec in zip(all_blocks, records):
        if len(rec) != 1:
            raise RuntimeError(f"block {block.name} ran {len(rec)} times in one forward pass; the "
                               "analyses need each block once (a shared block has no single input)")


def block_calls(model: nn.Module, x: Tensor, *, blocks: Optional[Sequence[Block]] = None) -> List[BlockCall]:
    """Run ``model`` on one batch in eval mode and return each block's call, in block order.

    Args:
        model: maps [0, 1] pixels to logits (wrappers are fine).
        x: one batch of inputs, on the model's device.
        blocks: the blocks to record (default: all of :func:`~advvit.analysis.blocks.blocks`).
    """
    all_blocks = _resolve_blocks(model, blocks)
    net = eager_model(model)
    with model_mode(net, "eval"), torch.no_grad(), _recording(all_blocks, keep_inputs=True) as records:
        net(x)
    _check_ran_once(all_blocks, records)
    return [BlockCall(b, rec[0][0], rec[0][1], rec[0][2]) for b, rec in zip(all_blocks, records)]


def block_outputs(model: nn.Module, x: Tensor, *, blocks: Optional[Sequence[Block]] = None) -> List[Tensor]:
    """Each block's output for one batch ``x`` (eval mode, no gradients), in block order."""
    all_blocks = _resolve_blocks(model, blocks)
    net = eager_model(model)
    with model_mode(net, "eval"), torch.no_grad(), _recording(all_blocks, keep_inputs=False) as records:
        net(x)
    _check_ran_once(all_blocks, records)
    return [rec[0] for rec in records]


# --------------------------------------------------------------------------------------------
# 1. Block Jacobian spectral norms
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class JacobianNorms:
    """Per-block Jacobian norms at ``n`` inputs.

    Attributes:
        blocks: block names, in order (the columns below).
        paths: per block, the Jacobian ``sigma`` is of: ``"all-tokens"`` (the block's whole
            output, every token or the whole feature map, w.r.t. its stream) or
            ``"class-token"`` (the class token's output rows w.r.t. the whole input: blocks that
            update the class token alone, see ``BlockLayout.class_token_update``).
        sigma: (n, L) the largest singular value of block l's Jacobian (its path) at input i.
        sigma_all_tokens: (n, L) the same for the block's whole output: ``sigma`` where the
            path is ``"all-tokens"``; for a class-token path it includes the patch tokens'
            path to themselves (XCiT's class-attention blocks double them, and the last block's
            never reach the head).
        converged: (n, L) whether power iteration for ``sigma`` met ``tol`` within ``max_steps``.
        converged_all_tokens: (n, L) the same for ``sigma_all_tokens``.
        steps: (n, L) the power-iteration step at which ``sigma`` converged (``max_steps`` if not).
        bound: (n, L) sqrt(||J||_1 ||J||_inf) of the path's Jacobian, or None when not asked for.
        jvp_passes: batched block jvp passes run (one per power-iteration step and batch).
        vjp_passes: batched block vjp passes run (power iteration, plus one per Jacobian row
            for the bound).
        seconds: wall-clock time of the whole computation.
    """

    blocks: Tuple[str, ...]
    paths: Tuple[str, ...]
    sigma: Tensor
    sigma_all_tokens: Tensor
    converged: Tensor
    converged_all_tokens: Tensor
    steps: Tensor
    bound: Optional[Tensor]
    jvp_passes: int
    vjp_passes: int
    seconds: float

    @property
    def mean(self) -> Tensor:
        """(L,) mean of ``sigma`` over the inputs."""
        return self.sigma.mean(0)

    @property
    def std(self) -> Tensor:
        """(L,) standard deviation of ``sigma`` over the inputs (0 for one input)."""
        return self.sigma.std(0, correction=1) if len(self.sigma) > 1 else torch.zeros(len(self.blocks))

    def to_dict(self) -> Dict[str, object]:
        """JSON-ready: per block the mean and spread of ``sigma``, the share converged, the
        bound's mean; the passes and time."""
        return {"blocks": list(self.blocks), "paths": list(self.paths),
                "sigma_mean": self.mean.tolist(), "sigma_std": self.std.tolist(),
                "sigma_all_tokens_mean": self.sigma_all_tokens.mean(0).tolist(),
                "converged": float(self.converged.double().mean()),
                "converged_all_tokens": float(self.converged_all_tokens.double().mean()),
                "bound_mean": self.bound.mean(0).tolist() if self.bound is not None else None,
                "jvp_passes": self.jvp_passes, "vjp_passes": self.vjp_passes,
                "seconds": self.seconds}


def power_iteration(fn: Callable[[Tensor], Tensor], z: Tensor, v0: Tensor, *, max_steps: int = 200,
                    tol: float = 1e-5) -> Tuple[Tensor, Tensor, Tensor, int, int]:
    """Largest singular value of ``fn``'s Jacobian at each example of ``z``, by power iteration.

    ``fn`` maps a batch to a batch and must treat examples independently (its Jacobian is then
    block diagonal, one block J_i per example): one batched jvp gives every J_i v_i and one
    batched vjp every J_i^T u_i, so all examples iterate at once, each with its own
    normalization. Step k computes u = J v (``torch.func.jvp``), sigma = ||u||, then
    v <- J^T u / ||J^T u|| (the ``torch.func.vjp`` of a linearization taken once); an example
    has converged when sigma changed by at most ``tol * sigma`` since the previous step. No
    Jacobian is ever formed.

    Args:
        fn: the function (one block, its other inputs fixed).
        z: (B, ...) the points at which to differentiate.
        v0: (B, ...) the start vectors, like ``z``.
        max_steps: the most steps.
        tol: relative change of sigma at which an example has converged.

    Returns:
        (sigma, converged, steps, jvp_passes, vjp_passes): sigma (B,), converged (B,) bool,
        steps (B,) the step of convergence (``max_steps`` where not converged).
    """
    _, vjp_fn = torch.func.vjp(fn, z)
    v = _unit(v0)
    sigma = torch.zeros(len(z), device=z.device)
    converged = torch.zeros(len(z), dtype=torch.bool, device=z.device)
    steps = torch.full((len(z),), max_steps, dtype=torch.long, device=z.device)
    n_jvp = n_vjp = 0
    for step in range(1, max_steps + 1):
        _, u = torch.func.jvp(fn, (z,), (v,))
        n_jvp += 1
        new = l2_per_example(u).float()
        if step > 1:
            newly = ~converged & ((new - sigma).abs() <= tol * new)
            steps[newly] = step
            converged |= newly
        sigma = new
        if step == max_steps or bool(converged.all()):
            break
        (w,) = vjp_fn(u)
        n_vjp += 1
        v = _unit(w)
    return sigma, converged, steps, n_jvp, n_vjp


def abs_norm_bound(fn: Callable[[Tensor], Tensor], z: Tensor, *, chunk_size: int = 64) -> Tuple[Tensor, int]:
    """sqrt(||J||_1 ||J||_inf) of ``fn``'s Jacobian at each example of ``z``: an upper bound on
    its largest singular value (Hoelder: ||J||_2^2 <= ||J||_1 ||J||_inf).

    The bound needs every entry's magnitude, so the Jacobian is read row by row: one vjp with
    the one-hot cotangent of each output coordinate (all examples at once, ``chunk_size`` rows
    per ``vmap``), keeping the largest row sum (||J||_inf) and the running column sums
    (||J||_1); memory stays at ``chunk_size`` rows. Cost: one vjp per output coordinate of one
    example, as many as a full Jacobian.

    Returns:
        (bound (B,), vjp_passes).
    """
    out, vjp_fn = torch.func.vjp(fn, z)
    batch, m = len(out), out[0].numel()
    row_max = torch.zeros(batch, device=z.device)
    col_sum = torch.zeros(batch, z[0].numel(), device=z.device)
    for start in range(0, m, chunk_size):
        rows = torch.arange(start, min(m, start + chunk_size), device=z.device)
        cot = torch.zeros(len(rows), batch, m, dtype=out.dtype, device=z.device)
        cot[torch.arange(len(rows)), :, rows] = 1.0
        (grads,) = torch.func.vmap(vjp_fn)(cot.view(len(rows), *out.shape))
        mags = grads.flatten(2).abs().float()  # (rows, B, inputs): |J_i[row, :]|
        row_max = torch.maximum(row_max, mags.sum(-1).amax(0))
        col_sum += mags.sum(0)
    return (row_max * col_sum.amax(-1)).sqrt(), m


def _start_vector(seed: int, block_index: int, indices: range, like: Tensor) -> Tensor:
    vs = [torch.randn(like.shape[1:], generator=example_generator(seed, 1, block_index, i))
          for i in indices]
    return torch.stack(vs).to(like.device, like.dtype)


def _jacobian_path(block: Block) -> str:
    """``"class-token"`` for a block that updates the class token alone, else ``"all-tokens"``."""
    return "class-token" if block.layout.class_token_update and block.class_token is not None else "all-tokens"


def _token_rows(fn: Callable[[Tensor], Tensor], token: int) -> Callable[[Tensor], Tensor]:
    """``fn`` with only token ``token`` of its (B, N, C) output kept, as (B, 1, C)."""
    def rows(z: Tensor) -> Tensor:
        return fn(z)[:, token:token + 1]
    return rows


def jacobian_norms(model: nn.Module, x: Tensor, *, blocks: Optional[Sequence[Block]] = None,
                   max_steps: int = 200, tol: float = 1e-5, bound: bool = False,
                   bound_chunk: int = 64, seed: int = 0, batch_size: int = 32) -> JacobianNorms:
    """The spectral norm of each block's Jacobian w.r.t. its input, at each input of ``x``.

    For every batch the model runs once to record each block's input; then, block by block,
    :func:`power_iteration` finds the largest singular value of the block's Jacobian at that
    input for every example (the block maps one example's tokens, or feature map, to its output;
    in eval mode every supported block treats examples independently: LayerNorm and attention
    work within an example, the BatchNorm of XCiT and FAN uses its running statistics). A class-attention
    block of CaiT is differentiated w.r.t. the class token it updates, the patch tokens it reads
    held fixed. XCiT's (and FAN's) class-attention blocks map all tokens to all tokens but
    update only the class token, passing the patch tokens on doubled, token by token; their
    ``sigma`` is the class-token path (the class token's output w.r.t. all input tokens), the
    whole output's norm kept beside it (``sigma_all_tokens``: one more power iteration).

    Cost per block and batch: one vjp linearization, then one jvp (forward-mode, about two
    forwards) and one vjp (about two forwards) per step, ``steps`` steps; nothing is stored
    beyond one linearization. With ``bound``, also :func:`abs_norm_bound`: one vjp per output
    coordinate of one example (e.g. 64 tokens x 128 channels = 8192 for XCiT-N12 at 32x32),
    which is what the Cauchy-problem paper's code uses in place of the exact norm for its larger
    models.

    Args:
        model: maps [0, 1] pixels to logits.
        x: (n, C, H, W) inputs in [0, 1].
        blocks: which blocks (default all of the model's).
        max_steps: power-iteration steps at most.
        tol: convergence tolerance, relative change of sigma between steps.
        bound: also compute sqrt(||J||_1 ||J||_inf).
        bound_chunk: Jacobian rows per vmapped vjp for the bound.
        seed: seeds the start vectors (one per example and block, whatever the batch size).
        batch_size: inputs per batch.

    Returns:
        A :class:`JacobianNorms`.
    """
    _check_inputs(x, None, batch_size)
    if not isinstance(max_steps, int) or max_steps < 2:
        raise ValueError(f"max_steps must be an integer >= 2, got {max_steps!r}")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol must be > 0, got {tol!r}")
    if not isinstance(bound_chunk, int) or bound_chunk < 1:
        raise ValueError(f"bound_chunk must be an integer >= 1, got {bound_chunk!r}")
    all_blocks = _resolve_blocks(model, blocks)
    started = time.perf_counter()
    device = device_of(model)
    n, L = len(x), len(all_blocks)
    paths = tuple(_jacobian_path(b) for b in all_blocks)
    sigma = torch.zeros(n, L)
    sigma_all = torch.zeros(n, L)
    converged = torch.zeros(n, L, dtype=torch.bool)
    converged_all = torch.zeros(n, L, dtype=torch.bool)
    steps = torch.zeros(n, L, dtype=torch.long)
    bounds = torch.zeros(n, L) if bound else None
    n_jvp = n_vjp = 0
    net = eager_model(model)
    with frozen_model(net, "eval"), torch.enable_grad():
        for sl in batches(n, batch_size):
            calls = block_calls(net, x[sl].to(device), blocks=all_blocks)
            for col, call in enumerate(calls):
                whole, z = call.function(), call.stream
                v0 = _start_vector(seed, call.block.index, range(sl.start, sl.stop), z)
                s, c, k, a, b = power_iteration(whole, z, v0, max_steps=max_steps, tol=tol)
                sigma_all[sl, col], converged_all[sl, col] = s.cpu(), c.cpu()
                n_jvp, n_vjp = n_jvp + a, n_vjp + b
                fn = whole
                if paths[col] == "class-token":
                    fn = _token_rows(whole, call.block.class_token)
                    s, c, k, a, b = power_iteration(fn, z, v0, max_steps=max_steps, tol=tol)
                    n_jvp, n_vjp = n_jvp + a, n_vjp + b
                sigma[sl, col], converged[sl, col], steps[sl, col] = s.cpu(), c.cpu(), k.cpu()
                if bounds is not None:
                    bnd, passes = abs_norm_bound(fn, z, chunk_size=bound_chunk)
                    bounds[sl, col] = bnd.cpu()
                    n_vjp += passes
    return JacobianNorms(blocks=tuple(b.name for b in all_blocks), paths=paths, sigma=sigma,
                         sigma_all_tokens=sigma_all, converged=converged, converged_all_tokens=converged_all,
                         steps=steps, bound=bounds, jvp_passes=n_jvp, vjp_passes=n_vjp,
                         seconds=time.perf_counter() - started)


# --------------------------------------------------------------------------------------------
# 2. Layer-wise propagation of input perturbations
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PerturbationEffect:
    """How one kind of input perturbation changes each block's output.

    Attributes:
        name: ``"fgsm"``, ``"pgd-<k>"``, or ``"random(<attack>)"`` for the control matched to an
            attack.
        matched_to: for a random control, the attack whose per-example L2 norm it has.
        ratio: (n, L) ||h_l(x + delta) - h_l(x)|| / ||h_l(x)|| (Frobenius norms over each
            example's whole block output).
        input_ratio: (n,) ||delta|| / ||x||, the same ratio at the input.
        l2: (n,) ||delta||_2 per example.
        linf: (n,) ||delta||_inf per example.
    """

    name: str
    matched_to: Optional[str]
    ratio: Tensor
    input_ratio: Tensor
    l2: Tensor
    linf: Tensor

    @property
    def mean(self) -> Tensor:
        """(L,) mean ratio over the inputs."""
        return self.ratio.mean(0)

    @property
    def std(self) -> Tensor:
        """(L,) standard deviation of the ratio over the inputs (0 for one input)."""
        return self.ratio.std(0, correction=1) if len(self.ratio) > 1 else torch.zeros(self.ratio.shape[1])


@dataclass(frozen=True)
class Propagation:
    """:func:`propagation`'s result: one :class:`PerturbationEffect` per perturbation."""

    blocks: Tuple[str, ...]
    eps: float
    norm: str
    pgd_steps: int
    effects: Dict[str, PerturbationEffect]

    def to_dict(self) -> Dict[str, object]:
        """JSON-ready: per perturbation the mean and spread of the ratio per block, and the mean
        input ratio and norms."""
        return {"blocks": list(self.blocks),
                "effects": {k: {"mean": e.mean.tolist(), "std": e.std.tolist(),
                                "input_ratio": float(e.input_ratio.mean()),
                                "l2": float(e.l2.mean()), "linf": float(e.linf.mean())}
                            for k, e in self.effects.items()}}


def _relative_changes(clean: List[Tensor], perturbed: List[Tensor]) -> Tensor:
    cols = [l2_per_example(p - c) / l2_per_example(c).clamp_min(TINY)
            for c, p in zip(clean, perturbed)]
    return torch.stack(cols, dim=1).float().cpu()


def relative_change(model: nn.Module, x: Tensor, delta: Tensor, *, blocks: Optional[Sequence[Block]] = None,
                    batch_size: int = 64) -> Tensor:
    """||h_l(x + delta) - h_l(x)|| / ||h_l(x)|| for every block l and input, as an (n, L) tensor.

    ``h_l`` is block l's output for one example, its norm the Frobenius norm over all its tokens
    (or its whole feature map). The model runs in eval mode without gradients.
    """
    _check_inputs(x, None, batch_size)
    if delta.shape != x.shape:
        raise ValueError(f"delta must have the shape of x, {tuple(x.shape)}; got {tuple(delta.shape)}")
    all_blocks = _resolve_blocks(model, blocks)
    device = device_of(model)
    parts = []
    for sl in batches(len(x), batch_size):
        xb, db = x[sl].to(device), delta[sl].to(device)
        parts.append(_relative_changes(block_outputs(model, xb, blocks=all_blocks),
                                       block_outputs(model, xb + db, blocks=all_blocks)))
    return torch.cat(parts)


def _random_like(delta: Tensor, x: Tensor, norm: str, seed: int, key: int, indices: range) -> Tensor:
    """Random perturbations with each example's L2 norm equal to ``delta``'s, kept in [0, 1].

    Linf: random signs, so the control lies in the same Linf ball as the attack (an L2 norm
    of at most eps * sqrt(d) spreads to at most eps per pixel); L2: a Gaussian direction.
    """
    dirs = []
    for i in indices:
        g = example_generator(seed, 2, key, i)
        d = torch.randn(x.shape[1:], generator=g)
        dirs.append(d.sign() if norm == "linf" else d)
    direction = _unit(torch.stack(dirs).to(x.device, x.dtype))
    scaled = direction * l2_per_example(delta).view(-1, *([1] * (x.dim() - 1)))
    return (x + scaled).clamp(0.0, 1.0) - x


def _attacks(pgd_steps: int) -> List[Tuple[str, dict]]:
    # FGSM as Goodfellow et al. (from the clean point); PGD from a random start (Madry et al.).
    return [("fgsm", dict(steps=1, random_init=False)),
            (f"pgd-{pgd_steps}", dict(steps=pgd_steps, random_init=True))]


def _attack(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str, steps: int,
            step_size: Optional[float], random_init: bool, seed: int) -> Tensor:
    """``advvit.attacks.pgd`` with its random start drawn from ``seed`` (global RNG restored)."""
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        if steps == 1 and not random_init:
            return fgsm(model, x, y, eps=eps, step_size=step_size, norm=norm, random_init=False)
        return pgd(model, x, y, eps=eps, step_size=step_size, steps=steps, norm=norm,
                   random_init=random_init)


def propagation(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str = "linf",
                pgd_steps: int = 10, step_size: Optional[float] = None,
                blocks: Optional[Sequence[Block]] = None, seed: int = 0,
                batch_size: int = 64) -> Propagation:
    """Layer-wise propagation of FGSM, PGD-k and random perturbations of the same norm.

    For every input the perturbations are: FGSM (one signed-gradient / L2 step of size eps from
    the clean point), PGD with ``pgd_steps`` steps from a random start (``advvit.attacks``), and
    for each of them a random control of the same per-example L2 norm (random signs for Linf,
    so inside the same eps-ball; a Gaussian direction for L2), clipped to [0, 1] as the attacks
    are. For each, :func:`relative_change` per block; the measured norms of every delta are kept.

    Args:
        model: maps [0, 1] pixels to logits.
        x: (n, C, H, W) inputs in [0, 1].
        y: (n,) labels.
        eps: the attacks' radius (``advvit.attacks.check_eps`` policy).
        norm: "linf" or "l2".
        pgd_steps: PGD's steps.
        step_size: the attacks' step (default ``1.5 * eps / steps``).
        blocks: which blocks (default all).
        seed: seeds PGD's random start (per batch) and the random controls (per example).
        batch_size: inputs per batch.

    Returns:
        A :class:`Propagation` with effects ``fgsm``, ``random(fgsm)``, ``pgd-k``,
        ``random(pgd-k)``.
    """
    _check_inputs(x, y, batch_size)
    check_analysis_norm(norm)
    check_attack_args(eps, pgd_steps, norm, step_size)
    check_eps(eps, norm, input_shape=tuple(x.shape[1:]))
    all_blocks = _resolve_blocks(model, blocks)
    net = eager_model(model)
    device = device_of(net)
    names = []
    for name, _ in _attacks(pgd_steps):
        names += [name, f"random({name})"]
    collected: Dict[str, List[Tuple[Tensor, Tensor]]] = {k: [] for k in names}
    for sl in batches(len(x), batch_size):
        xb, yb = x[sl].to(device), y[sl].to(device)
        clean = block_outputs(net, xb, blocks=all_blocks)
        for key, (name, spec) in enumerate(_attacks(pgd_steps)):
            delta = _attack(net, xb, yb, eps=eps, norm=norm, step_size=step_size, seed=seed + sl.start,
                            **spec) - xb
            control = _random_like(delta, xb, norm, seed, key, range(sl.start, sl.stop))
            for label, d in ((name, delta), (f"random({name})", control)):
                ratios = _relative_changes(clean, block_outputs(net, xb + d, blocks=all_blocks))
                collected[label].append((ratios, d.detach()))
    x_norm = l2_per_example(x.cpu()).clamp_min(TINY)
    effects = {}
    for label in names:
        ratios = torch.cat([r for r, _ in collected[label]])
        deltas = torch.cat([d for _, d in collected[label]]).cpu()
        effects[label] = PerturbationEffect(
            name=label, matched_to=label[len("random("):-1] if label.startswith("random(") else None,
            ratio=ratios, input_ratio=l2_per_example(deltas) / x_norm,
            l2=l2_per_example(deltas), linf=deltas.flatten(1).abs().amax(1))
    return Propagation(blocks=tuple(b.name for b in all_blocks), eps=float(eps), norm=norm,
                       pgd_steps=pgd_steps, effects=effects)


# --------------------------------------------------------------------------------------------
# 3. Layer similarity
# --------------------------------------------------------------------------------------------

def _centered(x: Tensor) -> Tensor:
    x = x.flatten(1).double()
    return x - x.mean(0, keepdim=True)


def linear_cka(x: Tensor, y: Tensor) -> Tensor:
    """Linear CKA (Kornblith et al. 2019) of two representations of the same n examples.

    ``x`` (n, p) and ``y`` (n, q) (extra dims are flattened) are centered per feature over the
    examples; CKA = ||y^T x||_F^2 / (||x^T x||_F ||y^T y||_F), computed from the n x n Gram
    matrices. Invariant to orthogonal transforms and isotropic scaling of either; 1 for x with
    itself; NaN when either representation is constant over the examples.
    """
    gx, gy = _gram(x), _gram(y)
    return _cka_from_grams(gx, gy)


def _gram(x: Tensor) -> Tensor:
    xc = _centered(x)
    return xc @ xc.T


def _cka_from_grams(gx: Tensor, gy: Tensor) -> Tensor:
    return (gx * gy).sum() / (gx.norm() * gy.norm())


def representation_correlation(x: Tensor, y: Tensor) -> Tensor:
    """Pearson correlation of two representations of the same n examples, entry by entry.

    Both are centered per feature over the examples (removing what every input shares, such
    as position embeddings and the learned class token, which would otherwise make every pair of
    layers look alike), then correlated over all (example, feature) entries:
    <x, y> / (||x|| ||y||). Needs equal shapes; 1 for x with itself, -1 with -x.
    """
    if x.shape != y.shape:
        raise ValueError(f"representations of shapes {tuple(x.shape)} and {tuple(y.shape)} have no "
                         "entry-by-entry correlation")
    xc, yc = _centered(x), _centered(y)
    return (xc * yc).sum() / (xc.norm() * yc.norm())


@dataclass(frozen=True)
class SimilarityMatrices:
    """L x L similarity between block outputs.

    Attributes:
        correlation: :func:`representation_correlation`; NaN where two outputs differ in shape
            or a block has no such representation.
        cka: :func:`linear_cka`; NaN where a block has no such representation.
    """

    correlation: Tensor
    cka: Tensor


@dataclass(frozen=True)
class LayerSimilarity:
    """:func:`layer_similarity`'s result.

    Attributes:
        blocks: block names (rows and columns).
        tokens: similarity over every token of each block's output (the whole feature map for a
            ResNet block).
        class_token: similarity over the class token only; rows and columns of blocks without
            one (see ``Block.class_token``) are NaN.
        n: number of inputs.
    """

    blocks: Tuple[str, ...]
    tokens: SimilarityMatrices
    class_token: SimilarityMatrices
    n: int

    @property
    def neighbour_cka(self) -> float:
        """The mean linear CKA (all tokens) of each block with the next; NaN for one block."""
        if len(self.blocks) < 2:
            return math.nan
        return float(torch.diagonal(self.tokens.cka, 1).mean())

    def to_dict(self) -> Dict[str, object]:
        """JSON-ready: both matrices over all tokens and over the class token."""
        return {"blocks": list(self.blocks),
                "tokens": {"correlation": self.tokens.correlation.tolist(),
                           "cka": self.tokens.cka.tolist()},
                "class_token": {"correlation": self.class_token.correlation.tolist(),
                                "cka": self.class_token.cka.tolist()}}


def _similarities(reps: List[Optional[Tensor]]) -> SimilarityMatrices:
    # Shapes are compared unflattened: two feature maps of equal size but another layout (a
    # ResNet's 16x2x2 and 64x1x1) have no entry-by-entry correspondence.
    L = len(reps)
    corr = torch.full((L, L), math.nan, dtype=torch.float64)
    cka = torch.full((L, L), math.nan, dtype=torch.float64)
    grams = [_gram(r) if r is not None else None for r in reps]
    for i in range(L):
        for j in range(i, L):
            if grams[i] is None or grams[j] is None:
                continue
            cka[i, j] = cka[j, i] = _cka_from_grams(grams[i], grams[j])
            if reps[i].shape == reps[j].shape:
                corr[i, j] = corr[j, i] = representation_correlation(reps[i], reps[j])
    return SimilarityMatrices(correlation=corr, cka=cka)


def layer_similarity(model: nn.Module, x: Tensor, *, blocks: Optional[Sequence[Block]] = None,
                     batch_size: int = 64) -> LayerSimilarity:
    """Correlation and linear CKA between every pair of block outputs (Bhojanapalli et al. sec. 4).

    Every block's output for all n inputs is kept (float32 on the CPU: n x L x tokens x channels
    values), then compared over all tokens (each example's output flattened) and over the class
    token alone.

    Args:
        model: maps [0, 1] pixels to logits.
        x: (n, C, H, W) inputs in [0, 1], n >= 2.
        blocks: which blocks (default all).
        batch_size: inputs per batch.
    """
    _check_inputs(x, None, batch_size)
    if len(x) < 2:
        raise ValueError("layer_similarity needs at least 2 inputs (similarity is over examples)")
    all_blocks = _resolve_blocks(model, blocks)
    device = device_of(model)
    outs: List[List[Tensor]] = [[] for _ in all_blocks]
    for sl in batches(len(x), batch_size):
        for store, out in zip(outs, block_outputs(model, x[sl].to(device), blocks=all_blocks)):
            store.append(out.float().cpu())
    full = [torch.cat(o) for o in outs]
    cls = [f[:, b.class_token] if b.class_token is not None else None for f, b in zip(full, all_blocks)]
    return LayerSimilarity(blocks=tuple(b.name for b in all_blocks),
                           tokens=_similarities(full),
                           class_token=_similarities(cls), n=len(x))


# --------------------------------------------------------------------------------------------
# 4. Lesions
# --------------------------------------------------------------------------------------------

def _zero_output(_module: nn.Module, _args: tuple, output: Tensor) -> Tensor:
    return torch.zeros_like(output)


@contextlib.contextmanager
def lesion(model: nn.Module, block: BlockRef, kind: str = "block") -> Iterator[nn.Module]:
    """Remove part of a trained model inside the ``with`` body; restore it exactly on exit.

    ``kind`` is a part name of the block (``"attn"``, ``"mlp"``, XCiT's ``"lpi"``, the
    ``"conv"`` branch of ResNet and ConvNeXt blocks: that residual branch adds nothing) or ``"block"`` (the whole block: its
    residual stream passes through unchanged; for a block whose shortcut does something, a
    ResNet block, all its parts are removed and the shortcut path stays). Done with forward
    hooks on the part or block modules: no weight changes, so on exit (also after an error) the
    hooks are removed and the model is exactly as before.

    A ``torch.compile``-d module does not see hooks added after it was compiled, so call the
    model this yields (``eager_model(model)``: the same modules, no compile or DDP wrapper)::

        with lesion(model, 3, "attn") as lesioned:
            logits = lesioned(x)

    Args:
        model: the model (wrappers are fine).
        block: the block's index, name or :class:`Block`.
        kind: a part name or ``"block"``.

    Yields:
        The model to call while the lesion is in place.

    Raises:
        KeyError: unknown block; ValueError: a kind the block does not have.
    """
    target = find_block(model_blocks(model), block)
    allowed = target.part_names + ("block",)
    if kind not in allowed:
        raise ValueError(f"lesion kind {kind!r} is not one of block {target.name}'s: {list(allowed)}")
    handles = []
    try:
        if kind == "block" and target.layout.identity_skip:
            stream = target.layout.stream_arg
            handles.append(target.module.register_forward_hook(lambda _m, args, _out: args[stream]))
        else:
            parts = target.parts if kind == "block" else (target.part(kind),)
            handles += [p.module.register_forward_hook(_zero_output) for p in parts]
        yield eager_model(model)
    finally:
        for h in handles:
            h.remove()


@dataclass(frozen=True)
class LesionStudy:
    """:func:`lesion_study`'s result.

    Attributes:
        blocks: block names (columns).
        kinds: lesion kinds (rows).
        clean_accuracy: (K, L) clean accuracy with that lesion; NaN where the block has no such
            part.
        robust_accuracy: (K, L) accuracy under PGD against the lesioned model.
        baseline_clean: clean accuracy of the intact model.
        baseline_robust: PGD accuracy of the intact model.
        eps, norm, steps: the PGD attack.
        n: number of inputs.
        clean_correct: (K, L, n) whether each input is classified right with that lesion
            (False where the block has no such part), so two lesions or a lesion and the intact
            model compare image by image.
        robust_correct: (K, L, n) the same under PGD.
        baseline_clean_correct: (n,) the intact model's, clean.
        baseline_robust_correct: (n,) the intact model's, under PGD.
    """

    blocks: Tuple[str, ...]
    kinds: Tuple[str, ...]
    clean_accuracy: Tensor
    robust_accuracy: Tensor
    baseline_clean: float
    baseline_robust: float
    eps: float
    norm: str
    steps: int
    n: int
    clean_correct: Tensor
    robust_correct: Tensor
    baseline_clean_correct: Tensor
    baseline_robust_correct: Tensor

    def rows(self) -> List[dict]:
        """One dict per (kind, block) that exists: kind, block, clean, robust and their drops
        from the intact model, for a table."""
        out = []
        for k, kind in enumerate(self.kinds):
            for b, name in enumerate(self.blocks):
                clean, robust = float(self.clean_accuracy[k, b]), float(self.robust_accuracy[k, b])
                if math.isnan(clean):
                    continue
                out.append(dict(kind=kind, block=name, clean=clean, robust=robust,
                                clean_drop=self.baseline_clean - clean,
                                robust_drop=self.baseline_robust - robust))
        return out

    def to_dict(self) -> Dict[str, object]:
        """JSON-ready: both accuracy tables, the intact model's, :meth:`rows`, and the
        per-example outcomes (``per_example``: 0/1 per input, ``None`` for a lesion the block
        does not have)."""
        return {"blocks": list(self.blocks), "kinds": list(self.kinds),
                "clean_accuracy": self.clean_accuracy.tolist(),
                "robust_accuracy": self.robust_accuracy.tolist(),
                "baseline_clean": self.baseline_clean, "baseline_robust": self.baseline_robust,
                "rows": self.rows(),
                "per_example": {
                    "baseline_clean": self.baseline_clean_correct.int().tolist(),
                    "baseline_robust": self.baseline_robust_correct.int().tolist(),
                    "clean": _per_lesion(self.clean_correct, self.clean_accuracy),
                    "robust": _per_lesion(self.robust_correct, self.robust_accuracy)}}


def _per_lesion(correct: Tensor, accuracy: Tensor) -> List[List[Optional[List[int]]]]:
    """(K, L) lists of each input's 0/1 outcome, None where the block has no such lesion."""
    return [[None if math.isnan(float(a)) else c.int().tolist() for c, a in zip(cs, accs)]
            for cs, accs in zip(correct, accuracy)]


def _outcomes(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str, steps: int,
              step_size: Optional[float], seed: int, batch_size: int) -> Tuple[Tensor, Tensor]:
    """Whether each input is classified right, clean and under PGD: two (n,) bool tensors."""
    device = device_of(model)
    clean, robust = [], []
    for sl in batches(len(x), batch_size):
        xb, yb = x[sl].to(device), y[sl].to(device)
        with model_mode(model, "eval"), torch.no_grad():
            clean.append((model(xb).argmax(1) == yb).cpu())
        # The same random start for every lesion (seeded per batch): differences between
        # lesions are the lesions', not the start's.
        x_adv = _attack(model, xb, yb, eps=eps, norm=norm, steps=steps, step_size=step_size,
                        random_init=True, seed=seed + sl.start)
        with model_mode(model, "eval"), torch.no_grad():
            robust.append((model(x_adv).argmax(1) == yb).cpu())
    return torch.cat(clean), torch.cat(robust)


def _accuracy(correct: Tensor) -> float:
    return int(correct.sum()) / len(correct)


def lesion_study(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str = "linf",
                 steps: int = 10, step_size: Optional[float] = None,
                 kinds: Optional[Sequence[str]] = None, seed: int = 0,
                 batch_size: int = 128) -> LesionStudy:
    """Clean and PGD accuracy with each single lesion (kind, block) of a trained model.

    PGD (``advvit.attacks.pgd``, random start) attacks the lesioned model itself. Cost: one clean
    pass and one PGD-``steps`` attack of all n inputs per lesion, plus the intact model.

    Args:
        model: maps [0, 1] pixels to logits.
        x: (n, C, H, W) inputs in [0, 1]; y: (n,) labels.
        eps, norm, steps, step_size: the PGD attack (eps 0: robust accuracy = clean accuracy).
        kinds: lesion kinds (default: every kind some block has, in the order of
            ``Block.lesion_kinds``, each block lesioned by its own ``lesion_kinds``: no
            ``"block"`` lesion that only repeats a one-branch block's branch); a block without a
            kind gets NaN. Kinds given explicitly apply to every block that has the part
            (``"block"``: every block).
        seed: seeds PGD's random start (per batch, the same for every lesion).
        batch_size: inputs per batch.
    """
    _check_inputs(x, y, batch_size)
    check_analysis_norm(norm)
    check_attack_args(eps, steps, norm, step_size)
    check_eps(eps, norm, input_shape=tuple(x.shape[1:]))
    all_blocks = model_blocks(model)
    chosen = kinds is not None
    if not chosen:
        kinds = list(dict.fromkeys(k for b in all_blocks for k in b.lesion_kinds))
    known = {k for b in all_blocks for k in b.part_names + ("block",)}
    unknown = [k for k in kinds if k not in known]
    if unknown:
        raise ValueError(f"lesion kinds {unknown} are not in this model; its kinds: {sorted(known)}")
    net = eager_model(model)
    settings = dict(eps=eps, norm=norm, steps=steps, step_size=step_size, seed=seed, batch_size=batch_size)
    base_clean, base_robust = _outcomes(net, x, y, **settings)
    # float64: an accuracy k / n equals the baseline's exactly when the counts are equal.
    clean = torch.full((len(kinds), len(all_blocks)), math.nan, dtype=torch.float64)
    robust = torch.full_like(clean, math.nan)
    clean_correct = torch.zeros(len(kinds), len(all_blocks), len(x), dtype=torch.bool)
    robust_correct = torch.zeros_like(clean_correct)
    for k, kind in enumerate(kinds):
        for b, block in enumerate(all_blocks):
            if kind not in (block.part_names + ("block",) if chosen else block.lesion_kinds):
                continue
            with lesion(net, block, kind) as lesioned:
                clean_correct[k, b], robust_correct[k, b] = _outcomes(lesioned, x, y, **settings)
            clean[k, b], robust[k, b] = (_accuracy(clean_correct[k, b]),
                                         _accuracy(robust_correct[k, b]))
    return LesionStudy(blocks=tuple(b.name for b in all_blocks), kinds=tuple(kinds), clean_accuracy=clean,
                       robust_accuracy=robust, baseline_clean=_accuracy(base_clean),
                       baseline_robust=_accuracy(base_robust), eps=float(eps), norm=norm,
                       steps=steps, n=len(x), clean_correct=clean_correct,
                       robust_correct=robust_correct, baseline_clean_correct=base_clean,
                       baseline_robust_correct=base_robust)
