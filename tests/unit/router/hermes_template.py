"""A small Hermes-style chat template (ChatML turns, tools in <tools>, calls in <tool_call>), written for the
tests of `tool_choice` auto: no model's template is downloaded, and this one uses the tokens SmolLM2's
tokenizer (the tiny engine's) already has."""

HERMES_TEMPLATE = """{%- if tools %}<|im_start|>system
{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}

{% endif %}You may call functions. Their signatures are within <tools></tools>:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
For each call return the function name and arguments within <tool_call></tool_call> tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0]['role'] == 'system' %}<|im_start|>system
{{ messages[0]['content'] }}<|im_end|>
{% endif %}
{%- for message in messages %}{% if not (message['role'] == 'system' and loop.first) %}<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endif %}{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

# Llama 3.1's way: tools as JSON in the user turn, a call is a bare {"name": ..., "parameters": ...} object.
LLAMA_TEMPLATE = """{%- for message in messages %}<|{{ message['role'] }}|>
{% if tools and loop.last %}Respond with {"name": function name, "parameters": dictionary of arguments}.
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}{% endif %}{{ message['content'] }}
{% endfor %}<|assistant|>
"""

CHATML_TEMPLATE = """{% for message in messages %}<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
