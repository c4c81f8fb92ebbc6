"""Reward functions: loading, both call forms, error messages, Ray vs local scoring, metrics, token placement,
and the shipped reward_fns/."""

import os
import textwrap

import pytest
import torch

from mtrl.protocol import DataBatch
from mtrl.config.worker import RewardConfig
from mtrl.workers.reward import (
    RewardError,
    RewardManager,
    batch_to_samples,
    load_reward_function,
    reward_metrics,
    token_level_scores,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LENGTH_REWARD = """
def reward_function(data_dict, bonus=0.0):
    r = data_dict["response"]
    return len(r) + bonus, {"length": len(r), "correct": float(r == data_dict["ground_truth"])}

def other(data_dict):
    return -1.0, {}
"""


def write(folder, name, source):
    path = folder / name
    path.write_text(textwrap.dedent(source))
    return str(path)


def sample(prompt="What is 2+2?", response="4", ground_truth="4"):
    return {"prompt": prompt, "response": response, "ground_truth": ground_truth, "images": []}


def make_batch(responses, ground_truths=None, with_optional=True):
    n = len(responses)
    non_tensors = {"raw_prompt": [f"prompt number {i}" for i in range(n)], "response_text": list(responses)}
    if with_optional:
        non_tensors["ground_truth"] = list(ground_truths or ["aa"] * n)
        non_tensors["images"] = [[] for _ in range(n)]
    return DataBatch(tensors={"responses": torch.zeros(n, 3, dtype=torch.long)}, non_tensors=non_tensors)


# ----------------------------------------------------------------------------- loading


def test_load_by_file_uses_reward_function_and_file_colon_function_picks_another(tmp_path):
    write(tmp_path, "r.py", LENGTH_REWARD)
    fn = load_reward_function("r.py", str(tmp_path))
    assert fn.name == "reward_function" and not fn.batched
    assert fn([sample(response="abc", ground_truth="abc")]) == ([3.0], {"length": [3.0], "correct": [1.0]})
    other = load_reward_function("r.py:other", str(tmp_path))
    assert other.name == "other" and other([sample()]) == ([-1.0], {})


def test_relative_path_resolves_in_config_dir_before_cwd(tmp_path, monkeypatch):
    config_dir, cwd = tmp_path / "configs", tmp_path / "work"
    config_dir.mkdir(), cwd.mkdir()
    write(config_dir, "r.py", "def reward_function(d):\n    return 1.0, {}\n")
    write(cwd, "r.py", "def reward_function(d):\n    return 2.0, {}\n")
    write(cwd, "only_cwd.py", "def reward_function(d):\n    return 3.0, {}\n")
    monkeypatch.chdir(cwd)
    assert load_reward_function("r.py", str(config_dir))([sample()])[0] == [1.0]
    assert load_reward_function("r.py", None)([sample()])[0] == [2.0]
    assert load_reward_function("only_cwd.py", str(config_dir))([sample()])[0] == [3.0]
    assert load_reward_function(str(config_dir / "r.py"), None)([sample()])[0] == [1.0]  # absolute
    with pytest.raises(RewardError, match=r"'nope.py' not found.*configs.*work"):
        load_reward_function("nope.py:reward_function", str(config_dir))


def test_kwargs_are_passed_and_checked_at_load(tmp_path):
    write(tmp_path, "r.py", LENGTH_REWARD)
    fn = load_reward_function("r.py", str(tmp_path), {"bonus": 0.5})
    assert fn([sample(response="ab")])[0] == [2.5]
    with pytest.raises(RewardError, match=r"reward_function.*reward_fn_kwargs=\{'bonsu': 1\}"):
        load_reward_function("r.py", str(tmp_path), {"bonsu": 1})


def test_syntax_error_names_file_line_and_code(tmp_path):
    write(tmp_path, "broken.py", "def reward_function(d):\n    return 1.0, {\n\ndef x(:\n    pass\n")
    with pytest.raises(RewardError) as e:
        load_reward_function("broken.py", str(tmp_path))
    msg = str(e.value)
    assert "broken.py" in msg and "syntax error" in msg and "line" in msg


def test_import_error_in_reward_file_is_named(tmp_path):
    write(tmp_path, "imp.py", "import not_a_real_module_xyz\n\ndef reward_function(d):\n    return 0.0, {}\n")
    with pytest.raises(RewardError, match=r"imp.py failed while being imported: ModuleNotFoundError.*line 1"):
        load_reward_function("imp.py", str(tmp_path))


def test_missing_function_lists_the_files_functions(tmp_path):
    write(tmp_path, "r.py", LENGTH_REWARD)
    with pytest.raises(RewardError, match=r"r.py has no function `score`; functions it defines: other, "
                                          r"reward_function"):
        load_reward_function("r.py:score", str(tmp_path))
    write(tmp_path, "none.py", "def helper(d):\n    return 0\n")
    with pytest.raises(RewardError, match=r"no function `reward_function` or `batch_reward_function`.*helper"):
        load_reward_function("none.py", str(tmp_path))


# ----------------------------------------------------------------------------- batch form


@pytest.mark.parametrize("source", [
    # attribute, rows
    """
    def reward_function(items, bonus=0.0):
        return [(len(d["response"]) + bonus, {"length": len(d["response"])}) for d in items]
    reward_function.batched = True
    """,
    # default name fallback, columnar
    """
    def batch_reward_function(items, bonus=0.0):
        return [len(d["response"]) + bonus for d in items], {"length": [len(d["response"]) for d in items]}
    """,
])
def test_batch_form_matches_per_sample_form(tmp_path, source):
    write(tmp_path, "per_sample.py", """
    def reward_function(d, bonus=0.0):
        return len(d["response"]) + bonus, {"length": len(d["response"])}
    """)
    write(tmp_path, "batched.py", source)
    samples = [sample(response="x" * i) for i in range(5)]
    batched = load_reward_function("batched.py", str(tmp_path), {"bonus": 1.0})
    assert batched.batched
    assert batched(samples) == load_reward_function("per_sample.py", str(tmp_path), {"bonus": 1.0})(samples)


def test_batch_form_wrong_length_and_bad_value_are_named(tmp_path):
    write(tmp_path, "b.py", """
    def reward_function(items):
        if len(items) == 3:
            return [1.0, 2.0]
        return [float("inf") if d["response"] == "bad" else 0.0 for d in items]
    reward_function.batched = True
    """)
    fn = load_reward_function("b.py", str(tmp_path))
    with pytest.raises(RewardError, match=r"b.py:reward_function \(batch form\) returned 2 results for 3 samples"):
        fn([sample()] * 3)
    with pytest.raises(RewardError, match=r"non-finite reward inf for sample 11 \(prompt: .*response: 'bad'\)"):
        fn([sample(), sample(response="bad")], offset=10)


# ----------------------------------------------------------------------------- errors while scoring


def test_raising_reward_names_file_function_sample_and_line(tmp_path):
    write(tmp_path, "r.py", """
    def reward_function(d):
        if "boom" in d["response"]:
            raise KeyError("missing thing")
        return 0.0, {}
    """)
    fn = load_reward_function("r.py", str(tmp_path))
    long_response = "start of the response " + "x" * 200 + " boom at the end"
    with pytest.raises(RewardError) as e:
        fn([sample(), sample(), sample(prompt="Count the apples", response=long_response)], offset=4)
    msg = str(e.value)
    assert f"{tmp_path}/r.py:reward_function raised KeyError" in msg
    assert "line 4: `raise KeyError(\"missing thing\")`" in msg
    assert "sample 6 (prompt: 'Count the apples'" in msg
    assert "start of the resp" in msg and "boom at the end" in msg and "x" * 100 not in msg  # excerpt, not all


@pytest.mark.parametrize("value", ["float('nan')", "float('inf')"])
def test_non_finite_reward_names_sample(tmp_path, value):
    write(tmp_path, "r.py", f"def reward_function(d):\n    return ({value} if d['response'] == 'b' else 1.0), {{}}\n")
    fn = load_reward_function("r.py", str(tmp_path))
    with pytest.raises(RewardError, match=r"r.py:reward_function returned a non-finite reward .* sample 1 \(prompt"):
        fn([sample(response="a"), sample(response="b")])


@pytest.mark.parametrize("returned, pattern", [
    ("'good'", r"must return \(reward: float, metrics: dict\); got str 'good'"),
    ("(1.0, 2.0, {})", r"must return \(reward: float, metrics: dict\); got tuple"),
    ("('1', {})", r"reward of type str"),
    ("(1.0, {'acc': 'yes'})", r"metric 'acc' = 'yes'"),
    ("(1.0, {'overall': 1.0})", r"metric name 'overall'"),
])
def test_wrong_return_shape_is_explained(tmp_path, returned, pattern):
    write(tmp_path, "r.py", f"def reward_function(d):\n    return {returned}\n")
    with pytest.raises(RewardError, match=pattern + r".*sample 0"):
        load_reward_function("r.py", str(tmp_path))([sample()])


def test_bare_number_and_numpy_values_are_accepted(tmp_path):
    write(tmp_path, "r.py", """
    import numpy as np
    def reward_function(d):
        return np.float32(0.5), {'a': np.int64(2)}
    """)
    write(tmp_path, "bare.py", "def reward_function(d):\n    return 1\n")
    assert load_reward_function("r.py", str(tmp_path))([sample()]) == ([0.5], {"a": [2.0]})
    assert load_reward_function("bare.py", str(tmp_path))([sample()]) == ([1.0], {})


def test_metric_names_must_agree_across_samples(tmp_path):
    write(tmp_path, "r.py", "def reward_function(d):\n    return 0.0, ({'a': 1} if d['response'] == 'x' else {})\n")
    with pytest.raises(RewardError, match=r"same metric names for every sample.*sample 1"):
        load_reward_function("r.py", str(tmp_path))([sample(response="x"), sample(response="y")])


# ----------------------------------------------------------------------------- manager (local path)


def test_manager_local_path_scores_a_batch(tmp_path):
    write(tmp_path, "r.py", LENGTH_REWARD)
    config = RewardConfig(reward_fn_path="r.py", reward_fn_kwargs={"bonus": 1.0}, num_cpus=2)
    manager = RewardManager(config, str(tmp_path), use_ray=False)
    scores, metrics = manager.compute(make_batch(["a", "aa", "aaa"]))
    assert scores.dtype == torch.float32 and scores.tolist() == [2.0, 3.0, 4.0]
    assert metrics == {"length": [1.0, 2.0, 3.0], "correct": [0.0, 1.0, 0.0]}
    empty_scores, empty_metrics = manager.compute(make_batch([]))
    assert empty_scores.shape == (0,) and empty_metrics == {}


def test_batch_to_samples_defaults_and_missing_fields():
    samples = batch_to_samples(make_batch(["r"], with_optional=False))
    assert samples == [{"prompt": "prompt number 0", "response": "r", "response_length": None, "ground_truth": "",
                        "images": []}]
    with pytest.raises(RewardError, match=r"no non-tensor field\(s\) \['response_text'\]"):
        batch_to_samples(DataBatch(non_tensors={"raw_prompt": ["p"]}))


def test_manager_config_errors(tmp_path):
    with pytest.raises(RewardError, match="reward_fn_path is not set"):
        RewardManager(RewardConfig(), None)
    with pytest.raises(RewardError, match="reward_type=function, sequential or batch; got 'model'"):
        RewardManager(RewardConfig(reward_type="model", reward_fn_path="r.py"), None)


# ----------------------------------------------------------------------------- EasyR1's reward-function forms

# As EasyR1 writes them (examples/reward_function/math.py): a batch function of `reward_inputs` (response,
# response_length, ground_truth) returning one {"overall": ..., <other scores>} dict per input, with no
# `batched` attribute: EasyR1's config says `reward_type: batch`.
EASYR1_MATH = """
import re

def format_reward(response):
    return 1.0 if re.fullmatch(r"<think>.*</think>.*\\\\boxed\\{.*\\}.*", response, re.DOTALL) else 0.0

def accuracy_reward(response, ground_truth):
    match = re.search(r"\\\\boxed\\{(.*?)\\}", response)
    return 1.0 if match and match.group(1).strip() == ground_truth else 0.0

def compute_score(reward_inputs, format_weight=0.1):
    if not isinstance(reward_inputs, list):
        raise ValueError("Please use `reward_type=batch` for math reward function.")
    scores = []
    for reward_input in reward_inputs:
        response = re.sub(r"\\s*(<|>|/)\\s*", r"\\1", reward_input["response"])
        format_score = format_reward(response)
        accuracy_score = accuracy_reward(response, reward_input["ground_truth"])
        scores.append({"overall": (1 - format_weight) * accuracy_score + format_weight * format_score,
                       "format": format_score, "accuracy": accuracy_score,
                       "length": float(reward_input["response_length"])})
    return scores
"""

EASYR1_SEQUENTIAL = """
def compute_score(reward_input, bonus=0.0):
    correct = float(reward_input["response"] == reward_input["ground_truth"])
    return {"overall": correct + bonus, "accuracy": correct}
"""


def easyr1_batch(responses, truths):
    batch = make_batch(responses, truths)
    batch.tensors["response_mask"] = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]][:len(responses)])
    return batch


def test_easyr1_batch_function_overall_is_the_reward_other_keys_metrics(tmp_path):
    write(tmp_path, "math.py", EASYR1_MATH)
    config = RewardConfig(reward_type="batch", reward_fn_path="math.py:compute_score",
                          reward_fn_kwargs={"format_weight": 0.2})
    manager = RewardManager(config, str(tmp_path), use_ray=False)
    assert manager.reward_fn.batched
    responses = ["<think>t</think> \\boxed{3}", "\\boxed{3}", "<think>t</think>\\boxed{4}"]
    scores, metrics = manager.compute(easyr1_batch(responses, ["3", "3", "3"]))
    # format / accuracy by hand: (1, 1), (0, 1), (1, 0); overall = 0.8 * accuracy + 0.2 * format
    assert scores.tolist() == pytest.approx([1.0, 0.8, 0.2])
    assert metrics == {"format": [1.0, 0.0, 1.0], "accuracy": [1.0, 1.0, 0.0], "length": [3.0, 2.0, 1.0]}
    # Two samples: a list of two dicts is rows, not the columnar (rewards, metrics) pair.
    scores, metrics = manager.compute(easyr1_batch(responses[:2], ["3", "3"]))
    assert scores.tolist() == pytest.approx([1.0, 0.8]) and metrics["accuracy"] == [1.0, 1.0]
    # Under the default reward_type (function) the file's own declaration counts: per-sample, which EasyR1's
    # function rejects, and says so.
    with pytest.raises(RewardError, match="Please use `reward_type=batch`"):
        RewardManager(RewardConfig(reward_fn_path="math.py:compute_score"), str(tmp_path), use_ray=False).compute(
            easyr1_batch(responses, ["3", "3", "3"]))


def test_easyr1_sequential_function_and_dict_results(tmp_path):
    write(tmp_path, "seq.py", EASYR1_SEQUENTIAL)
    for reward_type in ("sequential", "function"):
        config = RewardConfig(reward_type=reward_type, reward_fn_path="seq.py:compute_score",
                              reward_fn_kwargs={"bonus": 0.5})
        scores, metrics = RewardManager(config, str(tmp_path), use_ray=False).compute(
            easyr1_batch(["3", "4"], ["3", "3"]))
        assert scores.tolist() == [1.5, 0.5] and metrics == {"accuracy": [1.0, 0.0]}
    write(tmp_path, "bad.py", "def compute_score(x):\n    return {'accuracy': 1.0}\n")
    with pytest.raises(RewardError, match=r"a dict without an 'overall' key \(keys: \['accuracy'\]\)"):
        load_reward_function("bad.py:compute_score", str(tmp_path), form="sequential")([sample()])
    with pytest.raises(RewardError, match="'vectorized' is not a reward-function form"):
        load_reward_function("seq.py:compute_score", str(tmp_path), form="vectorized")


def test_batch_to_samples_response_length_counts_the_response_mask():
    samples = batch_to_samples(easyr1_batch(["a", "b", "c"], ["x", "y", "z"]))
    assert [s["response_length"] for s in samples] == [3, 2, 1]


# ----------------------------------------------------------------------------- manager (Ray path)


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.setenv("RAY_AUTH_MODE", "disabled")
        # address="local": always a private cluster, never one another process started with `ray start`.
        ray.init(address="local", include_dashboard=False, num_cpus=2, object_store_memory=100 * 1024 ** 2,
                 log_to_driver=False, runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}})
        try:
            yield ray
        finally:
            ray.shutdown()


def test_ray_path_matches_local_path_with_two_actors(tmp_path, ray_cluster):
    write(tmp_path, "r.py", LENGTH_REWARD)
    write(tmp_path, "b.py", """
    def reward_function(items):
        # Batch form: each actor sees its chunk; the result must not depend on that.
        return [(len(d["response"]) * 2.0, {"n": 1.0}) for d in items]
    reward_function.batched = True
    """)
    batch = make_batch(["x" * i for i in range(6)] + ["<think>t</think><answer>\\boxed{xx}</answer>"], ["xx"] * 7)
    batch.tensors["response_mask"] = torch.ones(7, 3, dtype=torch.long)
    # format_accuracy.py imports its sibling math_answer.py: that must work inside the actors too.
    write(tmp_path, "easyr1.py", EASYR1_MATH)  # EasyR1's batch form, declared only by reward_type: batch
    for spec, reward_type in (("r.py", "function"), ("b.py", "function"), ("easyr1.py:compute_score", "batch"),
                              (os.path.join(REPO, "reward_fns", "format_accuracy.py"), "function")):
        config = RewardConfig(reward_type=reward_type, reward_fn_path=spec,
                              reward_fn_kwargs={"bonus": 0.25} if spec == "r.py" else {}, num_cpus=2, timeout_s=60)
        local = RewardManager(config, str(tmp_path), use_ray=False).compute(batch)
        with RewardManager(config, str(tmp_path)) as manager:  # Ray is initialised -> Ray path
            remote = manager.compute(batch)
            assert len(manager._actors) == 2
        assert torch.equal(local[0], remote[0]) and local[1] == remote[1]



def test_started_actors_are_the_ones_compute_uses_with_the_same_scores(tmp_path, ray_cluster):
    """`start()` (the trainer's, at set-up) creates the actors without waiting; `compute` waits for those, scores as
    the local path does, and `shutdown` kills them even when no compute ran."""
    write(tmp_path, "r.py", LENGTH_REWARD)
    config = RewardConfig(reward_fn_path="r.py", reward_fn_kwargs={"bonus": 0.25}, num_cpus=2, timeout_s=60)
    batch = make_batch(["x" * i for i in range(5)], ["xx"] * 5)
    local = RewardManager(config, str(tmp_path), use_ray=False).compute(batch)
    with RewardManager(config, str(tmp_path)) as manager:
        manager.start()
        started = list(manager._starting)
        assert len(started) == 2 and manager._actors is None
        manager.start()  # once only
        assert manager._starting == started
        remote = manager.compute(batch)
        assert manager._actors == started and manager._starting is None
    assert torch.equal(local[0], remote[0]) and local[1] == remote[1]
    unused = RewardManager(config, str(tmp_path))
    unused.start()
    actors = list(unused._starting)
    unused.shutdown()
    assert unused._starting is None
    with pytest.raises(ray_cluster.exceptions.RayActorError):
        ray_cluster.get(actors[0].ready.remote(), timeout=60)
    local_manager = RewardManager(config, str(tmp_path), use_ray=False)
    local_manager.start()
    assert local_manager._starting is None  # the local path starts nothing

def test_ray_path_reports_the_failing_sample_and_timeouts(tmp_path, ray_cluster):
    write(tmp_path, "r.py", """
    import math, time
    def reward_function(d):
        if d["response"] == "slow":
            time.sleep(30)
        return (math.nan if d["response"] == "nan" else 1.0), {}
    """)
    config = RewardConfig(reward_fn_path="r.py", num_cpus=2, timeout_s=3)
    with RewardManager(config, str(tmp_path)) as manager:
        with pytest.raises(RewardError) as e:
            manager.compute(make_batch(["ok", "ok", "ok", "nan"]))
        # The actor's message, not Ray's wrapper: file, function and the global row index.
        assert str(e.value).startswith(f"Reward function {tmp_path}/r.py:reward_function returned a non-finite")
        assert "sample 3 (prompt: 'prompt number 3', response: 'nan')" in str(e.value)
        with pytest.raises(RewardError, match=r"did not finish scoring 2 samples within worker.reward.timeout_s = 3"):
            manager.compute(make_batch(["ok", "slow"]))
        assert manager._actors is None  # killed; they come back on the next call
        assert manager.compute(make_batch(["ok"]))[0].tolist() == [1.0]


# ----------------------------------------------------------------------------- aggregation


def test_reward_metrics_means():
    out = reward_metrics(torch.tensor([1.0, 0.0, 0.5, 0.5]), {"accuracy": [1, 0, 1, 1], "format": [0.5] * 4})
    assert out == {"reward/overall": 0.5, "reward/accuracy": 0.75, "reward/format": 0.5}
    assert reward_metrics([2.0, 4.0], {}) == {"reward/overall": 3.0}
    assert reward_metrics(torch.zeros(0), {}) == {}


def test_token_level_scores_on_last_valid_token():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 1, 0]])
    out = token_level_scores(torch.tensor([0.5, -1.0, 2.0, 3.0]), mask)
    expected = torch.zeros(4, 5)
    expected[0, 2], expected[1, 4], expected[2, 0], expected[3, 3] = 0.5, -1.0, 2.0, 3.0
    assert out.dtype == torch.float32 and torch.equal(out, expected)
    with pytest.raises(ValueError, match=r"no valid token in row\(s\) \[1\]"):
        token_level_scores(torch.ones(2), torch.tensor([[1, 0], [0, 0]]))


# ----------------------------------------------------------------------------- shipped reward functions


@pytest.mark.parametrize("response, truth, expected", [
    ("so the answer is \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{\\dfrac{\\sqrt{2}}{2}}", "\\frac{\\sqrt2}{2}", 1.0),
    ("\\boxed{2\\sqrt{3}}", "\\sqrt{12}", 1.0),
    ("The total is 1,000.", "1000", 1.0),
    ("\\boxed{(1, 2)}", "(1,2)", 1.0),
    ("\\boxed{\\text{(B)}}", "B", 1.0),
    ("\\boxed{x^2+1}", "x^{2}+1", 1.0),
    ("first 3, then \\boxed{4}, then 5", "4", 1.0),  # the box wins over the last number
    ("\\boxed{3}", "4", 0.0),
    ("\\boxed{10^{10^{10}}}", "1", 0.0),  # no huge powers evaluated
    ("no number here", "5", 0.0),
])
def test_math_answer(response, truth, expected):
    fn = load_reward_function(os.path.join(REPO, "reward_fns", "math_answer.py"))
    scores, metrics = fn([sample(response=response, ground_truth=truth)])
    assert scores == [expected] and metrics["accuracy"] == [expected]


def test_format_accuracy():
    fn = load_reward_function(os.path.join(REPO, "reward_fns", "format_accuracy.py"), kwargs={"format_weight": 0.2})
    samples = [
        sample(response="<think>2+2</think> <answer>\\boxed{4}</answer>"),          # both
        sample(response="<think>hm</think><answer>Cat</answer>", ground_truth="cat"),  # free text
        sample(response="the answer is 4"),                                         # accuracy only
        sample(response="<think>a<think>b</think><answer>5</answer>"),               # neither
    ]
    scores, metrics = fn(samples)
    assert metrics == {"format": [1.0, 1.0, 0.0, 0.0], "accuracy": [1.0, 1.0, 1.0, 0.0]}
    assert scores == pytest.approx([1.0, 1.0, 0.8, 0.0])


# ----------------------------------------------------------------------------- faults: raise or score 0 (on_error)

FAULTY_REWARD = """
import math, os, time
def reward_function(d):
    r = d["response"]
    if r == "raise":
        raise ValueError("odd sample")
    if r == "hang":
        time.sleep(60)
    if r == "die":
        os._exit(3)  # the reward process dies (a segfault in a C extension looks the same)
    bad = {"nan": math.nan, "inf": math.inf, "none": None, "str": "high"}
    return (bad[r] if r in bad else 1.0), {"acc": 0.5}
"""


def with_uids(batch):
    batch.non_tensors["sample_uid"] = [f"u{i}/0" for i in range(len(batch))]
    return batch


@pytest.mark.parametrize("response, pattern", [
    ("raise", r"raised ValueError: odd sample \(line 6: .*\) on sample 1 \(uid u1/0, prompt: 'prompt number 1'"),
    ("nan", r"returned a non-finite reward nan for sample 1 \(uid u1/0, prompt: 'prompt number 1'"),
    ("inf", r"returned a non-finite reward inf for sample 1 \(uid u1/0"),
    ("none", r"returned a reward of type NoneType \(None\); it must be a real number. On sample 1 \(uid u1/0"),
    ("str", r"returned a reward of type str \('high'\); it must be a real number. On sample 1 \(uid u1/0"),
])
def test_each_reward_fault_stops_the_run_naming_function_and_sample(tmp_path, response, pattern):
    write(tmp_path, "r.py", FAULTY_REWARD)
    manager = RewardManager(RewardConfig(reward_fn_path="r.py"), str(tmp_path), use_ray=False)
    with pytest.raises(RewardError, match=f"r.py:reward_function {pattern}"):
        manager.compute(with_uids(make_batch(["ok", response, "ok"])))


def test_on_error_zero_scores_failing_samples_0_and_counts_them(tmp_path, caplog):
    write(tmp_path, "r.py", FAULTY_REWARD)
    manager = RewardManager(RewardConfig(reward_fn_path="r.py", on_error="zero"), str(tmp_path), use_ray=False)
    with caplog.at_level("WARNING"):
        scores, metrics = manager.compute(with_uids(make_batch(["ok", "raise", "nan", "none", "str", "ok"])))
    assert scores.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert metrics == {"acc": [0.5, 0.0, 0.0, 0.0, 0.0, 0.5], "errors": [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]}
    # Logged: the mean reward over all rows, and the count of rows scored 0.
    assert reward_metrics(scores, metrics) == pytest.approx({"reward/overall": 1 / 3, "reward/acc": 1 / 6,
                                                            "reward/errors": 4.0})
    # The first MAX_LOGGED_ERRORS failures are logged in full, the rest counted.
    assert "scored 0: Reward function" in caplog.text and "sample 1 (uid u1/0" in caplog.text
    assert "1 more failures in this batch (4 samples scored 0 in all)" in caplog.text
    clean_scores, clean_metrics = manager.compute(make_batch(["ok"]))
    assert clean_scores.tolist() == [1.0] and clean_metrics == {"acc": [0.5], "errors": [0.0]}


def test_on_error_zero_batch_form_wrong_count_zeroes_the_call_and_bad_value_only_its_sample(tmp_path):
    write(tmp_path, "b.py", """
    def reward_function(items):
        if len(items) == 3:
            return [1.0, 2.0]
        return [float("nan") if d["response"] == "bad" else 2.0 for d in items]
    reward_function.batched = True
    """)
    fn = load_reward_function("b.py", str(tmp_path))
    scores, metrics, errors = fn.score([sample()] * 3, offset=5, on_error="zero")
    assert scores == [0.0] * 3 and metrics == {} and [row for row, _ in errors] == [5, 6, 7]
    assert "returned 2 results for 3 samples" in errors[0][1]
    scores, _, errors = fn.score([sample(), sample(response="bad")], on_error="zero", uids=["a", "b"])
    assert scores == [2.0, 0.0] and len(errors) == 1 and errors[0][0] == 1 and "(uid b," in errors[0][1]
    with pytest.raises(RewardError, match="on_error = 'skip' must be one of"):
        RewardManager(RewardConfig(reward_fn_path=str(tmp_path / "b.py"), on_error="skip"), None)


def test_ray_path_hang_and_dead_reward_process_do_not_take_the_trainer_along(tmp_path, ray_cluster):
    write(tmp_path, "r.py", FAULTY_REWARD)
    raising = RewardConfig(reward_fn_path="r.py", num_cpus=2, timeout_s=3)
    with RewardManager(raising, str(tmp_path)) as manager:
        with pytest.raises(RewardError, match=r"r.py:reward_function did not finish scoring 2 samples within "
                                              r"worker.reward.timeout_s = 3 s .*still running: samples 1..1, "
                                              r"first: sample 1 \(uid u1/0"):
            manager.compute(with_uids(make_batch(["ok", "hang"])))
        with pytest.raises(RewardError, match=r"Reward actor for .*r.py:reward_function failed \(samples 1..1, "
                                              r"first: sample 1 \(uid u1/0, prompt: 'prompt number 1'"):
            manager.compute(with_uids(make_batch(["ok", "die"])))
        assert manager.compute(make_batch(["ok"]))[0].tolist() == [1.0]  # fresh actors
    zero = RewardConfig(reward_fn_path="r.py", num_cpus=2, timeout_s=3, on_error="zero")
    with RewardManager(zero, str(tmp_path)) as manager:
        # Chunks: rows 0-1 (actor 0) and 2-3 (actor 1); the chunk holding the fault is scored 0.
        for fault in ("hang", "die"):
            scores, metrics = manager.compute(with_uids(make_batch(["ok", "ok", fault, "ok"])))
            assert scores.tolist() == [1.0, 1.0, 0.0, 0.0]
            assert metrics == {"acc": [0.5, 0.5, 0.0, 0.0], "errors": [0.0, 0.0, 1.0, 1.0]}
        scores, metrics = manager.compute(make_batch(["ok", "raise", "ok", "ok"]))  # in-actor: only that row
        assert scores.tolist() == [1.0, 0.0, 1.0, 1.0] and metrics["errors"] == [0.0, 1.0, 0.0, 0.0]
