"""Answer-only loss with the LM head computed only where a label is.

The cross-entropy of a causal LM needs logits only at positions whose *next* token is a label
(an answer token). The usual path projects every position onto the vocabulary, (B x T x V): on
SmolLM2's 49k vocabulary that is a large share of the step, mostly spent on prompt tokens whose
loss is thrown away. We hand transformers a boolean ``logits_to_keep`` mask (B x T), which makes the
model gather those hidden states *before* its LM head (and apply its final soft-capping, as Gemma
does), and get (N x V) logits for the N labelled positions only.

**Shared prompt prefix.** Chat-formatted examples all start with the same tokens (SmolLM2's
template puts a 24-token system prompt before every user turn: ~40 % of a short example). When
every row of a micro-batch starts with the same P tokens, we run those P tokens once (batch 1),
repeat their key/value cache over the batch, and run only the B suffixes on top of it. The
repeat is differentiable (its backward sums the rows' gradients), so loss and gradients equal
the unshared computation up to float rounding, for any layer that acts on each token on its own
(frozen or fine-tuned linear layers, LoRA, DoRA). Routed adapters (SLIM, MoE-LoRA) keep statistics
over the tokens of a forward and are never shared; neither are models with active dropout (one
mask for the prefix would be shared by every row).

The module returns the *sum* of the token losses and their count, so that the loop can normalise
by the number of answer tokens in the whole (accumulated, multi-process) batch: every answer token
weighs the same whatever micro-batch or process it lands on.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from forgetless.adapters.gate import prompt_boundary, prompt_mask_from_labels
from forgetless.compat import cache_argument, cache_kwargs, output_cache
from forgetless.data.formatting import IGNORE_INDEX


def label_positions(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Where logits are needed and what they must predict.

    Args:
        labels: (B, T) long, ``IGNORE_INDEX`` on prompt and padding.

    Returns:
        ``keep`` (B, T) bool: position t is kept when token t+1 is labelled (the last position never);
        ``targets`` (N,) long: the labels those positions predict, in row-major order.
    """
    next_labels = labels[:, 1:]
    wanted = next_labels != IGNORE_INDEX
    keep = F.pad(wanted, (0, 1), value=False)
    return keep, next_labels[wanted]


#: below this many shared tokens two forwards cost more than they save
MIN_SHARED_PREFIX = 4


def shared_prefix_length(input_ids: Tensor, attention_mask: Tensor, keep: Tensor) -> int:
    """Tokens at the start of every row that are identical, unpadded, and before every kept position.

    Args:
        input_ids, attention_mask, keep: (B, T); ``keep`` from ``label_positions``.

    Returns:
        P with ``0 <= P < T``: the first P tokens can be computed once for the whole batch (kept
        positions, whose logits are needed, all lie at P or later).
    """
    batch, length = input_ids.shape
    if batch < 2:
        return 0
    same = ((input_ids == input_ids[:1]).all(dim=0) & attention_mask.bool().all(dim=0)).long()
    prefix = int(same.cumprod(dim=0).sum())
    kept_columns = keep.any(dim=0).nonzero()
    first_kept = int(kept_columns[0]) if kept_columns.numel() else length - 1
    return min(prefix, first_kept, length - 1)


def can_share_prefix(model: nn.Module) -> bool:
    """Whether computing a shared prefix once is exact for ``model`` (see the module docstring)."""
    from forgetless.adapters import AdapterLayer

    if not supports_logits_mask(model):
        return False
    try:
        if cache_argument(model) is None:
            return False
    except (TypeError, ValueError):
        return False
    if float(getattr(getattr(model, "config", None), "attention_dropout", 0.0) or 0.0) > 0:
        return False
    for module in model.modules():
        if isinstance(module, AdapterLayer) and module.routed:
            return False  # routed adapters keep per-forward statistics (clusters, balance loss)
        if isinstance(module, nn.Dropout) and module.p > 0:
            return False
    return True


def prefix_shared_logits(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, keep: Tensor, prefix: int
) -> Tensor:
    """(N, V) logits at the ``keep`` positions, computing the first ``prefix`` tokens once.

    The prefix runs as one row with a KV cache; the cache is repeated to the batch (a differentiable
    ``repeat_interleave``) and the suffixes run on top with positions ``prefix..T-1``.
    """
    batch, length = input_ids.shape
    no_logits = torch.zeros(1, prefix, dtype=torch.bool, device=input_ids.device)  # the prefix needs none
    cache = output_cache(model(input_ids=input_ids[:1, :prefix], logits_to_keep=no_logits, use_cache=True))
    cache.batch_repeat_interleave(batch)
    positions = torch.arange(prefix, length, device=input_ids.device).unsqueeze(0).expand(batch, -1)
    return model(
        input_ids=input_ids[:, prefix:],
        attention_mask=attention_mask,
        position_ids=positions,
        logits_to_keep=keep[:, prefix:],
        **cache_kwargs(model, cache),
        use_cache=True,
    ).logits


def supports_logits_mask(model: nn.Module) -> bool:
    """True when ``model.forward`` takes ``logits_to_keep`` (transformers >= 5 gathers before the head)."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def labelled_logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, keep: Tensor) -> Tensor:
    """(N, V) logits at the ``keep`` positions (N = keep.sum()).

    Models without ``logits_to_keep`` fall back to full logits and a gather: same numbers, slower.
    """
    if supports_logits_mask(model):
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, use_cache=False
        ).logits
        if logits.dim() == 2:
            return logits
        # a model that ignores the mask's form returns (B, T, V): gather ourselves
        return logits[keep]
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return logits[keep]


class AnswerOnlyLoss(nn.Module):
    """Wraps a causal LM so that one ``forward`` returns ``(loss_sum, token_count)``.

    A module (not a function) so that DDP, which synchronises gradients through the forward of the
    module it wraps, sees the whole computation.

    Args:
        model: the causal LM.
        share_prefix: compute a prompt prefix shared by all rows once, where that is exact for
            this model (``can_share_prefix``).
        with_logits: ``forward`` also returns the (N, V) logits at the labelled positions and the
            (B, T) bool positions (a strategy's distillation term reads them: no second forward).
    """

    def __init__(self, model: nn.Module, share_prefix: bool = True, with_logits: bool = False) -> None:
        super().__init__()
        self.model = model
        self.share_prefix = share_prefix and can_share_prefix(model)
        self.with_logits = with_logits
        self.last_prefix = 0  # shared tokens of the last forward (for FLOP accounting)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> tuple[Tensor, ...]:
        """input_ids, attention_mask, labels: (B, T). Returns the summed cross-entropy () and N ()
        (then the logits and their positions with ``with_logits``)."""
        keep, targets = label_positions(labels)
        prefix = shared_prefix_length(input_ids, attention_mask, keep) if self.share_prefix else 0
        self.last_prefix = prefix if prefix >= MIN_SHARED_PREFIX else 0
        if self.last_prefix:
            logits = prefix_shared_logits(self.model, input_ids, attention_mask, keep, prefix)
        else:
            # a sample-level SLIM gate decides from the prompt only: tell it where prompts end
            with prompt_boundary(self.model, prompt_mask_from_labels(labels, attention_mask)):
                logits = labelled_logits(self.model, input_ids, attention_mask, keep)
        loss_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
        count = torch.tensor(targets.numel(), device=loss_sum.device)
        return (loss_sum, count, logits, keep) if self.with_logits else (loss_sum, count)


def answer_loss(model: nn.Module, batch: dict[str, Tensor], share_prefix: bool = True) -> Tensor:
    """Mean cross-entropy over the answer tokens of ``batch`` (``collate`` output): a scalar."""
    loss = AnswerOnlyLoss(model, share_prefix)
    loss_sum, count = loss(batch["input_ids"], batch["attention_mask"], batch["labels"])
    return loss_sum / count.clamp(min=1)
