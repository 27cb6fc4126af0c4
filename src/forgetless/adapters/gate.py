"""Sample-level weight yielding, SLIM's default: one yielding decision per sequence, from its prompt.

The paper (Sec. 3.3) computes the distance "for each input sample x in R^{N,C}". We read that as
one value per sequence, and measured why it matters (docs/results.md, "Routing"): on SmolLM2-135M
a token's own distance does not tell general prompts from in-domain ones (AUC 0.49), while the
mean over a prompt's content tokens does (AUC 0.999 averaged over layers). So, per sequence:

1. **Base pass over the prompt.** Before the adapted forward of a sequence's first chunk (a full
   forward, or the prefill of a KV cache), the model runs once more with every SLIM layer on its
   base path (``TokenContext.gate_pass``), without gradients, up to the prompt's last column.
   Each SLIM layer measures its input there: the calibrated distance ``d(x)`` of every *content*
   token to its sliding clusters (learned on these base-model inputs in training), pooled by the
   mean over the prompt's content tokens and z-scored against the running moments of the training
   sequences' pooled values (``RunningMoments``). The gate score of the sequence is the mean of
   these z-scores over the layers. It depends on the prompt only, never on the adapter's weights,
   so it does not drift while the experts learn, and every task seen in training stays in-domain.
   **Per-task statistics** (``gate_statistics: per_task``, the default): when a later stage
   continues the adapter (``open_gate_task``), every layer freezes the clusters and moments of
   the stage just trained and starts empty ones; a prompt's score is then the score against its
   *nearest* stage (the minimum over stages of the layer-mean z-score). Shared statistics
   (``shared``) mix every stage into one set, whose spread grows with each new task until general
   prompts no longer stand out: on SmolLM2-135M after two stages the mean general score fell from
   +8.6 to +1.5 in-domain standard deviations (no general prompt yielding at 3), while per-task
   statistics kept it at +8.6 (all yielding) and every learned task's prompts at 0% yield
   (docs/results.md, protocol C).
2. **Content tokens** are the prompt's real tokens minus the chat template's fixed parts: the
   leading tokens that match the template's prefix (system turn, user header) and the closing
   tokens that match its suffix (end of turn, assistant header), both derived from the tokenizer
   (``PromptFormatter.template_parts``), never a hand-set count.
3. **Yielding.** Every token of the sequence (prompt and answer) gets ``gamma * score`` on the
   identity experts' logits (Eq. 4 with one ``d`` per sample); a sequence whose score reaches
   ``yield_threshold`` yields fully: its tokens take the base path and cost no expert work.
   Yielding acts at inference. In training every sequence reaches the experts: training data is
   in-domain by definition, and the prompts of a new task in a sequence, far from the earlier
   tasks' statistics when its stage starts, must be learned rather than yielded.
4. **Learning the statistics.** The clusters and moments learn in train mode, from the base pass
   only, never from the adapted forward. Our training loop measures each training prompt once
   per stage (``fitted_gate``): before the first step it runs the base pass over the first
   epoch's micro-batches in their order, and the training forwards skip it (their scores are
   unused in training). A forward in train mode outside that (a loop of one's own) still learns
   from every batch it sees.

Exactness: the score is fixed by the prompt, so a full forward over prompt + answer (the caller
marks the prompt with ``prompt_boundary``), a prefill followed by cached decoding, left-padded
batches and packed scoring rows all see the same score (tested). Later chunks of a sequence (a
forward whose attention mask or cache is longer than its input) reuse the rows' stored scores;
code that reorders a KV cache's rows calls ``reorder_sequence_state``, as for prompt pooling.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

_EPS = 1e-6


class RunningMoments(nn.Module):
    """Running first and second moments of per-sequence values (buffers, saved with the adapter).

    An exact running average for the first ``1 / (1 - momentum)`` batches (the statistics of a new
    adapter move most early on), an exponential moving average after.
    """

    def __init__(self, momentum: float) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("sequence_mean", torch.zeros(()))
        self.register_buffer("sequence_square", torch.ones(()))
        self.register_buffer("batches", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, values: Tensor) -> None:
        """Fold one batch of per-sequence values (N,) into the moments."""
        if not values.numel():
            return
        n = int(self.batches)
        m = min(self.momentum, n / (n + 1))
        self.sequence_mean.mul_(m).add_((1 - m) * values.mean())
        self.sequence_square.mul_(m).add_((1 - m) * values.pow(2).mean())
        self.batches.add_(1)

    def standardise(self, values: Tensor) -> Tensor:
        """(N,) values -> (N,) z-scores against the moments."""
        sigma = (self.sequence_square - self.sequence_mean**2).clamp_min(_EPS).sqrt()
        return (values - self.sequence_mean) / sigma


class GateStatistics(nn.Module):
    """What the gate learned of one earlier training stage's prompts in one layer: its sliding
    clusters and the moments of the prompts' pooled distance to them (frozen)."""

    def __init__(self, clusters: nn.Module, moments: RunningMoments) -> None:
        super().__init__()
        self.clusters = clusters
        self.moments = moments


def pooled_distance(clusters: nn.Module, tokens: Tensor, content: Tensor, learn: bool) -> Tensor:
    """(B,) mean calibrated distance of each row's content tokens to ``clusters``.

    tokens: (C, d) the content tokens of all rows, row-major; content: (B, L) bool.
    """
    distance, _ = clusters(tokens, None, learn=learn)
    rows = content.nonzero()[:, 0]
    sums = distance.new_zeros(content.shape[0]).index_add_(0, rows, distance)
    return sums / content.sum(dim=1).clamp_min(1)


def nearest_task(layer_scores: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-layer (S, B) z-scores against S stages' statistics -> (B,) gate scores and (B,) the
    index of each row's nearest stage (0 = the first, S - 1 = the current one).

    The score is the mean over layers, then the nearest stage's (the minimum over S). A stage
    whose statistics are still empty scores +inf in every layer (``MixtureLinear._measure_prompt``),
    so it is never nearest unless all are; then the score is 0 (no evidence either way) and the
    stage the current one.
    """
    per_stage = torch.stack(layer_scores).mean(dim=0)
    scores, stages = per_stage.min(dim=0)
    empty = torch.isposinf(scores)
    scores = torch.where(empty, torch.zeros_like(scores), scores)
    stages = torch.where(empty, torch.full_like(stages, per_stage.shape[0] - 1), stages)
    return scores, stages


def nearest_task_score(layer_scores: list[Tensor]) -> Tensor:
    """The (B,) gate scores of ``nearest_task``."""
    return nearest_task(layer_scores)[0]


def open_gate_task(model: nn.Module) -> int:
    """Start a new training stage of a continued adapter: every sample-gated layer with
    ``gate_statistics: per_task`` freezes the gate statistics of the stage just trained and
    starts empty ones for the next. A no-op for other adapters, and while the current
    statistics are still empty. Returns the number of frozen stages per layer."""
    from forgetless.adapters.base import AdapterLayer

    layers = [m for m in model.modules() if isinstance(m, AdapterLayer) and hasattr(m, "open_gate_task")]
    layers = [m for m in layers if m.config.uses_sample_gate and m.config.gate_statistics == "per_task"]
    if not layers or not all(int(m.gate_moments.batches) > 0 for m in layers):
        return layers[0].config.gate_earlier_tasks if layers else 0
    config = layers[0].config.model_copy(
        update={"gate_earlier_tasks": layers[0].config.gate_earlier_tasks + 1}
    )
    for layer in layers:
        layer.open_gate_task(config)
    return config.gate_earlier_tasks


def _common_prefix(ids: list[int], template: Sequence[int]) -> int:
    length = 0
    while length < min(len(ids), len(template)) and ids[length] == template[length]:
        length += 1
    return length


def content_mask(
    input_ids: Tensor | None, prompt: Tensor, prefix_ids: Sequence[int], suffix_ids: Sequence[int]
) -> Tensor:
    """(B, L) bool: the prompt tokens outside the template's fixed prefix and suffix.

    A row's leading prompt tokens are dropped as far as they match ``prefix_ids``, its closing
    prompt tokens as far as they match ``suffix_ids`` (read backwards). A row left with no token
    keeps its whole prompt. Without token ids (embeddings fed directly) nothing is dropped.
    """
    mask = prompt.clone()
    if input_ids is None or not (prefix_ids or suffix_ids):
        return mask
    reversed_suffix = list(reversed(suffix_ids))
    for row in range(prompt.shape[0]):
        positions = prompt[row].nonzero().flatten()
        ids = input_ids[row, positions].tolist()
        head = _common_prefix(ids, prefix_ids)
        tail = _common_prefix(list(reversed(ids[head:])), reversed_suffix)
        if head + tail < len(ids):
            mask[row, positions[:head]] = False
            mask[row, positions[len(ids) - tail :]] = False
    return mask


def _past_length(kwargs: dict, length: int) -> int:
    """Tokens of the sequence before this forward's input (0 for a first chunk)."""
    past = 0
    mask = kwargs.get("attention_mask")
    if isinstance(mask, Tensor) and mask.dim() == 2:
        past = max(past, mask.shape[1] - length)
    for key in ("past_key_values", "cache"):
        cache = kwargs.get(key)
        if cache is not None and hasattr(cache, "get_seq_length"):
            past = max(past, int(cache.get_seq_length()))
    return past


def _decoder(model: nn.Module) -> nn.Module:
    """The transformer body without the LM head (the gate needs layer inputs, not logits)."""
    body = getattr(model, "base_model", None)
    return body if isinstance(body, nn.Module) and body is not model else model


class SequenceGate:
    """The per-sequence yielding scores of one model (held by its ``TokenContext``).

    Args:
        prefix_ids, suffix_ids: the chat template's fixed parts (``AdapterConfig.template_*_ids``).
    """

    def __init__(self, prefix_ids: Sequence[int], suffix_ids: Sequence[int]) -> None:
        self.prefix_ids = list(prefix_ids)
        self.suffix_ids = list(suffix_ids)
        self.scores: Tensor | None = None  # (B,) gate score of every running sequence
        self._all_yield: tuple[Tensor, int, float, torch.dtype, bool] | None = None
        self.stages: Tensor | None = None  # (B,) its nearest training stage (stage_experts)

    def reorder(self, index: Tensor) -> None:
        """Keep/repeat rows as a KV cache's ``reorder_cache(index)`` does."""
        if self.scores is not None:
            self.scores = self.scores.index_select(0, index.to(self.scores.device))
        if self.stages is not None:
            self.stages = self.stages.index_select(0, index.to(self.stages.device))

    def row_scores(self, batch: int) -> Tensor:
        """(B,) scores of the running sequences; a clear error when rows were not kept in step."""
        if self.scores is None:
            raise RuntimeError(
                "sample-level yielding: a forward continues a sequence whose prompt this model never "
                "saw; run the prompt through the same model first"
            )
        if self.scores.shape[0] != batch:
            raise RuntimeError(
                f"sample-level yielding: {self.scores.shape[0]} running sequences but a batch of {batch}; "
                "after cache.reorder_cache(index) call forgetless.adapters.reorder_sequence_state(model, index)"
            )
        return self.scores

    def all_yield(self, threshold: float, dtype: torch.dtype) -> bool:
        """Whether every running sequence yields fully (its score, in ``dtype``, reaches
        ``threshold``): decided once per set of sequences, so that each layer of each decoding
        step reads one cached answer instead of recomputing it."""
        scores = self.scores
        if scores is None:
            return False
        key = (scores, scores._version, threshold, dtype)
        cached = self._all_yield
        if cached is None or cached[0] is not scores or cached[1:] != key[1:]:
            self._all_yield = cached = (*key, not bool((scores.to(dtype) < threshold).any()))
        return cached[4]

    def row_stages(self, batch: int) -> Tensor:
        """(B,) nearest stage of the running sequences (checked like ``row_scores``)."""
        self.row_scores(batch)
        return self.stages

    def before_forward(self, model: nn.Module, context, args: tuple, kwargs: dict) -> None:  # noqa: ANN001
        """Score the sequences that start in this forward (called by the model's pre-hook)."""
        inputs = kwargs.get("input_ids", args[0] if args else None)
        if inputs is None:
            inputs = kwargs.get("inputs_embeds")
        if not isinstance(inputs, Tensor):
            return
        if context.gate_fitted and model.training:
            return  # the stage's prompts were measured before training, whose forwards ignore scores
        batch, length = inputs.shape[0], inputs.shape[1]
        if _past_length(kwargs, length) > 0:
            return  # a later chunk: the scores of its rows were set by its first chunk
        mask = kwargs.get("attention_mask")
        real = (
            mask.bool()
            if isinstance(mask, Tensor) and mask.dim() == 2 and mask.shape == (batch, length)
            else torch.ones(batch, length, dtype=torch.bool, device=inputs.device)
        )
        prompt = context.prompt_mask
        prompt = real & prompt.to(real.device) if prompt is not None and prompt.shape == real.shape else real
        ids = context.input_ids if context.input_ids is not None and context.input_ids.dim() == 2 else None
        content = content_mask(ids, prompt, self.prefix_ids, self.suffix_ids)
        self.scores, self.stages = self._base_pass(model, context, kwargs, inputs, content)

    def measure(
        self,
        model: nn.Module,
        context,  # noqa: ANN001
        input_ids: Tensor,
        attention_mask: Tensor,
        prompt: Tensor,
    ) -> None:
        """The base pass of ``before_forward`` for whole sequences given outside a forward:
        (B, L) token ids, their attention mask and prompt mask (``fitted_gate``)."""
        content = content_mask(input_ids, attention_mask.bool() & prompt, self.prefix_ids, self.suffix_ids)
        kwargs = {"attention_mask": attention_mask}
        self.scores, self.stages = self._base_pass(model, context, kwargs, input_ids, content)

    @torch.no_grad()
    def _base_pass(
        self,
        model: nn.Module,
        context,  # noqa: ANN001
        kwargs: dict,
        inputs: Tensor,
        content: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Run the prompt columns through the model with every SLIM layer on its base path:
        (B,) gate scores and (B,) nearest stages."""
        columns = content.any(dim=0).nonzero()
        cut = int(columns[-1]) + 1 if columns.numel() else 1
        call: dict = {"input_ids" if inputs.dtype == torch.long else "inputs_embeds": inputs[:, :cut]}
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor):
            call["attention_mask"] = mask[:, :cut] if mask.dim() == 2 else mask[..., :cut, :cut]
        if isinstance(kwargs.get("position_ids"), Tensor):
            call["position_ids"] = kwargs["position_ids"][..., :cut]
        context.gate_pass, context.content_mask, context.gate_scores = True, content[:, :cut], []
        try:
            _decoder(model)(**call, use_cache=False)
            scores = context.gate_scores
        finally:
            context.gate_pass, context.content_mask, context.gate_scores = False, None, []
        if not scores:
            batch = inputs.shape[0]
            return inputs.new_zeros(batch, dtype=torch.float32), inputs.new_zeros(batch, dtype=torch.long)
        return nearest_task(scores)


@contextmanager
def fitted_gate(
    model: nn.Module, batches: Iterable[dict[str, Tensor]], measure: bool = True
) -> Iterator[int]:
    """Measure a stage's training prompts once, then train without the per-forward base pass.

    With ``measure``, every micro-batch of ``batches`` (``input_ids``, ``attention_mask`` and
    ``labels`` as collated for training; the prompt is the part before a row's first label) runs
    the gate's base pass in train mode, so the clusters and moments of every sample-gated layer
    learn as the first epoch's training forwards would teach them (exactly, in one process at
    full precision, tested; under mixed precision the measurement runs in the weights' own
    precision, as inference does; under ``accelerate launch`` every process measures every row,
    so all hold the same statistics). Inside the block, training forwards of ``model`` skip the
    base pass. ``measure=False`` (a resumed stage, whose checkpoint holds the measured
    statistics) only skips. Yields the number of prompts measured; a no-op (0) for models
    without the gate. Nested blocks restore the outer block's state.
    """
    from forgetless.adapters.inject import gated_modules

    owners = [(module, context) for module, context in gated_modules(model) if context.gate is not None]
    measured = 0
    if owners and measure:
        states = {module: module.training for module in model.modules()}
        model.train()  # the statistics learn in train mode only
        try:
            for batch in batches:
                prompt = prompt_mask_from_labels(batch["labels"], batch["attention_mask"])
                for owner, context in owners:
                    context.gate.measure(owner, context, batch["input_ids"], batch["attention_mask"], prompt)
                measured += int(batch["input_ids"].shape[0])
        finally:
            for module, training in states.items():
                module.training = training
    before = [context.gate_fitted for _, context in owners]
    for _, context in owners:
        context.gate_fitted = True
    try:
        yield measured
    finally:
        for (_, context), fitted in zip(owners, before):
            context.gate_fitted = fitted


def _contexts(model: nn.Module) -> list:
    """The distinct ``TokenContext`` objects of ``model``'s adapter layers."""
    from forgetless.adapters.base import AdapterLayer

    found: dict[int, object] = {}
    for module in model.modules():
        if isinstance(module, AdapterLayer):
            found.setdefault(id(module.context), module.context)
    return list(found.values())


def uses_sample_gate(model: nn.Module) -> bool:
    """Whether ``model`` decides yielding once per sequence (its adapters use ``yield_pooling: sample``)."""
    return any(context.gate is not None for context in _contexts(model))


@contextmanager
def prompt_boundary(model: nn.Module, prompt_mask: Tensor) -> Iterator[None]:
    """Mark the prompt tokens of the forwards inside the block: ``prompt_mask`` (B, L) bool.

    Needed only when one forward holds a prompt *and* its answer (training, packed scoring): the
    sample-level gate then pools over the prompt only. A no-op for models without the gate.
    """
    contexts = _contexts(model)
    for context in contexts:
        context.prompt_mask = prompt_mask
    try:
        yield
    finally:
        for context in contexts:
            context.prompt_mask = None


def prompt_mask_from_labels(labels: Tensor, attention_mask: Tensor, ignore_index: int = -100) -> Tensor:
    """(B, L) bool: the real tokens before a row's first labelled token (its prompt)."""
    answered = (labels != ignore_index).long().cumsum(dim=1) > 0
    return attention_mask.bool() & ~answered
