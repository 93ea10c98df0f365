"""How many `prompt_cache_key` buckets a prompt family's request rate calls for.

OpenAI overflows a prefix+key pair above ~15 requests a minute to machines without the prefix
(per key on GPT-5.6+; https://developers.openai.com/api/docs/guides/prompt-caching). TARGET_RPM is
the mean per bucket: conversations fill the buckets unevenly (behind a load balancer a hash
decides, and an agent's requests come in bursts), so the busiest bucket runs well above the
mean; at about mean + 2*sqrt(mean) it stays under 15 when the mean is 8. Measured on the team
workload over eight addon keys with hashed buckets: mean 12 -> all-turn hit ratio 0.894-0.906,
8 -> 0.906-0.921; a lone proxy fills them evenly: 0.929 with a mean of 8, 0.928 with 10. One
rule, used by the `{family_key}` template and by the report that recommends a bucket count.
"""

OVERFLOW_RPM = 15
TARGET_RPM = 8
MAX_BUCKETS = 64


def buckets_for(busiest_rpm: float) -> int:
    """Buckets for a family whose busiest minute saw `busiest_rpm` requests."""
    return min(max(1, -(-int(busiest_rpm) // TARGET_RPM)), MAX_BUCKETS)
