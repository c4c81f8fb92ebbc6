"""The `hf` rollout engine: the transformers model's forward, in `decoding.decode`'s loop, on an unsharded
inference copy of the policy (the tokens `generate` would pick, with less work: decoding.py).

Generating on the FSDP2-sharded training model would all-gather every layer for every new token
(and need `synced_gpus=True` so that ranks stay in lock-step). Instead the worker gathers the full
weights once per step into this engine's own copy, every rank generates its share independently,
and `release` frees the copy before the training passes. `benchmarks/rollout_engines.py` measures
both ways.
"""

from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn
from transformers import LogitsProcessor, SuppressTokensLogitsProcessor

from mtrl.models.multimodal import batch_multimodal_inputs, mm_token_type_ids
from mtrl.protocol import DataBatch
from mtrl.workers.rollout.base import RolloutEngine, SamplingParams, response_mask_from_ids, response_seeds
from mtrl.workers.rollout.decoding import decode


class SeededSampling(LogitsProcessor):
    """Sampling with one random stream per response, for `generate` in greedy mode.

    Temperature, top-k and top-p shape the scores as transformers' warpers do; then Gumbel noise from
    the row's own generator is added, so the argmax is an exact sample from the shaped distribution
    (the Gumbel-max trick). A row's t-th token depends only on its logits and its seed, not on the
    other rows of the micro-batch, which makes sampling independent of how rows are split.
    """

    # On CPU a row draws up to this many uniforms (whole steps) per call, instead of one call per row and step:
    # a CPU generator's stream is the same drawn in one piece or step by step. A CUDA generator's numbers
    # depend on how they are drawn, so there each call draws one step.
    DRAW_ELEMENTS = 1 << 16

    def __init__(self, seeds: List[int], params: SamplingParams, device: torch.device):
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.params = params
        self._drawn: Optional[torch.Tensor] = None  # (steps, rows, V) uniforms not used yet
        self._used = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = self.shape(scores)
        return scores - torch.log(-torch.log(self._uniform(scores.shape[-1], scores.device)))

    def _uniform(self, vocab: int, device: torch.device) -> torch.Tensor:
        """(rows, vocab): each row's next `vocab` uniforms from its own generator."""
        if self._drawn is None or self._used == len(self._drawn):
            steps = 1 if device.type != "cpu" else max(1, min(self.params.max_new_tokens, self.DRAW_ELEMENTS // vocab))
            self._drawn = torch.stack([torch.rand(steps, vocab, generator=g, device=device)
                                       for g in self.generators], dim=1)
            self._used = 0
        self._used += 1
        return self._drawn[self._used - 1]

    def shape(self, scores: torch.Tensor) -> torch.Tensor:
        """The scores of the distribution sampled from: temperature, then top-k, then top-p."""
        p = self.params
        scores = scores.float() / p.temperature
        if 0 < p.top_k < scores.shape[-1]:
            kth = torch.topk(scores, p.top_k, dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, dim=-1)  # ascending, as TopPLogitsWarper
            cumulative = sorted_scores.softmax(-1).cumsum(-1)
            drop = cumulative <= 1 - p.top_p
            drop[..., -1] = False  # the most likely token always stays
            scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        return scores


class SampledTokenLogProbs(LogitsProcessor):
    """The log-prob of each sampled token under the distribution it was drawn from, without keeping B x V x T
    scores.

    Placed after the vision-token suppression, it keeps the log-softmax of the step's scores as sampling shapes
    them (`shape`: temperature, top-k, top-p; none when greedy) for one step (B x V), and at the next step gathers
    the entry of the token chosen (the last input id). `finish` gathers the last generated token once `generate`
    has returned. The scores pass through unchanged, so the sampled tokens are those of the same call without it.
    """

    def __init__(self, shape: Callable[[torch.Tensor], torch.Tensor]):
        self.shape = shape
        self._previous: Optional[torch.Tensor] = None
        self._log_probs: List[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._gather(input_ids[:, -1])
        self._previous = torch.log_softmax(self.shape(scores).float(), dim=-1)
        return scores

    def _gather(self, tokens: torch.Tensor) -> None:
        if self._previous is not None:
            self._log_probs.append(self._previous.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))

    def finish(self, generated: torch.Tensor) -> torch.Tensor:
        """(B, G) log-probs of `generated` (B, G), the tokens the calls chose, one per call."""
        self._gather(generated[:, -1])
        self._previous = None
        if len(self._log_probs) != generated.shape[1]:
            raise RuntimeError(f"{len(self._log_probs)} log-probs recorded for {generated.shape[1]} generated tokens")
        return torch.stack(self._log_probs, dim=1)


class PolicyTokenStats(SampledTokenLogProbs):
    """The policy's own log-prob of each sampled token and the entropy of each step's distribution, both of
    softmax(logits / T): what the actor's forward gives for the same tokens (pi_old and its entropy), not the
    behaviour policy of `SampledTokenLogProbs` (placed first, it sees the logits before the vision-token
    suppression; top-k / top-p are not applied). Keeps one step's B x V log-probs and a (B,) entropy per step.
    """

    def __init__(self, temperature: float):
        super().__init__(lambda scores: scores / temperature)
        self._entropies: List[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = super().__call__(input_ids, scores)
        self._entropies.append(-(self._previous.exp() * self._previous).sum(-1))
        return scores

    def finish(self, generated: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, G) log-probs of `generated` and (B, G) entropies."""
        return super().finish(generated), torch.stack(self._entropies, dim=1)


class HFRolloutEngine(RolloutEngine):
    def __init__(self, build_model: Any, model_config: Any, eos_token_ids: List[int], pad_token_id: int,
                 device: torch.device, micro_batch_size: int = 16, policy_stats: bool = False):
        """`build_model()` returns an nn.Module with the policy's architecture (weights are overwritten);
        `micro_batch_size`: rows (prompts x n) per forward call; `policy_stats`: also return the policy's
        `old_log_probs` and `entropys` of the responses (`PolicyTokenStats`)."""
        self._build_model = build_model
        self.model_config = model_config
        self.eos_token_ids = list(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.device = device
        self.micro_batch_size = micro_batch_size
        self.policy_stats = policy_stats
        self.model: Optional[nn.Module] = None
        self._kept_buffers: Optional[dict] = None
        # A response must not contain vision placeholders: they would ask the model for images that
        # do not exist when the sequence is scored again.
        self.suppress_tokens = [i for i in (getattr(model_config, k, None) for k in
                                            ("image_token_id", "video_token_id", "vision_start_token_id",
                                             "vision_end_token_id")) if i is not None]

    def load_weights(self, weights: Iterable[Tuple[str, torch.Tensor]]) -> None:
        """Copy each (name, tensor) into its parameter as it arrives: no second copy of the model is held.

        The module is built once; its parameters may start on the meta device (`build_model` need read no
        weights) and live there between syncs (`release`). Every pair is consumed even when one is wrong:
        the stream is a collective of all ranks.
        """
        if self.model is None:
            self.model = self._build_model().eval()
            self.model.requires_grad_(False)
            self._keep_buffers()
        if self._kept_buffers is not None:
            self.model.to_empty(device=self.device)
            self._restore_buffers()
            if hasattr(self.model, "tie_weights"):  # to_empty gives tied parameters separate storage
                self.model.tie_weights()
        targets = dict(self.model.named_parameters(remove_duplicate=False))
        targets.update(self.model.named_buffers())
        loaded, unexpected = set(), []
        with torch.no_grad():
            for name, tensor in weights:
                target = targets.get(name)
                if target is None:
                    unexpected.append(name)
                    continue
                target.copy_(tensor)
                loaded.add(name)
        # Tied embeddings may come under one name only; anything else is a naming bug.
        missing = [n for n, p in self.model.named_parameters() if n not in loaded and "lm_head" not in n]
        if missing or unexpected:
            raise RuntimeError(f"rollout weight sync: missing {missing[:5]}, unexpected {unexpected[:5]}")

    def release(self) -> None:
        """Drop the weights (the module moves to the meta device) but keep the module for the next sync.

        Buffers that are not in the state dict (rotary frequencies) are computed at construction
        only, so they are kept aside, small as they are.
        """
        if self.model is None or self._kept_buffers is not None:
            return
        self._keep_buffers()
        self.model.to("meta")

    def _keep_buffers(self) -> None:
        self._kept_buffers = {name: buf.detach().to("cpu", copy=True) for name, buf in self.model.named_buffers()}

    def _restore_buffers(self) -> None:
        for name, value in self._kept_buffers.items():
            owner, _, attr = name.rpartition(".")
            module = self.model.get_submodule(owner) if owner else self.model
            module._buffers[attr] = value.to(self.device)
        self._kept_buffers = None

    @torch.no_grad()
    def generate(self, prompts: DataBatch, params: SamplingParams) -> DataBatch:
        if self.model is None or self._kept_buffers is not None:
            raise RuntimeError("HFRolloutEngine.generate called before load_weights")
        seeds = response_seeds(params.seed, prompts.non_tensors["uid"], params.n)
        # Micro-batches of `micro_batch_size` response rows; each prefills the prompts its rows answer once.
        owners = torch.arange(len(prompts)).repeat_interleave(params.n)
        size = self.micro_batch_size
        pieces = []
        for start in range(0, len(owners), size):
            prompt_rows, copies = torch.unique_consecutive(owners[start:start + size], return_counts=True)
            pieces.append(self._generate_micro_batch(prompts.index(prompt_rows), copies, params,
                                                     seeds[start:start + size]))
        # Always max_new_tokens wide: ranks whose responses all stop early must still return the same width
        # as the others (their results are concatenated), as verl pads to response_length.
        width = max(max(ids.shape[1] for ids, _ in pieces), params.max_new_tokens)
        responses = torch.cat([nn.functional.pad(ids, (0, width - ids.shape[1]), value=self.pad_token_id)
                               for ids, _ in pieces])
        response_mask = response_mask_from_ids(responses, self.eos_token_ids, self.pad_token_id)
        per_token = {k: torch.cat([nn.functional.pad(p[k], (0, width - p[k].shape[1])) for _, p in pieces])
                     * response_mask for k in pieces[0][1]}
        batch = prompts.repeat(params.n) if params.n > 1 else prompts
        batch.tensors.update(prompts=batch.tensors["input_ids"], responses=responses, response_mask=response_mask,
                             **per_token)
        return batch

    def _generate_micro_batch(self, mb: DataBatch, copies: torch.Tensor, params: SamplingParams,
                              seeds: List[int]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """(response ids, {"rollout_log_probs": their log-probs[, "old_log_probs", "entropys"]}), all
        (sum(copies), G) with G the generated length: `copies[i]` responses to prompt row i of `mb`."""
        input_ids = mb.tensors["input_ids"].to(self.device)
        vision = batch_multimodal_inputs(mb.non_tensors.get("multi_modal_inputs"), self.device)
        if vision:
            vision["mm_token_type_ids"] = mm_token_type_ids(input_ids, self.model_config)
        # [The policy's own statistics, on the raw logits,] the vision-token suppression, the log-prob recorder,
        # then sampling: greedy decoding of the seeded, shaped scores is sampling (SeededSampling); plain greedy
        # otherwise.
        suppress = ([SuppressTokensLogitsProcessor(self.suppress_tokens, device=self.device)]
                    if self.suppress_tokens else [])
        sampling = [] if params.greedy else [SeededSampling(seeds, params, self.device)]
        recorder = SampledTokenLogProbs(sampling[0].shape if sampling else (lambda scores: scores))
        policy = [PolicyTokenStats(params.temperature or 1.0)] if self.policy_stats else []
        generated = decode(self.model, input_ids, mb.tensors["attention_mask"].to(self.device),
                           mb.tensors["position_ids"].to(self.device), vision, copies,
                           [*policy, *suppress, recorder, *sampling], self.eos_token_ids,
                           self.pad_token_id, params.max_new_tokens)
        per_token = {"rollout_log_probs": recorder.finish(generated)}
        if policy:
            per_token["old_log_probs"], per_token["entropys"] = policy[0].finish(generated)
        return generated.cpu(), {k: v.cpu() for k, v in per_token.items()}
