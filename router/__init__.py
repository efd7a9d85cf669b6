"""The OpenAI-compatible router: tracks requests in Redis and hands KV over from prefill to decode."""
