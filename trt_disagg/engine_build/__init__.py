"""The build step: a deployment config + a model source -> one engine directory per role.

    builder.py        plan (digests, up to date?), load the source once, validate, build each role
    python_engine.py  the CPU engine's dir: rank{i}.safetensors + tokenizer/ + config.json
    tensorrtllm.py    convert_checkpoint.py + trtllm-build: rendered always, run when installed
    staging.py        atomic dirs: write to .<role>.tmp-<pid>, rename when complete, clean leftovers
    digest.py         the inputs digest that decides "up to date"
    xgrammar_info.py  xgrammar_tokenizer_info.json, the vocabulary the tensorrtllm backend's guided decoding reads
"""
