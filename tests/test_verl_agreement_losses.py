"""Agreement of the registered policy losses with verl 0.9.1's (`core_algos.get_policy_loss_fn`) on random
tensors, to 1e-6: loss, gradient and metrics, in every aggregation mode each supports there, with and
without verl's global batch info (MTRL's normalisers; verl's `dp_size` factor is the caller's here).

| MTRL | verl `loss_mode` | modes compared |
|---|---|---|
| `gspo_token` | `gspo` | all four |
| `gspo` | `gspo` | all four, one advantage per sequence (where the two forms coincide) |
| `cispo`, `clip_cov`, `kl_cov` | same name | all four |
| `sapo` | `sapo` | `seq-mean-token-mean` (verl ignores `loss_agg_mode` for SAPO) |
| `gmpo` | `geo_mean` | `seq-mean-token-mean` (verl: the plain mean over the rows, so no empty row, no global counts) |

verl's `kl_cov` logs the mean `|log r|` as `ppo_kl`, MTRL the k1 estimate as for every loss: that metric
is compared against `|log r|` computed here. Clip-Cov draws its tokens with `torch.randperm` on the
default generator, as verl does: both are called after the same `torch.manual_seed`.
"""

import pytest
import torch

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
verl_workers_config = pytest.importorskip("verl.workers.config")

from test_verl_agreement import B, L, close, randn, random_mask  # noqa: E402  (after the skip)

from mtrl.optimization import policy_optimization as po  # noqa: E402
from mtrl.optimization.config import OptimizationConfig  # noqa: E402

LOW, HIGH, DUAL = 0.2, 0.28, 3.0
TOKENS, SEQS, DP = 150, 20, 2


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(4321)


def verl_config(global_batch_info=None, policy_loss=None, **actor):
    """verl's actor config with MTRL's clip ratios; ``policy_loss``: its PolicyLossConfig keys."""
    return verl_workers_config.FSDPActorConfig(
        strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=LOW, clip_ratio_low=LOW,
        clip_ratio_high=HIGH, clip_ratio_c=DUAL, global_batch_info=global_batch_info or {},
        policy_loss=verl_workers_config.PolicyLossConfig(**(policy_loss or {})), **actor)


def inputs(rng, empty_row=True, sequence_advantages=False, scale=0.3):
    old = randn(rng, B, L) - 2
    new = old + randn(rng, B, L, scale=scale)
    advantages = randn(rng, B, 1).expand(B, L).clone() if sequence_advantages else randn(rng, B, L)
    return old, new, advantages, random_mask(rng, empty_row=empty_row)


def compare(name, verl_name, data, mode, settings=OptimizationConfig(), verl_settings=None, global_info=False,
            metrics=("pg_clipfrac", "ppo_kl", "pg_clipfrac_lower"), seed=0):
    """Run both with the same inputs (and generator state); assert loss, gradient and ``metrics`` agree.
    ``verl_settings``: verl's ActorConfig keys for ``settings`` (``policy_loss``: its PolicyLossConfig keys)."""
    old, new, advantages, mask = data
    ours_in, theirs_in = new.clone().requires_grad_(True), new.clone().requires_grad_(True)
    normalisers = dict(global_token_count=TOKENS, global_seq_count=SEQS) if global_info else {}
    batch_info = dict(dp_size=DP, batch_num_tokens=TOKENS, global_batch_size=SEQS) if global_info else None
    torch.manual_seed(seed)
    loss, ours = po.get_policy_loss(name)(old, ours_in, advantages, mask, LOW, HIGH, DUAL, mode,
                                          settings=settings, **normalisers)
    torch.manual_seed(seed)
    verl_loss, theirs = core_algos.get_policy_loss_fn(verl_name)(
        old, theirs_in, advantages, mask, mode, verl_config(batch_info, **(verl_settings or {})))
    factor = DP if global_info else 1
    close(factor * loss, verl_loss)
    ours_grad, = torch.autograd.grad(factor * loss, ours_in)
    theirs_grad, = torch.autograd.grad(verl_loss, theirs_in)
    close(ours_grad * mask, theirs_grad * mask)
    for metric in metrics:
        close(ours[metric], theirs[f"actor/{metric}"])
    return ours, theirs


@pytest.mark.parametrize("global_info", [False, True])
@pytest.mark.parametrize("mode", po.LOSS_AGG_MODES)
def test_gspo_token(rng, mode, global_info):
    ours, _ = compare("gspo_token", "gspo", inputs(rng, scale=1.0), mode, global_info=global_info)
    assert 0 < float(ours["pg_clipfrac"]) < 1  # some sequences clipped, some not


@pytest.mark.parametrize("global_info", [False, True])
@pytest.mark.parametrize("mode", po.LOSS_AGG_MODES)
def test_gspo_with_sequence_advantages(rng, mode, global_info):
    ours, _ = compare("gspo", "gspo", inputs(rng, sequence_advantages=True, scale=1.0), mode, global_info=global_info)
    assert 0 < float(ours["pg_clipfrac"]) < 1


@pytest.mark.parametrize("global_info", [False, True])
@pytest.mark.parametrize("mode", po.LOSS_AGG_MODES)
def test_cispo(rng, mode, global_info):
    ours, _ = compare("cispo", "cispo", inputs(rng), mode, global_info=global_info)
    assert 0 < float(ours["pg_clipfrac"]) < 1


@pytest.mark.parametrize("global_info", [False, True])
@pytest.mark.parametrize("settings, verl_settings", [
    (OptimizationConfig(), {}),
    (OptimizationConfig(sapo_tau_positive=2.0, sapo_tau_negative=3.0), {"tau_pos": 2.0, "tau_neg": 3.0}),
])
def test_sapo(rng, settings, verl_settings, global_info):
    # verl aggregates SAPO as seq-mean-token-mean whatever loss_agg_mode it is given
    compare("sapo", "sapo", inputs(rng, scale=1.0), "seq-mean-token-mean", settings, verl_settings, global_info)


def test_gmpo(rng):
    for _ in range(3):
        ours, _ = compare("gmpo", "geo_mean", inputs(rng, empty_row=False, scale=0.5), "seq-mean-token-mean")
        assert 0 < float(ours["pg_clipfrac"]) and 0 < float(ours["pg_clipfrac_lower"])


CLIP_COV_SETTINGS = [  # (MTRL settings, verl's policy_loss keys): verl's defaults, and many candidates
    (OptimizationConfig(), {}),
    (OptimizationConfig(clip_cov_ratio=0.2, clip_cov_lb=0.0, clip_cov_ub=2.0),
     {"policy_loss": {"clip_cov_ratio": 0.2, "clip_cov_lb": 0.0, "clip_cov_ub": 2.0}}),
]


@pytest.mark.parametrize("settings, verl_settings", CLIP_COV_SETTINGS)
@pytest.mark.parametrize("global_info", [False, True])
@pytest.mark.parametrize("mode", po.LOSS_AGG_MODES)
def test_clip_cov(rng, mode, global_info, settings, verl_settings):
    data = inputs(rng, scale=1.0)
    old, new, advantages, mask = data
    data = (old, new, 3 * advantages, mask)  # covariances well beyond clip_cov_lb = 1 for verl's defaults
    for seed in range(3):
        ours, _ = compare("clip_cov", "clip_cov", data, mode, settings, verl_settings, global_info,
                          metrics=("pg_clipfrac", "ppo_kl"), seed=seed)
        assert 0 < float(ours["pg_clipfrac"])  # some tokens were detached


@pytest.mark.parametrize("settings, verl_settings", [
    (OptimizationConfig(), {}),
    (OptimizationConfig(kl_cov_ratio=0.1, kl_cov_coef=1.0), {"policy_loss": {"kl_cov_ratio": 0.1, "ppo_kl_coef": 1.0}}),
])
@pytest.mark.parametrize("global_info", [False, True])
@pytest.mark.parametrize("mode", po.LOSS_AGG_MODES)
def test_kl_cov(rng, mode, global_info, settings, verl_settings):
    data = inputs(rng, scale=1.0)
    ours, theirs = compare("kl_cov", "kl_cov", data, mode, settings, verl_settings, global_info, metrics=())
    old, new, _, mask = data
    close(theirs["actor/ppo_kl"], po.masked_mean((new - old).abs(), mask))
    assert float(ours["pg_clipfrac"]) > 0
