import os

if os.environ.get("MTRL_REQUIRE_VLLM") == "1":
    # The CI's vLLM job: without vLLM its tests would all be skipped and the job pass; fail instead.
    import vllm  # noqa: F401
